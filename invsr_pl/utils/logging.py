"""Rank-zero logging: a Python logger that only speaks on global rank zero, and hyper-parameter plus
parameter-count logging to every Lightning logger of a Trainer (README.md#layout, docs/tracking.md).

Importing it installs the ``invsr.*`` config resolvers of ``conf/logger/*.yaml`` (``invsr_pl.utils.hparams``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn

from invsr_pl.utils.hparams import flatten_config


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(rank_zero_only, "rank", 0) == 0


def get_logger(name: str = "invsr_pl") -> logging.Logger:
    """A ``logging.Logger`` whose records are dropped on every process but global rank zero."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _RankZeroFilter) for f in logger.filters):
        logger.addFilter(_RankZeroFilter())
    return logger


def count_parameters(module: nn.Module) -> dict[str, int]:
    """``{"total", "trainable", "frozen"}`` parameter counts; shared parameters are counted once."""
    params = {id(p): p for p in module.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"total": total, "trainable": trainable, "frozen": total - trainable}


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Flat counts for the model and each direct child, e.g. ``params/noise_predictor/trainable``."""
    summary = {f"params/{k}": v for k, v in count_parameters(model).items()}
    for name, child in model.named_children():
        counts = count_parameters(child)
        if counts["total"]:
            summary.update({f"params/{name}/{k}": v for k, v in counts.items()})
    return summary


@rank_zero_only
def log_hyperparameters(cfg: Mapping[str, Any] | Any, model: nn.Module, trainer: Any) -> dict[str, Any]:
    """Send the run configuration and the parameter counts to every logger of ``trainer`` (rank zero only).

    Args:
        cfg: the composed Hydra config (``DictConfig``) or a plain mapping; logged resolved and flattened
            (``model.optimizer_g.lr``), without secrets or the home folder (:func:`flatten_config`).
        model: the LightningModule; its parameter counts go under ``params/...``.
        trainer: the ``lightning.Trainer`` whose ``loggers`` receive ``log_hyperparams``.

    Returns:
        The dict that was logged (empty loggers still get nothing).

    The counts go to the console at DEBUG level only (``hydra.verbose=invsr_pl``): the model summary printed
    at fit start already shows them.
    """
    hparams = flatten_config(cfg or {})
    hparams.update(parameter_summary(model))
    for logger in getattr(trainer, "loggers", []):
        logger.log_hyperparams(hparams)
    get_logger(__name__).debug(
        "parameters: %s",
        ", ".join(
            f"{k.removeprefix('params/')}={v:,}" for k, v in hparams.items() if k.startswith("params/")
        ),
    )
    return hparams


def finish_trackers(failed: bool = False) -> None:
    """End the process-wide W&B run, if one is open, so that the next job of a multirun (same process)
    starts its own run: a new ``WandbLogger`` would otherwise reuse ``wandb.run`` and log every job into
    the first one. MLflow runs need nothing: Lightning's ``MLFlowLogger.finalize`` ends each at teardown.

    Args:
        failed: mark the W&B run as failed (exit code 1) instead of finished.
    """
    wandb = sys.modules.get("wandb")  # never imported: no W&B run to end
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)


def tracker_hints(loggers: Any) -> list[str]:
    """One line per MLflow / W&B logger saying where its run is and how to look at it, e.g.
    ``MLflow: mlflow ui --backend-store-uri sqlite:///logs/mlflow/mlflow.db (experiment 'quickstart')`` or
    ``W&B (offline): wandb sync <run folder>/wandb/offline-run-...``; other loggers give none."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    lines = []
    for logger in loggers or []:
        if isinstance(logger, MLFlowLogger):
            client = logger.experiment  # the run exists by now: nothing new is created
            uri, name = str(client.tracking_uri), client.get_experiment(logger.experiment_id).name
            if uri.startswith(("http://", "https://", "databricks")):
                lines.append(f"MLflow: {uri} (experiment {name!r}, run {logger.run_id})")
            else:
                lines.append(f"MLflow: mlflow ui --backend-store-uri {uri} (experiment {name!r})")
        elif isinstance(logger, WandbLogger):
            wandb = sys.modules.get("wandb")
            run = getattr(wandb, "run", None)
            if run is None:
                continue
            if run.offline:
                lines.append(f"W&B (offline): wandb sync {Path(run.dir).parent}")
            else:
                lines.append(f"W&B: {run.url}")
    return lines
