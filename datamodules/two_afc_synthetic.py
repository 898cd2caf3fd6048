"""A tiny built-in 2AFC set synthesised from the sample photos (no download), for CPU runs and tests.

It is built to be a learning problem, as BAPPS is: the judgments come from a fixed *human-like* reference that
weighs distortion types differently from a naive pixel or feature distance, so an untrained metric ranks the
triplets poorly and has something to learn (docs/latent_lpips.md, "Built-in synthetic set").

Each triplet:

1. ``ref``: a ``patch_size`` crop of a bundled photo (``datamodules.samples``) first scaled so its short side
   is ``photo_size`` (so that a 64-px patch holds structure, as BAPPS patches do).
2. ``p0``, ``p1``: ``ref`` with two *different structural* distortions, drawn from ``blur`` (Gaussian, sigma
   0.5..2.5 px), ``noise`` (Gaussian, sigma 0.01..0.12) and ``jpeg`` (quality 60..5), at strengths drawn
   uniformly in [0, 1] (:func:`distort`). In the ``tone`` and ``colour`` categories one of the two (drawn)
   also gets a *benign* change first, at its own drawn strength: ``tone`` (global brightness offset and
   contrast gain) or ``colour`` (a white-balance cast: per-channel gain and offset). Benign changes move many
   pixels a lot but matter little to people. ``mix`` has no benign change. Patches are rounded to 8 bits, as
   stored PNGs are.
3. ``judge``: the fraction of a simulated panel of ``num_raters`` raters who pick p1. Each rater picks p1 with
   probability ``sigmoid((D(ref, p0) - D(ref, p1)) / temperature)``; the votes are drawn from the item's
   generator, so judgments are soft and noisy, as BAPPS' are. ``D`` is :func:`reference_distance`, a fixed
   human-like distance: the structural error left after the best global per-channel tone fit, plus a small
   charge for the tone change. It encodes what people report, and what BAPPS' judgments show: global
   brightness, contrast and colour changes are forgiven far more than noise, blur or blocking of the same
   pixel magnitude. A naive distance (pixels, or the latents of a VAE, which change a lot with tone) counts
   the benign change fully, so an untrained metric ranks the ``tone`` and ``colour`` triplets poorly and
   has something to learn.

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

from datamodules.degradation.ops import add_gaussian_noise, jpeg, quantize_8bit
from datamodules.samples import SAMPLE_PHOTOS, load_sample
from invsr_pl.utils.seeding import stable_seed

__all__ = [
    "BENIGN",
    "DISTORTIONS",
    "MARGIN",
    "STRUCTURAL",
    "SYNTHETIC_CATEGORIES",
    "SyntheticTwoAFC",
    "distort",
    "reference_distance",
]

BENIGN = ("tone", "colour")
STRUCTURAL = ("blur", "noise", "jpeg")
DISTORTIONS = (*BENIGN, *STRUCTURAL)
SYNTHETIC_CATEGORIES = ("tone", "colour", "mix")
MARGIN = 4  # px of real photo content around each patch while it is distorted (no padding in the filters)

# The reference's charge per unit RMS of the tone change its fit removed; the structural residual counts 1
# per unit RMS (docs/latent_lpips.md, "Built-in synthetic set").
TONE_CHARGE = 0.15
# The tone fit's gain is pulled towards 1 (ridge, in variance units) and kept in this range, so that noise on
# a flat patch cannot be "explained" as a contrast change.
GAIN_RIDGE = 0.01
GAIN_RANGE = (0.7, 1.4)


def _signed(generator: torch.Generator) -> float:
    return 1.0 if float(torch.rand((), generator=generator)) < 0.5 else -1.0


def distort(image: Tensor, family: str, strength: float, generator: torch.Generator) -> Tensor:
    """One distortion of ``image`` (1, 3, H, W) float in [0, 1] at ``strength`` in [0, 1] (0 = mildest).

    ``tone``: brightness offset +-(0.03..0.15) and contrast gain around the mean 1 +-(0..0.2); ``colour``:
    per-channel gains 1 +-(0.03..0.18) and offsets +-(0..0.06); ``blur``, ``noise``, ``jpeg``: see the module
    docstring. Signs, the split of the gains and the noise come from ``generator``; JPEG uses libjpeg on every
    device, so the result does not depend on the device.

    Returns:
        (1, 3, H, W) float32 in [0, 1] (not quantised).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if family == "tone":
        offset = _signed(generator) * (0.03 + 0.12 * strength)
        gain = 1.0 + _signed(generator) * 0.2 * float(torch.rand((), generator=generator)) * strength
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        out = (image - mean) * gain + mean + offset
    elif family == "colour":
        signs = torch.where(torch.rand(3, generator=generator) < 0.5, -1.0, 1.0)
        gains = 1.0 + signs * (0.03 + 0.15 * strength) * (0.5 + 0.5 * torch.rand(3, generator=generator))
        offsets = (torch.rand(3, generator=generator) * 2 - 1) * 0.06 * strength
        out = image * gains.view(1, 3, 1, 1) + offsets.view(1, 3, 1, 1)
    elif family == "blur":
        sigma = 0.5 + 2.0 * strength
        size = 2 * int(3 * sigma + 0.5) + 1
        out = kornia.filters.gaussian_blur2d(image, (size, size), (sigma, sigma), border_type="reflect")
    elif family == "noise":
        out = add_gaussian_noise(image, 0.01 + 0.11 * strength, False, generator)
    elif family == "jpeg":
        out = jpeg(image, round(60 - 55 * strength), codec="libjpeg")
    else:
        raise ValueError(f"unknown distortion {family!r}; choose from {DISTORTIONS}")
    return out.clamp(0.0, 1.0).float()


def reference_distance(ref: Tensor, other: Tensor) -> Tensor:
    """The fixed human-like distance the synthetic judgments come from (see the module docstring).

    ``other`` is fitted to ``ref`` per channel by ``gain * (other - mean) + mean(ref)`` (least squares, the
    gain pulled towards 1 and kept in ``GAIN_RANGE`` so that noise on a flat patch is not taken for a
    contrast change). The distance is ``RMS(ref - fit) + TONE_CHARGE * RMS(fit - other)``: the structure
    the fit cannot explain counts fully, the tone change it removed only a little.

    Args:
        ref, other: (B, 3, H, W) float in [0, 1].

    Returns:
        (B,) float32, 0 for identical patches, larger for more objectionable distortions.
    """
    target, x = ref.float(), other.float()
    xm, tm = x.mean(dim=(2, 3), keepdim=True), target.mean(dim=(2, 3), keepdim=True)
    cov = ((x - xm) * (target - tm)).mean(dim=(2, 3), keepdim=True)
    var = (x - xm).square().mean(dim=(2, 3), keepdim=True)
    gain = ((cov + GAIN_RIDGE) / (var + GAIN_RIDGE)).clamp(*GAIN_RANGE)
    fit = gain * (x - xm) + tm
    structure = (target - fit).square().mean(dim=(1, 2, 3)).sqrt()
    tone = (fit - x).square().mean(dim=(1, 2, 3)).sqrt()
    return structure + TONE_CHARGE * tone


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
        photo_size: short side the photos are scaled to before cropping (>= ``patch_size`` + 2 ``MARGIN``).
        temperature: softness of the simulated raters, in units of :func:`reference_distance`.
        num_raters: size of the simulated panel; judgments are multiples of ``1 / num_raters`` (BAPPS val
            has 5 raters per triplet).
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
        temperature: float = 0.01,
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
        if patch_size < 16 or photo_size < patch_size + 2 * MARGIN:
            raise ValueError(
                f"need 16 <= patch_size <= photo_size - {2 * MARGIN}, got {patch_size} and {photo_size}"
            )
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

    def families(self, index: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The distortion kinds of p0 and p1 of item ``index``, each in the order applied (e.g.
        ``(("tone", "blur"), ("noise",))``); drawn first from the item's generator."""
        return self._families(self.categories[index % len(self.categories)], self._generator(index))

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(stable_seed(self.seed, "two_afc", index))

    @staticmethod
    def _families(category: str, g: torch.Generator) -> tuple[tuple[str, ...], tuple[str, ...]]:
        first = int(torch.randint(len(STRUCTURAL), (), generator=g))
        second = (first + 1 + int(torch.randint(len(STRUCTURAL) - 1, (), generator=g))) % len(STRUCTURAL)
        pair: tuple[tuple[str, ...], tuple[str, ...]] = ((STRUCTURAL[first],), (STRUCTURAL[second],))
        if category != "mix":  # the benign change goes on top of one side's structural distortion
            side = int(float(torch.rand((), generator=g)) < 0.5)
            pair = tuple((category, *p) if k == side else p for k, p in enumerate(pair))
        return pair

    def _synthesise(self, index: int) -> tuple[Tensor, Tensor]:
        """(3, 3, P, P) float32 patches ref, p0, p1 on the 8-bit grid, and the () float32 judgment."""
        g = self._generator(index)
        families = self._families(self.categories[index % len(self.categories)], g)
        name = self.names[int(torch.randint(len(self.names), (), generator=g))]
        photo = _photo(name, self.photo_size)
        m, p = MARGIN, self.patch_size
        # the patch with a margin of real content around it: the filters see the photo, not padding
        top = int(torch.randint(photo.shape[-2] - p - 2 * m + 1, (), generator=g))
        left = int(torch.randint(photo.shape[-1] - p - 2 * m + 1, (), generator=g))
        region = quantize_8bit(photo[None, :, top : top + p + 2 * m, left : left + p + 2 * m])
        patches = []
        for kinds in families:
            out = region
            for kind in kinds:
                out = distort(out, kind, float(torch.rand((), generator=g)), g)
            patches.append(quantize_8bit(out[..., m : m + p, m : m + p]))
        p0, p1 = patches
        ref = region[..., m : m + p, m : m + p]
        d = reference_distance(ref.expand(2, -1, -1, -1), torch.cat([p0, p1]))
        preference = torch.sigmoid((d[0] - d[1]) / self.temperature)  # P(a rater picks p1)
        votes = (torch.rand(self.num_raters, generator=g) < preference).sum()
        judge = votes.to(torch.float32) / self.num_raters
        return torch.cat([ref, p0, p1]), judge

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
