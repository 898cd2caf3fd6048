"""``invsr-sr``: super-resolve an image file or a folder of images with InvSR (docs/sampling.md).

Examples::

    invsr-sr photo.jpg -o out/ --noise-predictor noise_predictor_sd_turbo_v5.pth
    invsr-sr -i in/ -o out/ --backbone /models/sd-turbo --noise-predictor runs/x/np --steps 3
    invsr-sr in/ -o out/ --noise-predictor np.pth --outscale 2     # the x4 result resized to x2
    invsr-sr inputs/ -o out/ --backbone tiny        # offline smoke run with tiny networks

Every input ``<name>.<ext>`` becomes ``<out>/<name>.png`` at exactly the model's scale (or ``--outscale``)
times its size; alpha is upscaled and re-attached; 16-bit and float inputs give 16-bit PNGs.

Names: inputs that share a stem (``a.jpg``, ``a.png``) are all written as ``<stem>_<ext>.png`` (said on
stderr); the frames of a multi-page TIFF or animated image as ``<stem>_p<k>.png`` (k from 1). An output
that would replace an input, or two outputs on one name, stop the run before any work. Existing outputs that
are not inputs are replaced. Files are written atomically: an interrupted run leaves no half-written image.

Exit codes: 0 all written; 1 some inputs failed (each named on stderr with the reason, e.g. corrupt files,
symlink loops); 2 setup error (bad arguments, ``-o`` an existing file, name clashes, weights missing or
unreadable), before any image is processed. Files that are not images are listed as ignored.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from invsr_pl.sampling.color_fix import COLOR_FIX_METHODS
from invsr_pl.utils.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    count_frames,
    list_images,
    read_image,
    resize_image,
    write_image,
)

__all__ = ["DEFAULT_SEED", "SetupError", "add_model_arguments", "build_models", "build_parser", "main"]

DEFAULT_SEED = 12345  # the official sample-sd-turbo.yaml seed (docs/sampling.md)
TINY = "tiny"
# bitsandbytes (imported by diffusers / pyiqa) warns on every import on CPUs without its optional kernels
_NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


class SetupError(Exception):
    """Arguments or models that make the whole run impossible (exit code 2)."""


def _quiet_dependencies() -> None:
    """Keep dependency warnings that have nothing to do with this run out of the terminal (errors still show).

    Must run before diffusers is imported: the message is logged while bitsandbytes is being imported.
    """
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _timesteps(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 200,100,50, got {text!r}"
        ) from err
    from invsr_pl.models.timesteps import validate_timesteps

    try:
        return validate_timesteps(values)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _outscale(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number like 2 or 3.5, got {text!r}") from err
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"--outscale must be a positive number, got {text!r}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options shared by ``invsr-sr`` and ``invsr-demo`` (read back by :func:`build_models`):
    ``--backbone``, ``--noise-predictor``, ``--device``, ``--dtype``, ``--revision``, ``--cache-dir``,
    ``--compile``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--backbone",
        default="stabilityai/sd-turbo",
        help="SD-Turbo hub id or local diffusers folder, or 'tiny' (tiny networks, offline smoke)",
    )
    group.add_argument("--revision", default=None, help="hub revision of the backbone")
    group.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    group.add_argument(
        "--noise-predictor",
        type=Path,
        default=None,
        help="exported folder, .safetensors, a train.py .ckpt (EMA), or an official .pth "
        "(noise_predictor_sd_turbo_v5.pth)",
    )
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, mps")
    group.add_argument(
        "--dtype", default="auto", help="backbone weights: auto (fp16 on CUDA), float32, float16, bfloat16"
    )
    group.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet and noise predictor (slow first image)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invsr-sr",
        description="InvSR super-resolution of an image or a folder of images (png, jpg, bmp, webp, tif). "
        "Exit codes: 0 all written, 1 some inputs failed (named), 2 setup error.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "input", type=Path, nargs="?", default=None, help="an image file or a folder (non-recursive)"
    )
    p.add_argument("-i", "--input", type=Path, dest="input_option", default=None, help="same as INPUT")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder; writes <stem>.png")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=1, help="number of steps, paper schedule (1-5, more ok)")
    steps.add_argument(
        "--timesteps", type=_timesteps, default=None, help="descending user timesteps, e.g. 200,100"
    )
    p.add_argument(
        "--outscale",
        type=_outscale,
        default=None,
        help="final scale: the model's result resized (bicubic, antialiased) to this factor; default: the "
        "model's own scale",
    )
    p.add_argument(
        "--chopping-size", type=int, default=128, help="LR patch size (multiple of 16); 0: no chopping"
    )
    p.add_argument("--chopping-batch", type=int, default=8, help="patches per network call")
    p.add_argument("--color-fix", choices=COLOR_FIX_METHODS, default="none", help="colour correction")
    add_model_arguments(p)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of each image's noise draws")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise SetupError(f"unknown device {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda was requested but no CUDA device is available")
    return device


def _load_noise_predictor(path: Path):  # -> NoisePredictor
    from invsr_pl.models.loading import load_noise_predictor

    try:
        return load_noise_predictor(path)[0]
    except FileNotFoundError as err:
        raise SetupError(str(err)) from err
    except (OSError, RuntimeError, ValueError, KeyError) as err:  # WeightFileError is a ValueError
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SetupError(
            message if str(path) in message else f"cannot load the noise predictor {path}: {message}"
        ) from None


def _tiny_backbone(seed: int, dtype: str):  # -> (FrozenSDTurbo, note)
    """The tiny *trained* SD-Turbo twin when its weights are installed, else the random one."""
    try:
        from invsr_pl.models.tiny_trained import DEFAULT_WEIGHTS, load_tiny_trained_sd_turbo
    except ImportError:
        DEFAULT_WEIGHTS = None  # noqa: N806 - the module is optional
    if DEFAULT_WEIGHTS is not None and Path(DEFAULT_WEIGHTS).is_file():
        return load_tiny_trained_sd_turbo(dtype=dtype), "the tiny trained SD-Turbo twin"
    from invsr_pl.models.tiny import build_tiny_sd_turbo

    return build_tiny_sd_turbo(seed=seed, dtype=dtype), "a random tiny SD-Turbo twin"


def build_models(args: argparse.Namespace):  # -> (FrozenSDTurbo, NoisePredictor, smoke, torch.device)
    """Load (or, in smoke mode, build) the models named by :func:`add_model_arguments`'s options.

    Returns:
        ``(backbone, noise_predictor, smoke, device)``: the frozen backbone on ``device`` in the requested
        dtype, the noise predictor in eval mode on ``device`` in the backbone's dtype (its ``scale`` is the
        SR factor), whether these are untrained smoke-mode networks, and the resolved device.

    Raises:
        SetupError: unknown device, missing/unreadable weights; the message is one line for the user.
    """
    _quiet_dependencies()
    from invsr_pl.models.sd_turbo import FrozenSDTurbo, resolve_dtype
    from invsr_pl.models.tiny import tiny_noise_predictor

    device = _device(args.device)
    seed = getattr(args, "seed", DEFAULT_SEED)
    dtype = resolve_dtype(args.dtype, device)
    smoke = args.backbone == TINY and args.noise_predictor is None
    if args.backbone != TINY and args.noise_predictor is None:
        raise SetupError(
            "--noise-predictor is required with a real backbone: download "
            "noise_predictor_sd_turbo_v5.pth from huggingface.co/OAOA/InvSR "
            "or pass a trained/exported folder"
        )
    # the small noise predictor first: a wrong path fails before the multi-GB backbone is read
    if args.noise_predictor is not None:
        noise_predictor = _load_noise_predictor(args.noise_predictor)
    else:
        noise_predictor = tiny_noise_predictor(scale=4, seed=seed)
    if args.backbone == TINY:
        backbone, note = _tiny_backbone(seed, str(dtype).removeprefix("torch."))
        args.backbone_note = note
    else:
        try:
            backbone = FrozenSDTurbo.from_pretrained(
                args.backbone,
                dtype=args.dtype,
                revision=args.revision,
                cache_dir=args.cache_dir,
                device=str(device),
            )
        except FileNotFoundError as err:  # BackboneWeightsNotFound carries the how-to message
            raise SetupError(str(err)) from err
    from invsr_pl.utils.compile import prepare_for_inference

    backbone = backbone.to(device)
    noise_predictor = noise_predictor.to(device=device, dtype=torch.float32)
    # the noise predictor in the backbone's half dtype (docs/sampling.md#precision), NHWC on GPUs, and
    # optionally compiled per network
    prepare_for_inference(
        backbone,
        noise_predictor,
        channels_last=device.type == "cuda",
        compile=bool(getattr(args, "compile", False)),
    )
    return backbone, noise_predictor, smoke, device


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class _Job:
    src: Path
    frame: int  # 0-based frame of a multi-frame file
    dst: Path


@dataclass
class _Plan:
    jobs: list[_Job]
    failed: list[tuple[Path, str]]  # inputs known bad before any work (symlink loops, unreadable headers)
    ignored: list[Path]  # folder entries that are not images
    notes: list[str]  # renames the user should know about


def _input_path(args: argparse.Namespace) -> Path:
    if args.input is not None and args.input_option is not None:
        raise SetupError("give the input once: either INPUT or -i/--input")
    path = args.input if args.input is not None else args.input_option
    if path is None:
        raise SetupError("no input: pass an image file or a folder (INPUT or -i/--input)")
    return path


def _scan(path: Path) -> tuple[list[Path], list[tuple[Path, str]], list[Path]]:
    """(images, failed entries with the reason, ignored non-image entries) of an input file or folder."""
    if path.is_dir():
        images = list_images(path)
        failed, ignored = [], []
        listed = set(images)
        for entry in sorted(path.iterdir()):
            if entry in listed or entry.name.startswith("."):
                continue
            if entry.is_symlink() and not entry.exists():
                failed.append((entry, "broken symbolic link or symbolic-link loop"))
            elif entry.suffix.lower() in IMAGE_EXTENSIONS and not entry.is_dir():
                failed.append((entry, "not a regular file"))
            elif not entry.is_dir():
                ignored.append(entry)
        if not images and not failed:
            raise SetupError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")
        return images, failed, ignored
    if path.is_file():
        return [path], [], []
    if path.is_symlink():
        raise SetupError(f"input {path} is a broken symbolic link or a symbolic-link loop")
    raise SetupError(f"input {path} does not exist")


def _plan(path: Path, out_dir: Path) -> _Plan:
    """Every output name, decided and checked before any model is loaded."""
    images, failed, ignored = _scan(path)
    frames: dict[Path, int] = {}
    for src in images:
        try:
            frames[src] = count_frames(src)
        except ImageReadError as err:
            failed.append((src, str(err)))
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for src in frames:
        by_stem[src.stem.casefold()].append(src)  # case-insensitive file systems: A.png == a.png
    notes, jobs = [], []
    for src, n in frames.items():
        shared = len(by_stem[src.stem.casefold()]) > 1
        stem = f"{src.stem}_{src.suffix.lstrip('.').lower()}" if shared else src.stem
        if n > 1:
            notes.append(f"{src} has {n} frames: writing {stem}_p1.png ... {stem}_p{n}.png")
        jobs += [
            _Job(src, k, out_dir / (f"{stem}_p{k + 1}.png" if n > 1 else f"{stem}.png")) for k in range(n)
        ]
    for group in by_stem.values():
        if len(group) > 1:
            names = ", ".join(f"{s.name} -> {s.stem}_{s.suffix.lstrip('.').lower()}.png" for s in group)
            notes.append(f"inputs share the name {group[0].stem!r}, so each keeps its extension: {names}")
    owner: dict[str, _Job] = {}
    inputs = {os.path.normcase(os.path.abspath(p)) for p in images}
    inodes = {(st.st_dev, st.st_ino) for st in (p.stat() for p in images)}  # -o reached through a symlink
    for job in jobs:
        key = os.path.normcase(os.path.abspath(job.dst))
        if key in inputs or (job.dst.exists() and (job.dst.stat().st_dev, job.dst.stat().st_ino) in inodes):
            raise SetupError(
                f"the output {job.dst} would overwrite the input of that name; choose another -o folder"
            )
        if key.casefold() in owner:
            other = owner[key.casefold()]
            raise SetupError(
                f"{other.src} and {job.src} would both be written to {job.dst}; rename one of them"
            )
        owner[key.casefold()] = job
    return _Plan(jobs, failed, ignored, notes)


# ---------------------------------------------------------------------------------------------- the run
def _run(args: argparse.Namespace) -> int:
    if args.chopping_size < 0 or args.chopping_batch < 1:
        raise SetupError("--chopping-size must be >= 0 and --chopping-batch >= 1")
    if args.output.exists() and not args.output.is_dir():
        raise SetupError(f"-o {args.output} exists and is not a folder")
    plan = _plan(_input_path(args), args.output)
    for note in plan.notes:
        print(f"invsr-sr: {note}", file=sys.stderr)

    from tqdm import tqdm

    from invsr_pl.sampling.oom import sample_with_fallback
    from invsr_pl.sampling.sampler import InvSRSampler

    backbone, noise_predictor, smoke, device = build_models(args)
    if smoke:
        print(
            f"invsr-sr: smoke mode: {getattr(args, 'backbone_note', 'a tiny SD-Turbo twin')} and a random "
            "tiny noise predictor (--backbone tiny without --noise-predictor); the outputs only prove that "
            "the whole path runs.",
            file=sys.stderr,
        )
    try:
        sampler = InvSRSampler(
            backbone,
            noise_predictor,
            num_steps=None if args.timesteps else args.steps,
            timesteps=args.timesteps,
            chopping_size=args.chopping_size or None,
            chopping_batch=args.chopping_batch,
            color_fix=args.color_fix,
        )
    except ValueError as err:
        raise SetupError(str(err)) from err

    args.output.mkdir(parents=True, exist_ok=True)
    failed = list(plan.failed)
    written = 0
    bar = tqdm(plan.jobs, disable=args.no_progress, unit="img")
    for job in bar:
        bar.set_postfix_str(job.src.name)
        try:
            image, alpha, bit_depth = read_image(job.src, frame=job.frame)
            generator = torch.Generator(device=device).manual_seed(args.seed)  # per image: order-independent
            sr = sample_with_fallback(sampler, image[None], generator)[0]
            scale = args.outscale or sampler.scale
            size = (round(image.shape[-2] * scale), round(image.shape[-1] * scale))
            sr = resize_image(sr, size)
            if alpha is not None:  # alpha: plain bicubic, clamped (no diffusion)
                alpha = resize_image(alpha.to(sr.device), size)
            write_image(job.dst, sr, alpha, bit_depth=bit_depth)
            written += 1
        except Exception as err:  # noqa: BLE001 - one bad image must not stop the others; reported below
            failed.append((job.src, str(err).splitlines()[0] if str(err) else type(err).__name__))
            tqdm.write(f"invsr-sr: error: {job.src}: {failed[-1][1]}", file=sys.stderr)
    bar.close()
    print(f"invsr-sr: wrote {written} of {len(plan.jobs)} image(s) to {args.output}", file=sys.stderr)
    if plan.ignored:
        names = ", ".join(p.name for p in plan.ignored)
        print(f"invsr-sr: ignored {len(plan.ignored)} non-image file(s): {names}", file=sys.stderr)
    if failed:
        print(f"invsr-sr: {len(failed)} failed:", file=sys.stderr)
        for src, reason in failed:
            print(f"  {src}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 1 some images failed, 2 setup error)."""
    _quiet_dependencies()
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except SetupError as err:
        print(f"invsr-sr: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
