"""Colour correction of an SR result against the upsampled LR image (docs/sampling.md).

All functions take float tensors (B, 3, H, W) (``sr`` in [0, 1] and its same-size reference ``ref``, about
[0, 1], see :func:`upsample_reference`) and return float32 (B, 3, H, W) in [0, 1]. The reference must be
*aligned* with ``sr``: build it with :func:`upsample_reference` from the unpadded LR (the official code used
the padded LR, docs/deviations.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "COLOR_FIX_METHODS",
    "adain_color_fix",
    "apply_color_fix",
    "rgb_to_ycbcr_bt601",
    "upsample_reference",
    "wavelet_color_fix",
    "ycbcr_bt601_to_rgb",
    "ycbcr_color_fix",
]

COLOR_FIX_METHODS = ("none", "wavelet", "ycbcr", "adain")

# MATLAB rgb2ycbcr (BT.601 studio swing) on RGB in [0, 1]; outputs in [0, 1] (docs/sampling.md)
_RGB_TO_YCBCR = (
    torch.tensor(
        [
            [65.481, 128.553, 24.966],
            [-37.797, -74.203, 112.0],
            [112.0, -93.786, -18.214],
        ],
        dtype=torch.float64,
    )
    / 255.0
)
_YCBCR_OFFSET = torch.tensor([16.0, 128.0, 128.0], dtype=torch.float64) / 255.0
# MATLAB ycbcr2rgb: the exact inverse of the matrix above, written out as in docs/sampling.md (rows R, G, B)
_YCBCR_TO_RGB = (
    torch.tensor(
        [
            [0.00456621, 0.0, 0.00625893],
            [0.00456621, -0.00153632, -0.00318811],
            [0.00456621, 0.00791071, 0.0],
        ],
        dtype=torch.float64,
    )
    * 255.0
)
_RGB_OFFSET = torch.tensor([-222.921, 135.576, -276.836], dtype=torch.float64) / 255.0


def _check_pair(sr: Tensor, ref: Tensor) -> None:
    if sr.ndim != 4 or sr.shape[1] != 3:
        raise ValueError(f"expected sr of shape (B, 3, H, W), got {tuple(sr.shape)}")
    if ref.shape != sr.shape:
        raise ValueError(f"reference shape {tuple(ref.shape)} must equal the SR shape {tuple(sr.shape)}")


def _color_matrix(x: Tensor, matrix: Tensor, offset: Tensor) -> Tensor:
    m = matrix.to(device=x.device, dtype=torch.float32)
    o = offset.to(device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return torch.einsum("ij,bjhw->bihw", m, x.float()) + o


def rgb_to_ycbcr_bt601(rgb: Tensor) -> Tensor:
    """RGB (B, 3, H, W) in [0, 1] -> YCbCr studio swing (Y in [16, 235]/255, CbCr [16, 240]/255), clamped."""
    return _color_matrix(rgb, _RGB_TO_YCBCR, _YCBCR_OFFSET).clamp(0.0, 1.0)


def ycbcr_bt601_to_rgb(ycbcr: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_ycbcr_bt601` (MATLAB ycbcr2rgb), clamped to [0, 1]."""
    return _color_matrix(ycbcr, _YCBCR_TO_RGB, _RGB_OFFSET).clamp(0.0, 1.0)


def ycbcr_color_fix(sr: Tensor, ref: Tensor) -> Tensor:
    """Luma (Y) from ``sr``, chroma (Cb, Cr) from ``ref`` (docs/sampling.md)."""
    _check_pair(sr, ref)
    y = rgb_to_ycbcr_bt601(sr)[:, :1]
    cbcr = rgb_to_ycbcr_bt601(ref)[:, 1:]
    return ycbcr_bt601_to_rgb(torch.cat([y, cbcr], dim=1))


def _wavelet_low(x: Tensor, levels: int = 5) -> Tensor:
    """Low-frequency part after ``levels`` dilated 3x3 binomial blurs (à trous cascade, r = 1, 2, 4, ...)."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], device=x.device) / 16.0
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    low = x.float()
    for level in range(levels):
        r = 2**level
        # replicate padding r keeps the size for a dilation-r 3x3 kernel (docs/sampling.md)
        low = F.conv2d(F.pad(low, (r, r, r, r), mode="replicate"), kernel, dilation=r, groups=x.shape[1])
    return low


def wavelet_color_fix(sr: Tensor, ref: Tensor, levels: int = 5) -> Tensor:
    """High frequencies of ``sr`` plus the low frequencies of ``ref`` after a 5-level cascade (sampling.md).

    The high part telescopes: sum_i (low_i - low_{i+1}) = x - low_5, so output = sr - low5(sr) + low5(ref);
    the cascade (convolutions with replicate padding) is linear, so that is sr + low5(ref - sr): one cascade.
    """
    _check_pair(sr, ref)
    sr32 = sr.float()
    return (sr32 + _wavelet_low(ref.float() - sr32, levels)).clamp(0.0, 1.0)


def adain_color_fix(sr: Tensor, ref: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-image, per-channel mean/std matching of ``sr`` to ``ref`` (adaptive instance normalisation)."""
    _check_pair(sr, ref)
    sr32, ref32 = sr.float(), ref.float()
    sr_mean, sr_std = sr32.mean(dim=(2, 3), keepdim=True), sr32.std(dim=(2, 3), keepdim=True)
    ref_mean, ref_std = ref32.mean(dim=(2, 3), keepdim=True), ref32.std(dim=(2, 3), keepdim=True)
    return ((sr32 - sr_mean) / (sr_std + eps) * ref_std + ref_mean).clamp(0.0, 1.0)


def upsample_reference(lr: Tensor, size: tuple[int, int]) -> Tensor:
    """The colour reference: ``lr`` (B, 3, h, w) in [0, 1] bicubic-resized (antialias) to ``size`` = (H, W).

    Use the unpadded LR and the unpadded SR size so the reference is aligned (docs/deviations.md).
    Returns float32, *not* clamped: bicubic overshoots [0, 1] slightly at edges and, as in the official
    code, the overshoot goes into the wavelet and YCbCr fixes unchanged (their outputs are clamped). A
    caller that shows or scores this image as a bicubic baseline clamps it itself.
    """
    return F.interpolate(lr.float(), size=size, mode="bicubic", align_corners=False, antialias=True)


def apply_color_fix(sr: Tensor, lq_up: Tensor, method: str = "none") -> Tensor:
    """Dispatch on ``method`` in :data:`COLOR_FIX_METHODS`; ``"none"`` returns ``sr`` unchanged (as float32).

    Args:
        sr: (B, 3, H, W) float in [0, 1]; lq_up: the aligned reference of the same shape (see
            :func:`upsample_reference`). Returns (B, 3, H, W) float32 in [0, 1].
    """
    if method == "none":
        return sr.float()
    if method == "wavelet":
        return wavelet_color_fix(sr, lq_up)
    if method == "ycbcr":
        return ycbcr_color_fix(sr, lq_up)
    if method == "adain":
        return adain_color_fix(sr, lq_up)
    raise ValueError(f"unknown colour fix {method!r}; choose one of {', '.join(COLOR_FIX_METHODS)}")
