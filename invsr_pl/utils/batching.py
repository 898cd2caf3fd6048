"""The global batch: one number in the config, split over devices and micro-batches (docs/training.md).

The recipe states the batch per optimiser step over all devices (``data.global_batch_size``, 64 in the
paper; docs/training.md#batch-size-and-micro-batches) and, separately, the largest batch one device runs
forward/backward at once (``model.micro_batch_size``). The rest follows from the world size
(``trainer.devices x num_nodes``)::

    per_device_batch = global_batch_size / world_size          (must divide)
    micro_batches    = ceil(per_device_batch / micro_batch_size)

so 1, 2, 4, 8 or 16 GPUs train the same recipe with the same schedule (schedules count iterations).
:func:`check_batch_config` runs at start-up, before any model is built; the data module derives the same plan
from the trainer's actual world size at ``setup``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BatchPlan", "check_batch_config", "derive_batch", "resolve_world_size"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    """How one optimiser step's ``global_batch_size`` images are spread over devices and micro-batches.

    Attributes:
        global_batch_size: images per optimiser step, all devices together.
        world_size: number of training processes (devices x nodes).
        per_device_batch_size: images per step on one device (= the DataLoader batch).
        micro_batch_size: images per forward/backward on one device (the last micro-batch may be shorter).
        micro_batches: forward/backward passes per step and device, gradients accumulated in between.
    """

    global_batch_size: int
    world_size: int
    per_device_batch_size: int
    micro_batch_size: int
    micro_batches: int

    def describe(self) -> str:
        """One line for the run's log."""
        last = self.per_device_batch_size - (self.micro_batches - 1) * self.micro_batch_size
        tail = f", last one {last}" if last != self.micro_batch_size else ""
        return (
            f"global batch {self.global_batch_size} = {self.world_size} device(s) x "
            f"{self.per_device_batch_size} per device; {self.micro_batches} micro-batch(es) of "
            f"{self.micro_batch_size} per step{tail}"
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def derive_batch(global_batch_size: int, world_size: int, micro_batch_size: int | None = None) -> BatchPlan:
    """Split ``global_batch_size`` over ``world_size`` devices and micro-batches of ``micro_batch_size``.

    Args:
        global_batch_size: images per optimiser step over all devices (>= 1).
        world_size: devices x nodes (>= 1).
        micro_batch_size: most images one device processes at once; ``None`` = the whole per-device batch.
            Larger than the per-device batch means no accumulation.

    Raises:
        ValueError: a non-positive value, or ``global_batch_size`` not divisible by ``world_size``; the
            message lists the device counts that divide the global batch and the nearest global batches
            that divide the device count.
    """
    for name, value in (("global_batch_size", global_batch_size), ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if micro_batch_size is not None and (
        not isinstance(micro_batch_size, int) or isinstance(micro_batch_size, bool) or micro_batch_size < 1
    ):
        raise ValueError(f"micro_batch_size must be a positive integer or null, got {micro_batch_size!r}")
    if global_batch_size % world_size:
        lower = (global_batch_size // world_size) * world_size
        options = [v for v in (lower, lower + world_size) if v >= 1]
        raise ValueError(
            f"data.global_batch_size={global_batch_size} does not divide over {world_size} device(s) "
            f"(trainer.devices x trainer.num_nodes). Device counts that work for {global_batch_size}: "
            f"{', '.join(map(str, _divisors(global_batch_size)))}; global batches that work on {world_size} "
            f"device(s): multiples of {world_size}, e.g. {' or '.join(map(str, options))}"
        )
    per_device = global_batch_size // world_size
    micro = per_device if micro_batch_size is None else min(micro_batch_size, per_device)
    return BatchPlan(global_batch_size, world_size, per_device, micro, math.ceil(per_device / micro))


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA runtime is the same as no GPU here
        return 0


def resolve_world_size(devices: Any = 1, num_nodes: Any = 1, accelerator: Any = "auto") -> int:
    """Processes Lightning will start for ``Trainer(devices, num_nodes, accelerator)``.

    ``devices``: an int (``-1`` = every visible device), ``"auto"``, a digit string (``"2"``, ``"-1"``), a
    list of device indices or a comma-separated index string (``"0,1"``). ``"auto"``/``-1`` mean the visible
    CUDA devices when the accelerator is ``gpu``/``cuda``/``auto`` and CUDA is there, otherwise 1 (on CPU
    Lightning runs one process for ``"auto"``).
    """
    nodes = int(num_nodes or 1)
    if isinstance(devices, str):
        text = devices.strip()
        if text.lower() == "auto":
            devices = -1
        elif "," in text:
            devices = [t for t in text.split(",") if t.strip()]
        else:
            try:
                devices = int(text)
            except ValueError:
                raise ValueError(f"trainer.devices={devices!r} is not a count, a list or 'auto'") from None
    if isinstance(devices, (list, tuple)) or (hasattr(devices, "__len__") and not isinstance(devices, int)):
        count = len(devices)
    elif devices is None or int(devices) == -1:
        gpu = str(accelerator).lower() in ("gpu", "cuda", "auto")
        count = max(_cuda_count(), 1) if gpu else 1
    else:
        count = int(devices)
    if count < 1 or nodes < 1:
        raise ValueError(f"trainer.devices={devices!r} x trainer.num_nodes={num_nodes!r} gives no process")
    return count * nodes


def check_batch_config(cfg: Mapping[str, Any], *, log_plan: bool = True) -> BatchPlan | None:
    """Start-up check of a composed training config (before any model is built).

    Reads ``cfg.data.global_batch_size``, ``cfg.model.micro_batch_size`` and ``cfg.trainer.{devices,
    num_nodes, accelerator}``; logs the derived plan and returns it. Returns ``None`` for a data config that
    has no ``global_batch_size`` (a custom data module that batches on its own terms).

    Raises:
        ValueError: the message of :func:`derive_batch` (which values work).
    """
    data = cfg.get("data") or {}
    if data.get("global_batch_size") is None:
        return None
    trainer = cfg.get("trainer") or {}
    model = cfg.get("model") or {}
    world = resolve_world_size(
        trainer.get("devices", 1), trainer.get("num_nodes", 1), trainer.get("accelerator", "auto")
    )
    plan = derive_batch(int(data.get("global_batch_size")), world, model.get("micro_batch_size"))
    if log_plan:
        log.info("Batch: %s", plan.describe())
    return plan
