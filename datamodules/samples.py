"""Built-in sample photos from scikit-image (shipped inside the wheel: no download, no pooch).

Two datasets over them, so the quick start and the tests run with no data on disk:

- :class:`SampleGTImages` — HR training crops, like ``GTImageFolder``: ``{"gt": (3, gt_size, gt_size)}``.
- :class:`SamplePairs` — a paired val/test set synthesised on the fly and deterministically:
  ``{"lq": (3, gt_size/scale, gt_size/scale), "gt": (3, gt_size, gt_size), "name": str}``, float32 in [0, 1].
  GT is the centre crop; LQ comes from the ImageNet-Test degradation (docs/data.md#imagenet-test-synthesis)
  with a seed fixed per image (``stable_seed(seed, name)``), or from an antialiased bicubic downscale.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from datamodules.datasets import SeededDataset
from datamodules.transforms import RandomCropFlip, center_crop, to_float01
from invsr_pl.utils.seeding import stable_seed

__all__ = ["SAMPLE_PHOTOS", "SampleGTImages", "SamplePairs", "load_sample"]

# Natural photographs bundled with scikit-image 0.22+ (colour first). Sizes (H x W): astronaut 512x512,
# chelsea 300x451, coffee 400x600, rocket 427x640, immunohistochemistry 512x512, hubble_deep_field 872x1000,
# retina 1411x1411; grey, replicated to RGB: camera 512x512, moon 512x512, coins 303x384, clock 300x400.
# (eagle, brain, kidney, ... need pooch downloads and are left out.)
SAMPLE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "camera",
    "moon",
    "coins",
    "clock",
)


@functools.cache
def _load_uint8(name: str) -> Tensor:
    """(3, H, W) ``uint8``; cached and shared, so callers must not modify it in place."""
    import skimage.data

    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"unknown sample photo {name!r}; choose from {', '.join(SAMPLE_PHOTOS)}")
    array = np.asarray(getattr(skimage.data, name)())
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)  # grey -> RGB
    return torch.from_numpy(np.ascontiguousarray(array[:, :, :3])).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def load_sample(name: str) -> Tensor:
    """One bundled photo as an RGB (3, H, W) ``float32`` tensor in [0, 1] (a fresh tensor per call)."""
    return to_float01(_load_uint8(name))


def _select(names: Sequence[str] | None, num_images: int | None) -> list[str]:
    chosen = list(SAMPLE_PHOTOS if names is None else names)
    unknown = [n for n in chosen if n not in SAMPLE_PHOTOS]
    if unknown:
        raise ValueError(f"unknown sample photo(s) {unknown}; choose from {', '.join(SAMPLE_PHOTOS)}")
    if num_images is not None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1 or None, got {num_images}")
        chosen = chosen[:num_images]
    if not chosen:
        raise ValueError("no sample photos selected")
    return chosen


class SampleGTImages(SeededDataset):
    """The bundled photos as HR training images: random ``gt_size`` crops with flips (as ``GTImageFolder``).

    Args:
        names: photo names from :data:`SAMPLE_PHOTOS`; ``None`` = all.
        num_images: keep the first ``num_images`` names; ``None`` = all.
        gt_size: crop side (64 keeps CPU runs fast; photos smaller than that are reflect-padded).
        hflip_prob: left-right flip probability.
        repeat: each photo appears ``repeat`` times per epoch (the set is small).
        seed: seed of the crop/flip stream when used without ``SRDataModule``.

    Item: ``{"gt": (3, gt_size, gt_size) float32 in [0, 1]}``.
    """

    def __init__(
        self,
        names: Sequence[str] | None = None,
        num_images: int | None = None,
        gt_size: int = 64,
        hflip_prob: float = 0.5,
        repeat: int = 8,
        seed: int = 0,
    ) -> None:
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat}")
        self.names = _select(names, num_images)
        self.repeat = int(repeat)
        self.transform = RandomCropFlip(gt_size, hflip_prob)
        self.gt_size = int(gt_size)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.names) * self.repeat

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        name = self.names[index % len(self.names)]
        return {"gt": self.transform(_load_uint8(name), self.generator)}


class SamplePairs(Dataset):
    """The bundled photos as a deterministic paired set, synthesised when an item is read.

    GT = centre ``gt_size`` crop. LQ = ``degradation(gt, generator seeded with stable_seed(seed, name))``: the
    same pair on every run, machine and worker, independent of the item order.

    Args:
        names: photo names from :data:`SAMPLE_PHOTOS`; ``None`` = all.
        num_images: keep the first ``num_images`` names; ``None`` = all.
        gt_size: GT crop side; must divide by ``scale`` and fit in every selected photo (the smallest,
            chelsea, is 300 px high).
        scale: GT side / LQ side.
        lq_mode: ``"realesrgan"`` (ImageNet-Test preset, docs/data.md#imagenet-test-synthesis) or
            ``"bicubic"`` (antialiased, 8-bit).
        degradation: a module with the ``RealESRGANDegradation`` call signature to use instead of the
            ``lq_mode`` one (e.g. from ``conf/data/degradation``); its ``scale`` must equal ``scale``.
        seed: base seed of the per-image degradation.

    Item: ``{"lq": (3, gt_size/scale, gt_size/scale), "gt": (3, gt_size, gt_size), "name": str}``, float32 in
    [0, 1]; LQ values lie on the 8-bit grid.
    """

    LQ_MODES = ("realesrgan", "bicubic")

    def __init__(
        self,
        names: Sequence[str] | None = None,
        num_images: int | None = None,
        gt_size: int = 256,
        scale: int = 4,
        lq_mode: str = "realesrgan",
        degradation: nn.Module | None = None,
        seed: int = 0,
    ) -> None:
        self.names = _select(names, num_images)
        if gt_size < scale or gt_size % scale:
            raise ValueError(f"gt_size ({gt_size}) must be a positive multiple of scale ({scale})")
        too_small = [n for n in self.names if min(_load_uint8(n).shape[-2:]) < gt_size]
        if too_small:
            raise ValueError(f"gt_size {gt_size} is larger than the photo(s) {too_small}; lower gt_size")
        if lq_mode not in self.LQ_MODES:
            raise ValueError(f"lq_mode must be one of {self.LQ_MODES}, got {lq_mode!r}")
        if degradation is None:
            from datamodules.degradation.pipeline import BicubicDegradation, RealESRGANDegradation

            if lq_mode == "bicubic":
                degradation = BicubicDegradation(scale=scale)
            else:
                degradation = RealESRGANDegradation.imagenet_test(scale=scale)
        deg_scale = getattr(degradation, "scale", scale)
        if int(deg_scale) != scale:
            raise ValueError(f"degradation scale {deg_scale} differs from scale {scale}")
        self.gt_size = int(gt_size)
        self.scale = int(scale)
        self.lq_mode = lq_mode
        self.degradation = degradation
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        name = self.names[index]
        gt = center_crop(load_sample(name), self.gt_size).contiguous()  # (3, gt_size, gt_size)
        generator = torch.Generator().manual_seed(stable_seed(self.seed, name))
        with torch.no_grad():
            lq = self.degradation(gt.unsqueeze(0), generator=generator)[
                0
            ]  # (3, gt_size/scale, gt_size/scale)
        return {"lq": lq.contiguous(), "gt": gt, "name": name}

    def __repr__(self) -> str:
        return (
            f"SamplePairs({len(self)} photos, gt_size={self.gt_size}, scale={self.scale}, lq={self.lq_mode})"
        )
