"""Evaluate with Lightning's test loop: ``trainer.test(model, datamodule)`` from a Hydra config.

    python evaluate.py                                   # tiny backbone, random NP, built-in samples (smoke)
    python evaluate.py ckpt_path=logs/quickstart/runs/<time>/checkpoints/last.ckpt   # its own backbone
    python evaluate.py benchmark=folder folder.lq_dir=my/lq folder.gt_dir=my/gt folder.name=mine
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

A model that needs weights reads them in its constructor (for InvSR, ``model.ckpt_path`` in
conf/evaluate.yaml). What this file reads of a checkpoint is its *provenance* (invsr_pl/utils/provenance.py):
a ``train.py`` checkpoint or ``invsr-export`` folder names the backbone, scale and seed it was trained and
validated with; unless the command line names them, those are used, and a backbone named on the command line
that differs is refused (exit 2) unless ``allow_backbone_mismatch=true`` (docs/evaluation.md). The console
shows the model's own table (``trainer.test(verbose=False)``: not Lightning's per-dataloader dump), then
the folder and files written, and a warning when the weights are random.

Under torchrun each process is one Lightning rank (``trainer.devices`` follows ``LOCAL_WORLD_SIZE``);
Lightning shards the test sets; the model gathers rows.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, open_dict

from invsr_pl.launch import exit_codes
from invsr_pl.utils.errors import SetupError
from invsr_pl.utils.quiet import quiet_dependencies

if TYPE_CHECKING:
    import lightning.pytorch as L

# torch, Lightning and the models are imported once a config is composed (inside evaluate()), so `--help`
# and `--cfg job` print in about a second (README.md#speed).

# By design: frozen networks (backbone, metric models) stay in eval mode, and small benchmark loaders run
# without worker processes.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r".*does not have many workers")


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
    import lightning.pytorch as L
    import torch

    from invsr_pl.launch.checkpoint_provenance import (
        random_weights_warning,
        use_checkpoint_provenance,
    )
    from invsr_pl.launch.instantiate import instantiate_callbacks, instantiate_loggers, instantiate_trainer
    from invsr_pl.utils.logging import get_logger, log_hyperparameters
    from invsr_pl.utils.provenance import backbone_identity

    log = get_logger(__name__)  # rank zero only
    use_checkpoint_provenance(cfg)  # before anything is built: a wrong backbone fails in seconds
    warning = random_weights_warning(cfg)
    if "backbone_name" in cfg.get("model", {}) and cfg.model.backbone_name is None:
        with open_dict(cfg):  # the table says which backbone it scored on
            cfg.model.backbone_name = backbone_identity(cfg.model.backbone)[0]
    if warning:
        log.warning(warning)
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

    if loggers:
        log_hyperparameters(cfg, model, trainer)  # the composed config next to the table in each tracker
    # verbose=False: the model prints its own table; Lightning's per-dataloader dump repeats the first set's
    # values under the others and cuts long names
    trainer.test(model=model, datamodule=datamodule, verbose=False)
    _report_end(log, getattr(model, "results", {}) or {}, getattr(model, "failures", {}) or {}, warning)
    metrics = {
        k: float(v) for k, v in trainer.callback_metrics.items() if not torch.is_tensor(v) or v.numel() == 1
    }
    objects = {
        "cfg": cfg, "datamodule": datamodule, "model": model, "callbacks": callbacks, "loggers": loggers,
        "trainer": trainer,
    }  # fmt: skip
    return metrics, objects


def _report_end(log: Any, results: dict[str, Any], failures: dict[str, str], warning: str | None) -> None:
    """The last console lines: the folder and files written, what failed, the random-weights warning."""
    files = results.get("files") or {}
    if files:
        folder = Path(next(iter(files.values()))).parent
        log.info("Wrote %s: %s", folder, ", ".join(Path(p).name for p in files.values()))
    for what, reason in failures.items():
        log.error("%s: %s", what, reason)
    if warning:
        log.warning(warning)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_codes.task  # a command line Hydra cannot compose exits 2, not 1 (invsr_pl/launch/exit_codes.py)
def main(cfg: DictConfig) -> None:
    quiet_dependencies()  # after Hydra's logging setup: one copy of Lightning's lines (README "Speed")
    try:
        _, objects = evaluate(cfg)
    except SetupError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    if getattr(objects["model"], "failures", None):
        sys.exit(1)


if __name__ == "__main__":
    exit_codes.run(main)
