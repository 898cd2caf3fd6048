"""Out-of-memory fallback for sampling: retry with fewer patches per call, then with smaller patches.

A large image on a small GPU should come out (a little slower) rather than crash a whole folder run
(docs/sampling.md, chopping). Used by ``invsr-sr`` and the web demo.
"""

from __future__ import annotations

import gc
import warnings
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["OutOfMemoryFallbackError", "sample_with_fallback"]

# smallest LR patch worth trying; below this the patch overhead dominates and the image is better on CPU
MIN_CHOPPING_SIZE = 32
# chopping size tried first when the sampler ran the whole image in one pass (chopping_size None)
FIRST_CHOPPING_SIZE = 256


class _Sampler(Protocol):  # InvSRSampler's settable chopping attributes
    chopping_size: int | None
    chopping_batch: int
    modulus: int

    def __call__(self, lr: Tensor, generator: torch.Generator | None = None) -> Tensor: ...


class OutOfMemoryFallbackError(RuntimeError):
    """Still out of memory with one patch per call at the smallest patch size."""


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _smaller(sampler: _Sampler, lr: Tensor) -> str | None:
    """Lower the sampler's memory use one notch; returns what changed, or None when nothing is left."""
    if sampler.chopping_batch > 1:
        sampler.chopping_batch = max(1, sampler.chopping_batch // 2)
        return f"chopping batch {sampler.chopping_batch}"
    modulus = max(1, int(getattr(sampler, "modulus", 1)))
    size = sampler.chopping_size or min(FIRST_CHOPPING_SIZE * 2, max(lr.shape[-2:]))
    smaller = (size // 2) // modulus * modulus
    if smaller < max(MIN_CHOPPING_SIZE, modulus):
        return None
    sampler.chopping_size = smaller
    return f"chopping size {smaller}"


def sample_with_fallback(sampler: _Sampler, lq: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``sampler(lq, generator=generator)``, retried after ``torch.cuda.OutOfMemoryError`` with half the
    chopping batch (down to 1), then half the chopping size (a multiple of ``sampler.modulus``, down to
    :data:`MIN_CHOPPING_SIZE`), with a warning each time.

    The sampler keeps the reduced settings, so the next image starts from what fitted. Every retry restarts
    from the generator's state at the call, so the result depends only on the settings that succeeded.

    Args:
        sampler: an ``InvSRSampler`` (anything with settable ``chopping_size`` / ``chopping_batch``).
        lq: (B, 3, h, w) float in [0, 1].
        generator: the noise generator (or None).

    Returns:
        What the sampler returns: (B, 3, s*h, s*w) float32 in [0, 1].

    Raises:
        OutOfMemoryFallbackError: out of memory even at one patch per call at the smallest patch size.
    """
    state = generator.get_state() if generator is not None else None
    while True:
        try:
            return sampler(lq, generator=generator)
        except torch.cuda.OutOfMemoryError:
            pass  # leave the except block first: its traceback holds the frames (and tensors) to free
        _free_memory()
        change = _smaller(sampler, lq)
        if change is None:
            raise OutOfMemoryFallbackError(
                f"out of memory even with chopping batch 1 and chopping size {sampler.chopping_size}: "
                "use a smaller image, --dtype float16 or another device"
            )
        warnings.warn(f"out of memory while sampling: retrying with {change}", RuntimeWarning, stacklevel=2)
        if generator is not None and state is not None:
            generator.set_state(state)
