"""Build a synthetic paired test set (``gt/``, ``lq/``, ``params/``) from a folder of HR images.

The ImageNet-Test recipe (docs/data.md#imagenet-test-synthesis), made reproducible::

    python -m datamodules.make_testset --input HR_DIR --output OUT [--size 512 --scale 4 --seed 0
        --preset imagenet_test_x4 --num-images N --recursive]

Per image: short side resized to ``size`` with an area filter (downscaling only: a source whose short side is
below ``size`` is skipped and counted, because the official ``SmallestMaxSize`` would enlarge it with a filter
that then acts like nearest neighbour), centre ``size`` crop, rounded to 8 bit, then the
test degradation with a generator seeded from ``stable_seed(seed, stem)``. Each image's result depends only
on its own pixels, its stem and ``seed``, so the output is identical byte for byte on every run (the official
script seeds only Python's ``random`` and is not reproducible). Sampled parameters go to
``params/<stem>.json``; ``summary.json`` lists what was written and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from datamodules.transforms import center_crop
from invsr_pl.utils.images import IMAGE_EXTENSIONS, ImageReadError, list_images, read_image, write_image
from invsr_pl.utils.seeding import stable_seed

__all__ = [
    "PRESETS",
    "area_resize_short_side",
    "build_degradation",
    "canonical_preset",
    "main",
    "make_testset",
]

PRESETS: tuple[str, ...] = ("imagenet_test", "realesrgan", "bicubic")


def canonical_preset(preset: str, scale: int) -> str:
    """``imagenet_test_x4`` -> ``imagenet_test`` (suffix must match ``scale``); checks the name."""
    match = re.fullmatch(r"(.+)_x(\d+)", preset)
    name = preset
    if match is not None:
        name, suffix_scale = match.group(1), int(match.group(2))
        if suffix_scale != scale:
            raise ValueError(f"preset {preset!r} is for scale {suffix_scale}, but --scale is {scale}")
    if name not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r}; choose from {', '.join(PRESETS)} (optionally with _x{scale})"
        )
    return name


def build_degradation(preset: str, scale: int) -> nn.Module:
    """The degradation for ``preset``: ``imagenet_test`` (docs/data.md#imagenet-test-synthesis),
    ``realesrgan`` (the training recipe, docs/data.md#degradation-pipeline) or ``bicubic``.

    A ``_x<scale>`` suffix (``imagenet_test_x4``) is accepted and must agree with ``scale``.
    """
    from datamodules.degradation.pipeline import BicubicDegradation, RealESRGANDegradation

    name = canonical_preset(preset, scale)
    if name == "imagenet_test":
        return RealESRGANDegradation.imagenet_test(scale=scale)
    if name == "realesrgan":
        return RealESRGANDegradation(scale=scale)
    return BicubicDegradation(scale=scale)


def area_resize_short_side(img: Tensor, size: int) -> Tensor:
    """Downscale so the short side equals ``size`` with an exact area (box) filter, like cv2 ``INTER_AREA``.

    Pillow's BOX filter on 32-bit float channels averages with fractional pixel weights, as INTER_AREA does
    when shrinking. The long side becomes ``round(long * size / short)``.

    Args:
        img: (3, H, W) float32 in [0, 1] with ``min(H, W) >= size``.

    Returns:
        (3, h, w) float32 in [0, 1] with ``min(h, w) == size``; the input itself if already that size.
    """
    h, w = img.shape[-2:]
    short = min(h, w)
    if short < size:
        raise ValueError(f"area_resize_short_side only shrinks: short side {short} < {size}")
    if short == size:
        return img
    new_h, new_w = (size, round(w * size / h)) if h <= w else (round(h * size / w), size)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((new_w, new_h), Image.Resampling.BOX))
        for c in img.numpy().astype(np.float32)
    ]
    return torch.from_numpy(np.stack(channels)).clamp_(0.0, 1.0)


def _json_ready(value: Any) -> Any:
    if isinstance(value, Tensor):
        return _json_ready(value.detach().cpu().tolist())
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else str(value)
    return value


def _per_image_params(degradation: nn.Module, params: dict[str, Tensor]) -> dict[str, Any]:
    """The sampled parameters of a one-image batch as a JSON-ready dict."""
    split = getattr(degradation, "per_image_params", None)
    if split is not None:
        return _json_ready(split(params)[0])
    return {k: _json_ready(v[0] if isinstance(v, Tensor) and v.ndim > 0 else v) for k, v in params.items()}


def _dump_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_testset(
    input_dir: str | Path,
    output_dir: str | Path,
    size: int = 512,
    scale: int = 4,
    seed: int = 0,
    preset: str = "imagenet_test",
    num_images: int | None = None,
    recursive: bool = False,
    overwrite: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Write ``output_dir/{gt,lq,params}/<stem>.{png,png,json}`` and ``output_dir/summary.json``.

    Args:
        input_dir: folder of HR images (png/jpg/jpeg/bmp/webp/tif).
        output_dir: destination; must not already hold a test set unless ``overwrite``.
        size: GT side (crop); a multiple of ``scale``. LQ side = ``size / scale``.
        scale: downscaling factor.
        seed: base seed; image ``stem`` uses ``stable_seed(seed, stem)``.
        preset: degradation preset (see :func:`build_degradation`).
        num_images: keep this many images, chosen by a seeded order over stems (independent of the file
            system); ``None`` = all usable images.
        recursive: search sub-folders (stems must stay unique).
        overwrite: allow writing into a folder that already holds ``gt/`` or ``lq/`` files.
        verbose: print one line per skipped image and the summary.

    Returns:
        The summary dict written to ``summary.json``.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if size < scale or size % scale:
        raise ValueError(f"size ({size}) must be a positive multiple of scale ({scale})")
    preset = canonical_preset(preset, scale)
    degradation = build_degradation(preset, scale)
    files = list_images(input_dir, recursive=recursive, extensions=IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images in {input_dir}")
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise ValueError(f"two inputs share the stem {path.stem!r}: {by_stem[path.stem]} and {path}")
        by_stem[path.stem] = path
    stems = sorted(by_stem)
    if num_images is not None:
        # A seeded order over stems: the same subset whatever the file system returns.
        stems = sorted(stems, key=lambda s: (stable_seed(seed, "select", s), s))
    dirs = {k: output_dir / k for k in ("gt", "lq", "params")}
    if not overwrite and any(d.is_dir() and any(d.iterdir()) for d in dirs.values()):
        raise FileExistsError(
            f"{output_dir} already holds a test set; pass --overwrite or choose another folder"
        )
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    written: list[str] = []
    too_small: list[str] = []
    unreadable: list[str] = []
    for stem in stems:
        if num_images is not None and len(written) >= num_images:
            break
        path = by_stem[stem]
        rel = path.relative_to(input_dir).as_posix()
        try:
            img = read_image(path).image  # (3, H, W) float32 in [0, 1]
        except ImageReadError as err:
            unreadable.append(rel)
            if verbose:
                print(f"skip (unreadable): {err}", file=sys.stderr)
            continue
        src_h, src_w = img.shape[-2:]
        if min(src_h, src_w) < size:
            too_small.append(rel)
            if verbose:
                print(f"skip (short side {min(src_h, src_w)} < {size}): {rel}", file=sys.stderr)
            continue
        # docs/data.md#imagenet-test-synthesis: SmallestMaxSize(INTER_AREA) shrinking only, then CenterCrop
        resized = area_resize_short_side(img, size)
        gt = center_crop(resized, size)
        gt = torch.round(gt * 255.0) / 255.0  # the GT as stored (8-bit), also the degradation input
        image_seed = stable_seed(seed, stem)
        generator = torch.Generator().manual_seed(image_seed)
        lq, params = degradation(gt.unsqueeze(0).contiguous(), generator=generator, return_params=True)
        write_image(dirs["gt"] / f"{stem}.png", gt)
        write_image(dirs["lq"] / f"{stem}.png", lq[0])
        _dump_json(
            dirs["params"] / f"{stem}.json",
            {
                "source": rel,
                "source_size": [src_h, src_w],
                "resized_size": list(resized.shape[-2:]),
                "gt_size": size,
                "scale": scale,
                "preset": preset,
                "seed": seed,
                "image_seed": image_seed,
                "degradation": _per_image_params(degradation, params),
            },
        )
        written.append(stem)

    summary = {
        "input": str(input_dir),
        "preset": preset,
        "size": size,
        "scale": scale,
        "seed": seed,
        "num_images": num_images,
        "written": len(written),
        "skipped_too_small": too_small,
        "skipped_unreadable": unreadable,
        "names": written,
    }
    _dump_json(output_dir / "summary.json", summary)
    if verbose:
        print(
            f"wrote {len(written)} pairs (GT {size}x{size}, LQ {size // scale}x{size // scale}, "
            f"preset {preset}, seed {seed}) to {output_dir}/{{gt,lq,params}}; skipped {len(too_small)} "
            f"with short side < {size} and {len(unreadable)} unreadable"
        )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.make_testset",
        description="Synthesise a reproducible paired SR test set (ImageNet-Test recipe) from HR images.",
    )
    parser.add_argument("--input", required=True, help="folder of HR images")
    parser.add_argument("--output", required=True, help="output folder (gt/, lq/, params/, summary.json)")
    parser.add_argument("--size", type=int, default=512, help="GT crop side (default 512)")
    parser.add_argument("--scale", type=int, default=4, help="downscaling factor (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument(
        "--preset", default="imagenet_test", help=f"degradation: {', '.join(PRESETS)} (optional _x<scale>)"
    )
    parser.add_argument("--num-images", type=int, default=None, help="keep N images (seeded choice)")
    parser.add_argument("--recursive", action="store_true", help="search sub-folders")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder holding a test set")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    make_testset(
        args.input,
        args.output,
        size=args.size,
        scale=args.scale,
        seed=args.seed,
        preset=args.preset,
        num_images=args.num_images,
        recursive=args.recursive,
        overwrite=args.overwrite,
        verbose=not args.quiet,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
