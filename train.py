"""Train InvSR with Lightning + Hydra.

    python train.py trainer.devices=8                      # the paper recipe (the default), global batch 64
    python train.py experiment=quickstart                  # tiny trained backbone, sample photos, CPU, ~30 s
    python train.py ckpt_path=last                         # continue the latest run of that task
    python train.py experiment=finetune_x4 data.train_dataset.sources.0.root=/data/photos
    python train.py -m experiment=smoke model.gan_weight=0,0.1   # a sweep, one run folder per job

``train(cfg)`` is the testable task; ``main`` is the Hydra shell that returns ``cfg.optimized_metric``.

Exit codes (single runs; a multirun leaves failures to Hydra's sweep):
    0    done
    1    an unexpected error (full traceback)
    2    setup error: config values that disagree, a missing/unreadable/unsafe ``ckpt_path`` or one that lacks
         trainable weights, bad constructor arguments; one line, printed last
    3    training stopped by the non-finite guard (``model.max_consecutive_nonfinite``); one line
    143  SIGTERM (preemption, ``kill``, ``scancel``): ``checkpoints/last.ckpt`` was saved first, so
         ``ckpt_path=last`` continues the run. Under SLURM, Lightning's requeue (requeue signal) stays on.
Set ``HYDRA_FULL_ERROR=1`` for the full traceback of the one-line errors.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import hydra
import lightning.pytorch as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from invsr_pl.launch.instantiate import (
    instantiate_callbacks,
    instantiate_loggers,
    instantiate_trainer,
    metric_value,
)
from invsr_pl.launch.startup_checks import SetupError, check_checkpoint_fits, check_config
from invsr_pl.systems.invsr import NonFiniteLossError
from invsr_pl.utils.checkpoint import CheckpointMismatchError, WeightFileError
from invsr_pl.utils.logging import get_logger, log_hyperparameters
from invsr_pl.utils.provenance import training_provenance

log = get_logger(__name__)  # rank zero only

EXIT_ERROR, EXIT_SETUP, EXIT_NONFINITE, EXIT_SIGTERM = 1, 2, 3, 143
SETUP_ERRORS = (
    SetupError,
    WeightFileError,
    CheckpointMismatchError,
    InstantiationException,
    FileNotFoundError,
)

# Both are by design: the frozen SD-Turbo/LPIPS stay in eval mode, and manual-optimisation checkpoints hold
# the post-step weights together with the post-step counters (what exact resume needs).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics as plain floats (tensors from callback_metrics included)."""
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor) or v.numel() == 1}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Check the config, build everything from ``cfg``, fit (optionally resuming), optionally test.

    Returns:
        metrics: ``trainer.callback_metrics`` after fit (and test) as floats, e.g. ``val/psnr_1step``.
        objects: ``cfg``, ``datamodule``, ``model``, ``callbacks``, ``loggers``, ``trainer``, ``ckpt_path``.

    Raises:
        SetupError / WeightFileError / CheckpointMismatchError: before anything is built (the checkpoint's
            keys are checked once the model exists, before training).
        SIGTERMException: the run got SIGTERM; ``last.ckpt`` was saved first.
    """
    ckpt_path = check_config(cfg)  # before instantiating anything: fail in seconds, with one line
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))  # tiny CPU models: extra threads only contend
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 as in the official trainer (docs/training.md)

    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    # _convert_="all": plain lists/dicts reach the constructors, so saved hyper-parameters hold no OmegaConf
    # types and checkpoints load with torch.load(weights_only=True) (Lightning's default when resuming)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    log.info("Instantiating model <%s>", cfg.model._target_)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model, _convert_="all")
    model.provenance = training_provenance(cfg)  # recorded in every checkpoint (utils/provenance.py)
    check_checkpoint_fits(ckpt_path, model)  # Lightning's non-strict load would keep random weights
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, loggers=loggers)
    objects: dict[str, Any] = {
        "cfg": cfg,
        "datamodule": datamodule,
        "model": model,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": trainer,
        "ckpt_path": ckpt_path,
    }

    if loggers:
        log_hyperparameters(cfg, model, trainer)  # the composed config + parameter counts

    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(_floats(trainer.callback_metrics))
        final = {k: v for k, v in sorted(metrics.items()) if k.startswith("val/")}
        if final:  # the numbers a run is judged by, next to their baselines (e.g. val/psnr_bicubic)
            log.info("Final validation: %s", ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
        last = getattr(trainer.checkpoint_callback, "last_model_path", "")
        if last:
            log.info("Last checkpoint: %s", last)
    if cfg.get("test", False):
        # after fit: the weights in memory (EMA swapped in by its callback); test-only: the given checkpoint
        trainer.test(
            model=model, datamodule=datamodule, ckpt_path=None if cfg.get("train", True) else ckpt_path
        )
        metrics.update(_floats(trainer.callback_metrics))
    return metrics, objects


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _exit(code: int, err: BaseException) -> None:
    """One readable line, printed last, then ``sys.exit(code)``; a traceback only with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, _ = train(cfg)
    except SIGTERMException:
        print(
            f"train.py: stopped by SIGTERM; checkpoints/last.ckpt saved, resume with ckpt_path=last "
            f"(exit {EXIT_SIGTERM})",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(EXIT_SIGTERM)
    except SETUP_ERRORS as err:
        if _is_multirun():
            raise
        _exit(EXIT_SETUP, err)
    except NonFiniteLossError as err:
        if _is_multirun():
            raise
        _exit(EXIT_NONFINITE, err)
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
