"""Padding, overlapping-patch splitting and Gaussian-weighted blending for the tiled sampler.

All functions work on image batches ``(B, C, H, W)`` of any float dtype and never change value ranges.
The patch machinery is independent of InvSR: :func:`tiled_map` applies any ``fn`` that maps a batch of
``(N, C, p, p)`` patches to ``(N, C', s*p, s*p)`` and blends the results (docs/sampling.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from invsr_pl.utils.padding import reflect_pad

__all__ = [
    "gaussian_weights",
    "required_multiple",
    "pad_to_min_size",
    "pad_to_multiple",
    "patch_starts",
    "tiled_map",
]


def pad_to_min_size(x: Tensor, min_size: int) -> tuple[Tensor, int, int]:
    """Reflect-pad ``x`` (B, C, H, W) symmetrically so that H and W are at least ``min_size``.

    Returns ``(padded, top, left)``: the total pads added above and to the left, accumulated over every
    round of looping reflect padding, so that the original occupies ``padded[..., top:top+H, left:left+W]``
    (docs/sampling.md; the official code lost earlier rounds before its PR #51).
    """
    h, w = x.shape[-2:]
    need_h, need_w = max(min_size - h, 0), max(min_size - w, 0)
    top, left = need_h // 2, need_w // 2
    return reflect_pad(x, top, need_h - top, left, need_w - left), top, left


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pad ``x`` (B, C, H, W) bottom/right to the next multiple of ``multiple`` (docs/sampling.md)."""
    h, w = x.shape[-2:]
    return reflect_pad(x, 0, -h % multiple, 0, -w % multiple)


def patch_starts(length: int, patch: int, stride: int) -> list[int]:
    """Start offsets of patches of size ``patch`` covering ``[0, length)`` with the given stride.

    A single 0 when ``length <= patch``; otherwise 0, stride, 2*stride, ... with the last start clamped to
    ``length - patch`` so no patch overruns, duplicates removed (docs/sampling.md).
    """
    if patch <= 0 or stride <= 0:
        raise ValueError(f"patch and stride must be positive, got patch={patch} stride={stride}")
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch, stride)) + [length - patch]
    return list(dict.fromkeys(starts))


def gaussian_weights(
    size: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """(size, size) blending weights: outer product of two 1-D Gaussians, peak 1 (docs/sampling.md).

    sigma = 0.3 * ((size - 1) / 2 - 1) + 0.8 (OpenCV's default-sigma formula, 77.15 for 512). For even sizes
    the Gaussian is sampled on size + 1 taps centred at size / 2 and the first tap is dropped, so the peak
    sits at index size / 2 - 1 and the edge/peak ratio is about 0.004 for 512.
    """
    sigma = 0.3 * ((size - 1) / 2 - 1) + 0.8
    taps = size + 1 if size % 2 == 0 else size
    offsets = torch.arange(taps, dtype=torch.float64) - (taps - 1) / 2
    g = torch.exp(-(offsets**2) / (2 * sigma**2))
    g = g[1:] if size % 2 == 0 else g
    g = g / g.max()
    return torch.outer(g, g).to(dtype=dtype, device=device)


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    # docs/sampling.md: blending accumulates in float64; MPS has no float64, float32 is ample there
    return torch.float32 if device.type == "mps" else torch.float64


def tiled_map(
    x: Tensor,
    fn: Callable[[Tensor], Tensor],
    patch_size: int,
    scale: int,
    stride: int | None = None,
    batch_size: int = 8,
) -> Tensor:
    """Apply ``fn`` to overlapping ``patch_size`` patches of ``x`` and blend the ``scale``x larger outputs.

    Args:
        x: (B, C, H, W) with H, W >= patch_size (pad first with :func:`pad_to_min_size`).
        fn: maps (N, C, p, p) -> (N, C', s*p, s*p); called on at most ``batch_size`` patches at a time, in a
            fixed order (image 0 row by row, then image 1, ...), so a seeded ``fn`` stays deterministic.
        patch_size: LR patch size p. stride: defaults to p // 2 (docs/sampling.md).
        batch_size: patches per ``fn`` call (``chopping_batch``).

    Returns:
        (B, C', s*H, s*W) float32: sum(patch * W) / sum(W) with Gaussian weights W (sampling.md), accumulated
        in float64. A single patch covering the image is returned as ``fn`` computed it (weights cancel).
    """
    if x.ndim != 4:
        raise ValueError(f"expected (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    if h < patch_size or w < patch_size:
        raise ValueError(f"image {h}x{w} is smaller than the patch size {patch_size}; pad it first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stride = patch_size // 2 if stride is None else stride
    ys, xs = patch_starts(h, patch_size, stride), patch_starts(w, patch_size, stride)
    boxes = [(i, y, xx) for i in range(b) for y in ys for xx in xs]
    if len(boxes) == b:  # one patch per image: no blending needed
        return torch.cat([fn(chunk).float() for chunk in x.split(batch_size)])

    hp = scale * patch_size
    acc_dtype = _accumulation_dtype(x.device)
    weight = gaussian_weights(hp, dtype=acc_dtype, device=x.device)
    out: Tensor | None = None
    count = torch.zeros(1, 1, scale * h, scale * w, dtype=acc_dtype, device=x.device)
    for i in range(len(xs) * len(ys)):  # the weight sum is the same for every image of the batch
        y, xx = ys[i // len(xs)], xs[i % len(xs)]
        count[..., scale * y : scale * y + hp, scale * xx : scale * xx + hp] += weight
    for k in range(0, len(boxes), batch_size):
        chunk = boxes[k : k + batch_size]
        patches = torch.stack([x[i, :, y : y + patch_size, xx : xx + patch_size] for i, y, xx in chunk])
        result = fn(patches)
        if result.shape[-2:] != (hp, hp):
            raise ValueError(f"fn returned patches of size {tuple(result.shape[-2:])}, expected {(hp, hp)}")
        if out is None:
            out = torch.zeros(b, result.shape[1], scale * h, scale * w, dtype=acc_dtype, device=x.device)
        result = result.to(acc_dtype) * weight
        for j, (i, y, xx) in enumerate(chunk):
            out[i, :, scale * y : scale * y + hp, scale * xx : scale * xx + hp] += result[j]
    assert out is not None
    return (out / count).float()


def required_multiple(vae_scale_factor: int, unet_scale_factor: int, scale: int) -> int:
    """LR modulus so that ``scale * h`` is a multiple of ``vae_scale_factor * unet_scale_factor``.

    16 for SD-Turbo at x4 (8 * 8 / 4; docs/sampling.md).
    """
    hr_mod = vae_scale_factor * unet_scale_factor
    return hr_mod // math.gcd(hr_mod, scale)
