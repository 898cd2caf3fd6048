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
# "ddp" fails with "Expected to have finished reduction" (docs/lightning.md).
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


def _plugins(cfg: DictConfig) -> list[Any]:
    """The configured trainer plugins plus :class:`callbacks.checkpoint.AtomicCheckpointIO`, unless one of
    them already is a ``CheckpointIO`` (then the user's choice stands)."""
    from lightning.pytorch.plugins.io import CheckpointIO

    from callbacks.checkpoint import AtomicCheckpointIO

    configured = cfg.get("plugins") or []
    configured = [configured] if isinstance(configured, (Mapping, str)) else configured
    plugins = [hydra.utils.instantiate(p) if isinstance(p, Mapping) else p for p in configured]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())  # atomic on the target file system (docs/checkpoints.md)
    return plugins


def instantiate_trainer(cfg: DictConfig, callbacks: list[L.Callback], loggers: list[Logger]) -> L.Trainer:
    """The Trainer from the ``trainer`` group, with atomic checkpoint writes.

    ``strategy: auto`` with several devices or nodes becomes ``ddp_find_unused_parameters_true`` so that
    ``python train.py trainer.devices=8`` works (Lightning's automatic choice, plain DDP, breaks manual G/D
    steps). An explicit strategy is left alone.
    """
    overrides: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False, "plugins": _plugins(cfg)}
    strategy = cfg.get("strategy", "auto")
    if strategy == "auto" and _is_multi_device(cfg.get("devices", 1), int(cfg.get("num_nodes", 1))):
        log.info("Several devices: using strategy=%s (manual G/D optimisation)", MULTI_DEVICE_STRATEGY)
        overrides["strategy"] = MULTI_DEVICE_STRATEGY
    return hydra.utils.instantiate(cfg, **overrides)


def find_last_checkpoint(search_dir: str | Path) -> Path | None:
    """The newest *intact* checkpoint (by modification time) anywhere below ``search_dir``, or None.

    Every ``*.ckpt`` counts (``last.ckpt`` and the periodic ones beside it); unreadable files (empty or
    truncated by a kill, corrupt) are skipped with a warning naming them, so a broken ``last.ckpt`` falls back
    to the newest checkpoint that loads. Leftover temporary files of interrupted writes are never considered.
    """
    from invsr_pl.utils.atomic import is_temporary
    from invsr_pl.utils.checkpoint import checkpoint_problem

    root = Path(search_dir)
    if not root.is_dir():
        return None
    candidates = [p for p in root.rglob("*.ckpt") if p.is_file() and not is_temporary(p)]
    # newest first; at equal times last.ckpt (written after the periodic file of the same iteration)
    candidates.sort(key=lambda p: (p.stat().st_mtime, p.name.startswith("last")), reverse=True)
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("ckpt_path=last: skipping %s: %s", path, problem)
    return None


def resolve_ckpt_path(ckpt_path: str | None, search_dir: str | Path) -> str | None:
    """Turn the ``ckpt_path`` config value into what ``Trainer.fit`` takes.

    ``None`` -> fresh start; ``"last"`` -> the newest intact checkpoint below ``search_dir`` (the task's log
    folder, see :func:`find_last_checkpoint`), so a fresh invocation continues the latest run, or a fresh
    start when there is none; any other value must be an existing file (Lightning's special names
    ``"hpc"``/``"best"``/``"registry"`` pass through). Whether a file is readable and fits the model is
    checked by ``invsr_pl.launch.startup_checks``.
    """
    if ckpt_path is None or str(ckpt_path).strip() in ("", "null", "None"):
        return None
    ckpt_path = str(ckpt_path)
    if ckpt_path == "last":
        found = find_last_checkpoint(search_dir)
        if found is None:
            log.warning("ckpt_path=last: no intact checkpoint below %s, starting from scratch", search_dir)
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
