"""Train InvSR with Lightning + Hydra.

    python train.py experiment=quickstart                  # tiny backbone, sample photos, CPU, minutes
    python train.py experiment=invsr_x4                    # the paper recipe, DDP on 4 GPUs
    python train.py experiment=invsr_x4 trainer.devices=8 data.batch_size=8   # 8 GPUs, still 64 per step
    python train.py experiment=invsr_x4 ckpt_path=last     # continue the latest run of that task
    python train.py -m experiment=smoke model.gan_weight=0,0.1   # a sweep, one run folder per job

``train(cfg)`` is the testable task; ``main`` is the Hydra shell that returns ``cfg.optimized_metric``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
import torch
from omegaconf import DictConfig

from invsr_pl.utils.instantiate import (
    instantiate_callbacks,
    instantiate_loggers,
    instantiate_trainer,
    metric_value,
    resolve_ckpt_path,
)
from invsr_pl.utils.logging import get_logger, log_hyperparameters

log = get_logger(__name__)  # rank zero only

# Both are by design: the frozen SD-Turbo/LPIPS stay in eval mode, and manual-optimisation checkpoints hold
# the post-step weights together with the post-step counters (what exact resume needs).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics as plain floats (tensors from callback_metrics included)."""
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor) or v.numel() == 1}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Build everything from ``cfg``, fit (optionally resuming), optionally test.

    Returns:
        metrics: ``trainer.callback_metrics`` after fit (and test) as floats, e.g. ``val/psnr_1step``.
        objects: ``cfg``, ``datamodule``, ``model``, ``callbacks``, ``loggers``, ``trainer``, ``ckpt_path``.
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))  # tiny CPU models: extra threads only contend
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 as in the reference (INVSR_REFERENCE §4.5)

    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    # _convert_="all": plain lists/dicts reach the constructors, so saved hyper-parameters hold no OmegaConf
    # types and checkpoints load with torch.load(weights_only=True) (Lightning's default when resuming)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    log.info("Instantiating model <%s>", cfg.model._target_)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model, _convert_="all")
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, loggers=loggers)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), Path(cfg.paths.log_dir) / cfg.task_name)
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


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics, _ = train(cfg)
    return metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
