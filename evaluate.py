"""Evaluate with Lightning's test loop: ``trainer.test(model, datamodule)`` from a Hydra config.

    python evaluate.py                                   # tiny backbone, random NP, built-in samples (smoke)
    python evaluate.py model/backbone=sd_turbo model/noise_predictor=default ckpt_path=logs/.../last.ckpt \
        benchmark=[imagenet_test,realsr,realset80] protocol=invsr metrics=all study=steps
    python evaluate.py study=table1 ...                  # the paper's Table-1 timestep sweep + plot
    torchrun --nproc_per_node=4 evaluate.py ...          # images split across processes, one gathered table
    python evaluate.py --config-name evaluate_latent_lpips ...   # another evaluation config (same contract)

Contract (any root config under conf/ can use it): the config provides

* ``data``: a ``LightningDataModule`` whose ``test_dataloader`` yields the sets to score;
* ``model``: a ``LightningModule`` whose test hooks score them and write their own outputs (tables, files)
  at the end of the test epoch; whatever it logs comes back from :func:`evaluate`;
* ``trainer``: a ``lightning.pytorch.Trainer`` config; ``callbacks`` / ``logger``: optional mappings of
  name -> config (as in training);
* optional ``seed`` (``seed_everything``) and ``torch_threads``.

Exit codes: 0 done; 1 done, but some inputs failed (the model's ``failures`` mapping is non-empty, e.g. a
metric that could not score some images; the tables say which); 2 setup error (a missing folder, an
unreadable checkpoint, a bad option: one line on stderr, nothing evaluated).

This file never interprets a checkpoint: a model that needs weights reads them in its constructor (for
InvSR, ``model.ckpt_path`` in conf/evaluate.yaml). Under torchrun each process is one Lightning rank
(``trainer.devices`` follows ``LOCAL_WORLD_SIZE``); Lightning shards the test sets; the model gathers rows.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import hydra
import lightning.pytorch as L
import torch
from omegaconf import DictConfig

from invsr_pl.launch.instantiate import instantiate_callbacks, instantiate_loggers, instantiate_trainer
from invsr_pl.utils.logging import get_logger

log = get_logger(__name__)  # rank zero only

# By design: frozen networks (backbone, metric models) stay in eval mode, and small benchmark loaders run
# without worker processes.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*does not have many workers")


class SetupError(RuntimeError):
    """The configuration cannot be built (exit code 2)."""


def _root_cause(err: BaseException) -> str:
    """``"<Type>: <first line>"`` of the innermost exception (Hydra wraps constructor errors)."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Instantiate ``cfg.data``, ``cfg.model``, callbacks, loggers and the trainer, then ``trainer.test``.

    Raises:
        SetupError: ``data``, ``model``, callbacks, loggers or the trainer cannot be built (one-line reason).

    Returns:
        metrics: ``trainer.callback_metrics`` as floats (InvSR: ``test/<set>/<method>/<metric>``).
        objects: ``cfg``, ``datamodule``, ``model``, ``callbacks``, ``loggers``, ``trainer``; the InvSR
            evaluation module's tables are in ``objects["model"].results``.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")

    try:
        log.info("Instantiating datamodule <%s>", cfg.data._target_)
        datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
        log.info("Instantiating model <%s>", cfg.model._target_)
        model: L.LightningModule = hydra.utils.instantiate(cfg.model, _convert_="all")
        callbacks = instantiate_callbacks(cfg.get("callbacks"))
        loggers = instantiate_loggers(cfg.get("logger"))
        trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, loggers=loggers)
    except Exception as err:  # nothing has run yet: say what is wrong in one line
        raise SetupError(_root_cause(err)) from err

    trainer.test(model=model, datamodule=datamodule)
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if not torch.is_tensor(v) or v.numel() == 1
    }
    objects = {
        "cfg": cfg, "datamodule": datamodule, "model": model, "callbacks": callbacks, "loggers": loggers,
        "trainer": trainer,
    }  # fmt: skip
    return metrics, objects


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        _, objects = evaluate(cfg)
    except SetupError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    if getattr(objects["model"], "failures", None):
        sys.exit(1)


if __name__ == "__main__":
    main()
