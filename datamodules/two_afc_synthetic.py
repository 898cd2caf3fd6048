"""A tiny built-in 2AFC set synthesised from the sample photos (no download), for CPU runs and tests.

Each triplet (docs/latent_lpips.md, "Built-in synthetic set"):

1. ``ref``: a ``patch_size`` crop of a bundled photo (``datamodules.samples``) first scaled so its short side
   is ``photo_size`` (so that a 64-px patch holds structure, as BAPPS patches do).
2. ``p0``, ``p1``: ``ref`` distorted by a family of the triplet's category at a strength in (0, 1] drawn
   uniformly: ``blur`` (Gaussian, sigma 0.4..3 px), ``noise`` (Gaussian, sigma 0.02..0.25), ``jpeg`` (quality
   90..10), or, for ``mix``, two different families. Patches are rounded to 8 bits, as stored PNGs are.
3. ``judge``: the fraction of ``num_raters`` virtual raters who prefer p1, from a fixed reference distance
   ``D = 1 - SSIM``: ``round(num_raters * sigmoid((D(ref, p0) - D(ref, p1)) / temperature)) / num_raters``.

Item ``i`` depends only on (``seed``, ``i``) and the settings: the same triplet on every run, machine, worker.
Different ``names`` / ``seed`` give held-out triplets (the configs validate on photos never trained on).
``python -m datamodules.two_afc_synthetic --output DIR --split val`` writes a set in the BAPPS layout.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from typing import Any

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchmetrics.functional.image import structural_similarity_index_measure

from datamodules.degradation.ops import add_gaussian_noise, jpeg, quantize_8bit
from datamodules.samples import SAMPLE_PHOTOS, load_sample
from invsr_pl.utils.seeding import stable_seed

__all__ = ["DISTORTIONS", "SYNTHETIC_CATEGORIES", "SyntheticTwoAFC", "distort", "reference_distance"]

DISTORTIONS = ("blur", "noise", "jpeg")
SYNTHETIC_CATEGORIES = (*DISTORTIONS, "mix")


def distort(image: Tensor, family: str, strength: float, generator: torch.Generator) -> Tensor:
    """One distortion of ``image`` (1, 3, H, W) float in [0, 1] at ``strength`` in [0, 1] (0 = mildest).

    Returns (1, 3, H, W) float32 in [0, 1] (not quantised). ``noise`` draws from ``generator``; the others are
    deterministic. JPEG uses libjpeg on every device, so the result does not depend on the device.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if family == "blur":
        sigma = 0.4 + 2.6 * strength
        size = 2 * int(3 * sigma + 0.5) + 1
        out = kornia.filters.gaussian_blur2d(image, (size, size), (sigma, sigma), border_type="reflect")
    elif family == "noise":
        out = add_gaussian_noise(image, 0.02 + 0.23 * strength, False, generator)
    elif family == "jpeg":
        out = jpeg(image, round(90 - 80 * strength), codec="libjpeg")
    else:
        raise ValueError(f"unknown distortion {family!r}; choose from {DISTORTIONS}")
    return out.clamp(0.0, 1.0)


def reference_distance(ref: Tensor, other: Tensor) -> Tensor:
    """The fixed distance the synthetic judgments come from: ``1 - SSIM`` (Gaussian window 11, sigma 1.5).

    Args:
        ref, other: (B, 3, H, W) float in [0, 1].

    Returns:
        (B,) float32, 0 for identical patches, larger for more visible distortions.
    """
    ssim = structural_similarity_index_measure(other.float(), ref.float(), data_range=1.0, reduction="none")
    return 1.0 - ssim


@functools.cache
def _photo(name: str, photo_size: int) -> Tensor:
    """(3, H, W) float32 photo with short side ``photo_size`` (antialiased); cached, never modified."""
    image = load_sample(name)
    scale = photo_size / min(image.shape[-2:])
    size = (max(round(image.shape[-2] * scale), photo_size), max(round(image.shape[-1] * scale), photo_size))
    return F.interpolate(image[None], size=size, mode="bicubic", antialias=True)[0].clamp(0, 1)


class SyntheticTwoAFC(Dataset):
    """Deterministic 2AFC triplets from the bundled photos (see the module docstring), read like BAPPS.

    Args:
        names: photos from ``datamodules.samples.SAMPLE_PHOTOS`` to crop from; ``None`` = all.
        num_triplets: number of items.
        categories: a subset of :data:`SYNTHETIC_CATEGORIES`; item ``i`` has category ``i % len(categories)``.
        patch_size: side of the patches (64 as BAPPS).
        photo_size: short side the photos are scaled to before cropping (>= ``patch_size``).
        temperature: softness of the virtual raters, in units of the reference distance ``1 - SSIM``.
        num_raters: judgments are multiples of ``1 / num_raters`` (BAPPS val has 5 per triplet).
        seed: base seed; item ``i`` uses ``stable_seed(seed, "two_afc", i)``.
        cache: keep each synthesised triplet (as 8-bit patches, 36 KiB per triplet at 64 px) so later epochs
            read it instead of synthesising it again (same values: items are deterministic).

    Item: the format of :mod:`datamodules.two_afc` (``ref``, ``p0``, ``p1``, ``judge``, ``category``,
    ``name``).
    """

    def __init__(
        self,
        names: Sequence[str] | None = None,
        num_triplets: int = 256,
        categories: Sequence[str] = SYNTHETIC_CATEGORIES,
        patch_size: int = 64,
        photo_size: int = 256,
        temperature: float = 0.05,
        num_raters: int = 5,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.names = list(SAMPLE_PHOTOS if names is None else names)
        unknown = [n for n in self.names if n not in SAMPLE_PHOTOS]
        if unknown or not self.names:
            raise ValueError(f"unknown or no sample photos {unknown}; choose from {', '.join(SAMPLE_PHOTOS)}")
        bad = [c for c in categories if c not in SYNTHETIC_CATEGORIES]
        if bad or not categories:
            raise ValueError(f"unknown or no categories {bad}; choose from {SYNTHETIC_CATEGORIES}")
        if num_triplets < 1 or num_raters < 1 or temperature <= 0:
            raise ValueError("num_triplets and num_raters must be >= 1 and temperature > 0")
        if patch_size < 16 or photo_size < patch_size:
            raise ValueError(f"need 16 <= patch_size <= photo_size, got {patch_size} and {photo_size}")
        self.categories = list(categories)
        self.num_triplets = int(num_triplets)
        self.patch_size = int(patch_size)
        self.photo_size = int(photo_size)
        self.temperature = float(temperature)
        self.num_raters = int(num_raters)
        self.seed = int(seed)
        self.cache = bool(cache)
        self._cached: dict[int, tuple[Tensor, Tensor]] = {}  # index -> ((3, 3, P, P) uint8 patches, judge)

    def __len__(self) -> int:
        return self.num_triplets

    def _uniform(self, generator: torch.Generator) -> float:
        return float(torch.rand((), generator=generator))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_triplets:
            raise IndexError(f"index {index} out of range for {self.num_triplets} triplets")
        if index in self._cached:
            patches_u8, judge = self._cached[index]
            patches = patches_u8.float() / 255.0  # exact: the patches are on the 8-bit grid
        else:
            patches, judge = self._synthesise(index)
            if self.cache:
                self._cached[index] = ((patches * 255.0).round().to(torch.uint8), judge)
        category_index = index % len(self.categories)
        return {
            "ref": patches[0],
            "p0": patches[1],
            "p1": patches[2],
            "judge": judge.clone(),
            "category": torch.tensor(category_index, dtype=torch.int64),
            "name": f"{self.categories[category_index]}/{index:06d}",
        }

    def _synthesise(self, index: int) -> tuple[Tensor, Tensor]:
        """(3, 3, P, P) float32 patches ref, p0, p1 on the 8-bit grid, and the () float32 judgment."""
        g = torch.Generator().manual_seed(stable_seed(self.seed, "two_afc", index))
        category_index = index % len(self.categories)
        category = self.categories[category_index]
        name = self.names[int(torch.randint(len(self.names), (), generator=g))]
        photo = _photo(name, self.photo_size)
        top = int(torch.randint(photo.shape[-2] - self.patch_size + 1, (), generator=g))
        left = int(torch.randint(photo.shape[-1] - self.patch_size + 1, (), generator=g))
        ref = quantize_8bit(photo[None, :, top : top + self.patch_size, left : left + self.patch_size])
        if category == "mix":
            first = int(torch.randint(len(DISTORTIONS), (), generator=g))
            second = (first + 1 + int(torch.randint(len(DISTORTIONS) - 1, (), generator=g))) % len(
                DISTORTIONS
            )
            families = (DISTORTIONS[first], DISTORTIONS[second])
        else:
            families = (category, category)
        p0, p1 = (quantize_8bit(distort(ref, f, self._uniform(g), g)) for f in families)
        d = reference_distance(ref.expand(2, -1, -1, -1), torch.cat([p0, p1]))
        preference = torch.sigmoid((d[0] - d[1]) / self.temperature)  # P(p1 judged closer)
        judge = torch.round(preference * self.num_raters) / self.num_raters
        return torch.cat([ref, p0, p1]), judge.to(torch.float32)

    def __repr__(self) -> str:
        return (
            f"SyntheticTwoAFC({self.num_triplets} triplets from {len(self.names)} photos, {self.categories}, "
            f"seed={self.seed})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Write a synthetic set in the BAPPS layout. Exit codes: 0 written, 2 setup error (nothing written)."""
    from datamodules.two_afc import write_two_afc_tree

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder that receives 2afc/<split>/")
    parser.add_argument("--split", default="val")
    parser.add_argument("--num-triplets", type=int, default=256)
    parser.add_argument("--names", nargs="*", default=None, help=f"photos (default all): {SAMPLE_PHOTOS}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        dataset = SyntheticTwoAFC(names=args.names, num_triplets=args.num_triplets, seed=args.seed)
        target = write_two_afc_tree(dataset, args.output, args.split)
    except (ValueError, FileExistsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(dataset)} triplets to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
