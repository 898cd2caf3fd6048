"""The work one demo request may ask for, counted from the image header and the settings before any work.

A request's cost is what the networks will process (docs/sampling.md): the LR image is padded up to the
chopping size and to the sampler's modulus, then either run whole (one "patch", the padded image) or cut into
``chopping_size`` patches at stride ``chopping_size // 2`` (so most pixels are processed about four times).
Each patch goes through the noise predictor, the VAE and one UNet call per timestep, so the work is

    work (megapixel-steps) = patches x patch pixels x timesteps / 1e6

:class:`RequestBudget` bounds the three numbers a hostile request can inflate: the timestep count, the patch
count (tiny patches multiply the per-call overhead) and the work. The defaults follow ``max_megapixels``: the
paper's 5-step schedule at the default chopping size on an image at the size limit fits, with a little room
for awkward aspect ratios, and nothing much above it does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from invsr_pl.sampling.tiling import patch_starts

__all__ = ["DEFAULT_CHOPPING", "DEFAULT_MAX_STEPS", "RequestBudget", "RequestCost", "request_cost"]

DEFAULT_CHOPPING = 128  # the page's and invsr-sr's default LR patch (docs/sampling.md)
DEFAULT_MAX_STEPS = 10  # twice the paper's largest schedule (5 steps); 1000 timesteps is a denial of service
# a square image at the size limit with 128-px patches: 961 patches and 19.7 MP-steps per MP at 5 steps
# (4 MP: 2000 x 2000 px, 31 x 31 patches); the factors leave ~6 % room for other aspect ratios
_PATCHES_PER_MP = 256
_WORK_PER_MP = 21.0


@dataclass(frozen=True)
class RequestCost:
    """What one image of a request will cost.

    Attributes:
        steps: number of timesteps (one UNet call per patch each).
        patches: patches the image is cut into (1 without chopping).
        work: patches x patch pixels x steps, in megapixel-steps (LR pixels, padding and overlap included).
    """

    steps: int
    patches: int
    work: float


def request_cost(width: int, height: int, steps: int, chopping_size: int | None, modulus: int) -> RequestCost:
    """The cost of super-resolving a ``width`` x ``height`` image (from its header) with these settings.

    Mirrors the sampler's padding and tiling (``InvSRSampler.__call__``, ``tiling.tiled_map``) without
    touching any pixel.

    Args:
        width, height: input size in pixels (>= 1).
        steps: number of timesteps.
        chopping_size: LR patch size, or None/0 for the whole image in one pass.
        modulus: the sampler's LR modulus (16 for SD-Turbo at x4).
    """
    chop = chopping_size or 0
    h, w = max(height, chop), max(width, chop)  # pad_to_min_size
    h, w = h + (-h % modulus), w + (-w % modulus)  # pad_to_multiple
    if chop:
        stride = chop // 2
        patches = len(patch_starts(h, chop, stride)) * len(patch_starts(w, chop, stride))
        pixels = patches * chop * chop
    else:
        patches, pixels = 1, h * w
    return RequestCost(steps=steps, patches=patches, work=pixels * steps / 1e6)


@dataclass(frozen=True)
class RequestBudget:
    """Upper bounds on one image's cost; :meth:`refusal` says in one line what a request exceeds.

    Attributes:
        max_steps: most timesteps per image (``--max-steps``).
        max_patches: most patches per image (``--max-patches``).
        max_work: most megapixel-steps per image (``--max-work``).
    """

    max_steps: int
    max_patches: int
    max_work: float

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.max_patches < 1 or not self.max_work > 0:
            raise ValueError(
                f"budget limits must be positive, got steps {self.max_steps}, patches {self.max_patches}, "
                f"work {self.max_work}"
            )

    @classmethod
    def for_size_limit(
        cls,
        max_megapixels: float,
        max_steps: int | None = None,
        max_patches: int | None = None,
        max_work: float | None = None,
    ) -> RequestBudget:
        """The default budget for a demo accepting images up to ``max_megapixels``; given limits win."""
        return cls(
            max_steps=DEFAULT_MAX_STEPS if max_steps is None else max_steps,
            max_patches=max(1, math.ceil(_PATCHES_PER_MP * max_megapixels))
            if max_patches is None
            else max_patches,
            max_work=_WORK_PER_MP * max_megapixels if max_work is None else max_work,
        )

    def refusal(self, cost: RequestCost) -> str | None:
        """None when ``cost`` fits; else one line naming the limit that was exceeded and what to change."""
        if cost.steps > self.max_steps:
            return (
                f"{cost.steps} timesteps requested; this demo runs at most {self.max_steps} per image "
                "(the paper uses 1 to 5)"
            )
        if cost.patches > self.max_patches:
            return (
                f"this image would be cut into {cost.patches} patches; this demo allows at most "
                f"{self.max_patches}: use a larger chopping size (128 is the default)"
            )
        if cost.work > self.max_work:
            return (
                f"this request is {cost.work:.1f} megapixel-steps of work (patch pixels x steps); this demo "
                f"allows at most {self.max_work:g}: use fewer steps, a smaller image or invsr-sr"
            )
        return None
