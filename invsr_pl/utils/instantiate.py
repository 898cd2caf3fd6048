"""Hydra config -> Lightning objects (callbacks, loggers, trainer); checkpoint-path resolution (train.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from invsr_pl.utils.logging import get_logger

log = get_logger(__name__)  # rank zero only

# Manual optimisation: G and D share one DDP wrapper and each backward reaches only one of them, so plain
# "ddp" fails with "Expected to have finished reduction" (ARCHITECTURE fact 5).
MULTI_DEVICE_STRATEGY = "ddp_find_unused_parameters_true"


def _instantiate_each(cfg: Mapping | None, kind: type, what: str) -> list[Any]:
    """Instantiate every ``_target_`` entry of a ``name -> config`` mapping (None entries are skipped)."""
    if not cfg:
        return []
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{what} config must be a mapping of name -> config, got {type(cfg).__name__}")
    objects = []
    for name, entry in cfg.items():
        if entry is None:  # e.g. `callbacks.image_logger=null` on the command line
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(f"{what} entry {name!r} must be a mapping with a _target_, got {entry!r}")
        if "_target_" not in entry:
            # an experiment tuned a callback/logger that the chosen group option does not include
            log.warning("%s entry %r has no _target_ (not in the selected group option): skipped", what, name)
            continue
        obj = hydra.utils.instantiate(entry)
        if not isinstance(obj, kind):
            raise TypeError(f"{what} entry {name!r} built a {type(obj).__name__}, expected {kind.__name__}")
        objects.append(obj)
    return objects


def instantiate_callbacks(cfg: Mapping | None) -> list[L.Callback]:
    """Callbacks from the ``callbacks`` group (a mapping name -> callback config)."""
    return _instantiate_each(cfg, L.Callback, "callbacks")


def instantiate_loggers(cfg: Mapping | None) -> list[Logger]:
    """Loggers from the ``logger`` group (a mapping name -> logger config)."""
    return _instantiate_each(cfg, Logger, "logger")


def _is_multi_device(devices: Any, num_nodes: int) -> bool:
    if num_nodes > 1:
        return True
    if isinstance(devices, int):
        return devices > 1 or devices == -1
    if isinstance(devices, str):
        return devices.strip() == "-1" or (devices.strip().isdigit() and int(devices) > 1) or "," in devices
    return devices is not None and len(devices) > 1


def instantiate_trainer(cfg: DictConfig, callbacks: list[L.Callback], loggers: list[Logger]) -> L.Trainer:
    """The Trainer from the ``trainer`` group.

    ``strategy: auto`` with several devices or nodes becomes ``ddp_find_unused_parameters_true`` so that
    ``python train.py trainer.devices=8`` works (Lightning's automatic choice, plain DDP, breaks manual G/D
    steps). An explicit strategy is left alone.
    """
    overrides: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
    strategy = cfg.get("strategy", "auto")
    if strategy == "auto" and _is_multi_device(cfg.get("devices", 1), int(cfg.get("num_nodes", 1))):
        log.info("Several devices: using strategy=%s (manual G/D optimisation)", MULTI_DEVICE_STRATEGY)
        overrides["strategy"] = MULTI_DEVICE_STRATEGY
    return hydra.utils.instantiate(cfg, **overrides)


def find_last_checkpoint(search_dir: str | Path) -> Path | None:
    """Newest ``last.ckpt`` (by modification time) anywhere below ``search_dir``, or None."""
    root = Path(search_dir)
    if not root.is_dir():
        return None
    candidates = [p for p in root.rglob("last*.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resolve_ckpt_path(ckpt_path: str | None, search_dir: str | Path) -> str | None:
    """Turn the ``ckpt_path`` config value into what ``Trainer.fit`` takes.

    ``None`` -> fresh start; ``"last"`` -> the newest ``last.ckpt`` below ``search_dir`` (the task's log
    folder), so a fresh invocation continues the latest run, or a fresh start when there is none; any other
    value must be an existing file (Lightning's special names ``"hpc"``/``"best"`` pass through).
    """
    if ckpt_path is None or str(ckpt_path).strip() in ("", "null", "None"):
        return None
    ckpt_path = str(ckpt_path)
    if ckpt_path == "last":
        found = find_last_checkpoint(search_dir)
        if found is None:
            log.warning("ckpt_path=last: no last.ckpt below %s, starting from scratch", search_dir)
            return None
        log.info("ckpt_path=last: resuming from %s", found)
        return str(found)
    if ckpt_path in ("hpc", "best", "registry"):
        return ckpt_path
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(
            f"ckpt_path {ckpt_path!r} does not exist (use 'last' to resume the latest run)"
        )
    return ckpt_path


def metric_value(metrics: Mapping[str, Any], name: str | None) -> float | None:
    """The sweeper's objective ``metrics[name]`` as a float; None (with a warning) when absent."""
    if not name:
        return None
    if name not in metrics:
        log.warning("optimized_metric %r was not logged; available: %s", name, sorted(metrics))
        return None
    return float(metrics[name])
