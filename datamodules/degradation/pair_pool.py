"""Training pair pool: Real-ESRGAN's shuffle queue that mixes degradations across batches.

docs/data.md#pair-pool. The official degrades a whole batch at once, so one batch used to share some
random choices; the pool breaks that correlation by training on pairs drawn from the last ``size / B``
batches. Here every image already has its own degradation (see ``pipeline.py``), but the pool is kept because
it is part of the recipe and it also decorrelates the content of consecutive batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


class TrainingPairPool:
    """Fixed-size queue of training pairs kept on the batch's device.

    Behaviour per call with a batch of b entries:

    - while the pool is not full, the batch is appended and returned unchanged;
    - once full, the pool is randomly permuted (with ``generator``), the first b entries are returned and the
      new batch is written into those slots.

    Args:
        size: number of pairs kept (the official default is 10 x the per-GPU batch, e.g. 160). 0 disables the
            pool (batches pass through).
    """

    def __init__(self, size: int = 160) -> None:
        if int(size) < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        self.size = int(size)
        self.filled = 0
        self._queue: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return self.filled

    @property
    def is_full(self) -> bool:
        return self.size > 0 and self.filled >= self.size

    def __call__(
        self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Push a batch and get the batch to train on.

        Args:
            batch: dict of tensors sharing the leading batch dimension b (e.g. ``{"lq": (b,3,h,w), "gt":
                (b,3,H,W)}``); keys, per-entry shapes and dtypes must stay the same across calls.
            generator: for the permutation, on the batch's device (required once the pool is full).

        Returns:
            dict with the same keys and shapes; the input batch itself while the pool fills.
        """
        if not batch:
            raise ValueError("batch must contain at least one tensor")
        b = _batch_size(batch)
        if self.size == 0:
            return dict(batch)
        if not self._queue:
            self._queue = {k: v.new_empty((self.size, *v.shape[1:])) for k, v in batch.items()}
        # A state loaded on the CPU (checkpoint resume) follows the batches to their device on first use.
        self._queue = {k: q.to(batch[k].device) if k in batch else q for k, q in self._queue.items()}
        self._check_compatible(batch)
        if not self.is_full:
            n = min(b, self.size - self.filled)
            for k, v in batch.items():
                self._queue[k][self.filled : self.filled + n] = v[:n].detach()
            self.filled += n
            return dict(batch)
        if b > self.size:
            raise ValueError(f"batch of {b} is larger than the pool ({self.size})")
        if generator is None:
            raise ValueError("the full pool needs a torch.Generator for its permutation")
        device = next(iter(self._queue.values())).device
        perm = torch.randperm(self.size, generator=generator, device=generator.device).to(device)
        out: dict[str, Tensor] = {}
        for k, q in self._queue.items():
            q = q[perm]  # permuted copy
            out[k] = q[:b].clone()
            q[:b] = batch[k].detach()
            self._queue[k] = q
        return out

    def _check_compatible(self, batch: Mapping[str, Tensor]) -> None:
        if set(batch) != set(self._queue):
            raise ValueError(f"batch keys {sorted(batch)} differ from the pool's {sorted(self._queue)}")
        for k, v in batch.items():
            q = self._queue[k]
            if v.shape[1:] != q.shape[1:] or v.dtype != q.dtype or v.device != q.device:
                raise ValueError(
                    f"batch[{k!r}] is {tuple(v.shape[1:])} {v.dtype} on {v.device}; the pool holds "
                    f"{tuple(q.shape[1:])} {q.dtype} on {q.device}"
                )

    def reset(self) -> None:
        """Empty the pool (buffers are released)."""
        self.filled = 0
        self._queue = {}

    def state_dict(self) -> dict[str, Any]:
        """``{"size", "filled", "queue": {key: (filled, ...) tensor}}``; only the filled part is saved.

        A full pool of 512 px fp32 GT crops is large (160 x 3 MB); callers may choose not to persist it.
        """
        return {
            "size": self.size,
            "filled": self.filled,
            "queue": {k: v[: self.filled].clone() for k, v in self._queue.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from ``state_dict()``; the queue moves to the batches' device on the next call."""
        size, filled = int(state["size"]), int(state["filled"])
        if size != self.size:
            raise ValueError(f"state is for a pool of size {size}, this pool has size {self.size}")
        self.filled = filled
        self._queue = {}
        for k, v in state["queue"].items():
            if v.shape[0] != filled:
                raise ValueError(f"state queue {k!r} holds {v.shape[0]} entries, expected {filled}")
            q = v.new_empty((self.size, *v.shape[1:]))
            q[:filled] = v
            self._queue[k] = q


def _batch_size(batch: Mapping[str, Tensor]) -> int:
    sizes = {k: v.shape[0] for k, v in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all batch tensors need the same leading size, got {sizes}")
    return next(iter(sizes.values()))
