"""CPU-side image transforms for the datasets: crop, flip, reflect padding, and stable seeds.

Every random choice takes an explicit ``torch.Generator`` so a dataset (or a test) controls its randomness;
nothing here touches Python's ``random`` or NumPy's global state (docs/data.md).

Images are CHW tensors: ``uint8`` in [0, 255] straight from the decoder, or ``float32`` in [0, 1]. Cropping
and flipping keep the dtype; padding and :func:`to_float01` return ``float32`` in [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from invsr_pl.utils.padding import reflect_pad

__all__ = [
    "RandomCropFlip",
    "center_crop",
    "random_crop",
    "random_hflip",
    "reflect_pad_to",
    "to_float01",
]


def to_float01(img: Tensor) -> Tensor:
    """``uint8`` [0, 255] or ``uint16`` [0, 65535] -> ``float32`` [0, 1]; floats are cast to ``float32``."""
    if img.dtype == torch.uint8:
        return img.to(torch.float32).div_(255.0)
    if img.dtype == torch.uint16:
        return img.to(torch.float32).div_(65535.0)
    if not img.is_floating_point():
        raise TypeError(f"expected a uint8, uint16 or floating image, got {img.dtype}")
    return img.to(torch.float32)


def reflect_pad_to(img: Tensor, height: int, width: int) -> Tensor:
    """Pad the bottom and right edges by reflection until the image is at least ``height x width``.

    This is OpenCV's ``BORDER_REFLECT_101`` (edge pixel not repeated; torch calls it "reflect") on the
    bottom/right, as in docs/data.md, by ``invsr_pl.utils.padding.reflect_pad`` (any pad size;
    a side of 1 px is replicated).

    Args:
        img: (C, H, W), any dtype (converted to ``float32`` [0, 1] when padding is needed).
        height, width: minimum output size.

    Returns:
        (C, max(H, height), max(W, width)); the input itself when no padding is needed.
    """
    if img.ndim != 3:
        raise ValueError(f"expected a (C, H, W) image, got shape {tuple(img.shape)}")
    h, w = img.shape[-2:]
    if h >= height and w >= width:
        return img
    return reflect_pad(to_float01(img), 0, max(0, height - h), 0, max(0, width - w))


def random_crop(img: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly placed ``size x size`` crop; a side shorter than ``size`` is reflect-padded (docs/data.md).

    Cropping happens before padding, which gives the same pixels as BasicSR's pad-then-crop (the padded axis
    has a single crop position) while converting only the crop, not the whole decoded image, to float.

    Args:
        img: (C, H, W) ``uint8`` or float.
        size: crop side in pixels.
        generator: CPU generator for the offsets.

    Returns:
        (C, size, size); same dtype as ``img`` unless padding was needed (then ``float32`` [0, 1]).
    """
    return reflect_pad_to(_random_window(img, size, generator), size, size)


def _random_window(img: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
    """A uniformly placed window of at most ``size x size`` (a shorter side is kept whole). No copy."""
    h, w = img.shape[-2:]
    top = int(torch.randint(0, h - size + 1, (1,), generator=generator)) if h > size else 0
    left = int(torch.randint(0, w - size + 1, (1,), generator=generator)) if w > size else 0
    return img[..., top : top + size, left : left + size]


def random_hflip(img: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror left-right with probability ``p`` (docs/data.md, ``use_hflip``). (C, H, W) -> (C, H, W)."""
    if p <= 0.0:
        return img
    if float(torch.rand((), generator=generator)) < p:
        return img.flip(-1)
    return img


def center_crop(img: Tensor, size: int) -> Tensor:
    """The central ``size x size`` window (top/left offsets rounded down). (C, H, W) -> (C, size, size).

    Raises:
        ValueError: when a side is shorter than ``size``.
    """
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {h}x{w} image")
    top, left = (h - size) // 2, (w - size) // 2
    return img[..., top : top + size, left : left + size]


class RandomCropFlip:
    """The training-time GT transform of docs/data.md: hflip (p) then a ``size`` crop, reflect-padded.

    Args:
        size: crop side (the paper trains on 512).
        hflip_prob: probability of a left-right flip (0.5 in the paper; no rotation).

    Call: ``(img (C, H, W) uint8 or float, generator) -> (C, size, size) float32 in [0, 1]``.
    """

    def __init__(self, size: int, hflip_prob: float = 0.5) -> None:
        if size <= 0:
            raise ValueError(f"crop size must be positive, got {size}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.size = int(size)
        self.hflip_prob = float(hflip_prob)

    def __call__(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # The reference flips the whole image, pads bottom/right, then crops (docs/data.md). Cropping the
        # window first, flipping it, then padding it gives the same distribution of outputs (padding still
        # lands bottom/right) while touching only crop-sized memory.
        flip = self.hflip_prob > 0.0 and float(torch.rand((), generator=generator)) < self.hflip_prob
        crop = _random_window(img, self.size, generator)
        if flip:
            crop = crop.flip(-1)
        return reflect_pad_to(to_float01(crop), self.size, self.size).contiguous()

    def __repr__(self) -> str:
        return f"RandomCropFlip(size={self.size}, hflip_prob={self.hflip_prob})"
