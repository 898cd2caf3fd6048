"""Reflect padding by any amount: the one implementation for the sampler (tiling) and the data transforms."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["reflect_pad"]


def reflect_pad(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    """Reflect-pad ``x`` (B, C, H, W) or (C, H, W) by any amounts, even larger than the image.

    ``F.pad(mode="reflect")`` needs each pad < the size of its axis, so large pads are applied in rounds, each
    round reflecting the image grown by the previous one (the official sampler's padding loops,
    docs/sampling.md). Repeated reflect-101 equals OpenCV's periodic ``BORDER_REFLECT_101`` extension, so the
    result is that of one cv2 call (docs/data.md). An axis of length 1 cannot be reflected and is replicated.

    Returns a tensor of shape (..., H + top + bottom, W + left + right), same dtype/device.
    """
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"pads must be >= 0, got top={top} bottom={bottom} left={left} right={right}")
    if min(x.shape[-2:]) < 1:
        raise ValueError(f"cannot pad an empty image of shape {tuple(x.shape)}")
    if x.ndim == 3:  # F.pad's reflect/replicate modes want a batch dimension
        return reflect_pad(x.unsqueeze(0), top, bottom, left, right).squeeze(0)
    while top or bottom or left or right:
        h, w = x.shape[-2:]
        # per axis: reflect at most (length - 1) per round; a 1-pixel axis can only be replicated (any amount)
        t, b = (top, bottom) if h == 1 else (min(top, h - 1), min(bottom, h - 1))
        lf, r = (left, right) if w == 1 else (min(left, w - 1), min(right, w - 1))
        if t or b:
            x = F.pad(x, (0, 0, t, b), mode="replicate" if h == 1 else "reflect")
        if lf or r:
            x = F.pad(x, (lf, r, 0, 0), mode="replicate" if w == 1 else "reflect")
        top, bottom, left, right = top - t, bottom - b, left - lf, right - r
    return x
