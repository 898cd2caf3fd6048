"""``invsr-sr``: super-resolve an image file or a folder of images with InvSR (INVSR_REFERENCE §5, §7.2).

Examples::

    invsr-sr photo.jpg -o out/ --noise-predictor noise_predictor_sd_turbo_v5.pth
    invsr-sr in/ -o out/ --backbone /models/sd-turbo --noise-predictor runs/x/np --steps 3 --color-fix wavelet
    invsr-sr inputs/ -o out/ --backbone tiny        # offline smoke run with random tiny networks

Every input ``<name>.<ext>`` becomes ``<out>/<name>.png`` at exactly scale x its size; alpha is upscaled and
re-attached; 16-bit inputs give 16-bit PNGs. Unreadable files are reported on stderr and skipped.
Exit codes: 0 all written, 1 some images failed, 2 bad arguments or models that cannot be loaded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from invsr_pl.sampling.color_fix import COLOR_FIX_METHODS
from invsr_pl.utils.images import IMAGE_EXTENSIONS, list_images, read_image, write_image

__all__ = ["SetupError", "add_model_arguments", "build_models", "build_parser", "main"]

DEFAULT_SEED = 12345  # INVSR_REFERENCE §7.2: sample-sd-turbo.yaml seed
TINY = "tiny"
# small widths for the smoke-mode noise predictor (x4: one downsampling stage, two widths)
TINY_NOISE_PREDICTOR = {
    "block_out_channels": (32, 32),
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "layers_per_block": 1,
}


class SetupError(Exception):
    """Arguments or models that make the whole run impossible (exit code 2)."""


def _timesteps(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 200,100,50, got {text!r}"
        ) from err
    from invsr_pl.sampling.timesteps import validate_timesteps

    try:
        return validate_timesteps(values)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


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
        description="InvSR x4 super-resolution of an image or a folder of images (png, jpg, bmp, webp, tif).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", type=Path, help="an image file or a folder (non-recursive)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder; writes <stem>.png")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=1, help="number of steps, paper schedule (1-5, more ok)")
    steps.add_argument(
        "--timesteps", type=_timesteps, default=None, help="descending user timesteps, e.g. 200,100"
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
    from invsr_pl.export import load_noise_predictor

    try:
        return load_noise_predictor(path)[0]
    except FileNotFoundError as err:
        raise SetupError(str(err)) from err
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise SetupError(f"cannot load the noise predictor {path}: {err}") from err


def build_models(args: argparse.Namespace):  # -> (FrozenSDTurbo, NoisePredictor, smoke, torch.device)
    """Load (or, in smoke mode, build) the models named by :func:`add_model_arguments`'s options.

    Returns:
        ``(backbone, noise_predictor, smoke, device)``: the frozen backbone on ``device`` in the requested
        dtype, the fp32 noise predictor in eval mode on ``device`` (its ``scale`` is the SR factor), whether
        these are untrained smoke-mode networks, and the resolved device.

    Raises:
        SetupError: unknown device, missing/unreadable weights; the message is one line for the user.
    """
    from invsr_pl.models.noise_predictor import NoisePredictor
    from invsr_pl.models.sd_turbo import FrozenSDTurbo, resolve_dtype

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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            noise_predictor = NoisePredictor(**TINY_NOISE_PREDICTOR)
    if args.backbone == TINY:
        from invsr_pl.models.tiny import build_tiny_sd_turbo

        backbone = build_tiny_sd_turbo(seed=seed, dtype=str(dtype).removeprefix("torch."))
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
    backbone = backbone.to(device)
    # the noise predictor stays fp32 (docs/sampling.md: precision)
    noise_predictor = noise_predictor.to(device=device, dtype=torch.float32).eval()
    if getattr(args, "compile", False):
        from invsr_pl.utils.compile import compile_for_inference  # imported only when asked for

        compile_for_inference(backbone, noise_predictor)
    return backbone, noise_predictor, smoke, device


def _inputs(path: Path) -> list[Path]:
    if path.is_dir():
        files = list_images(path)
        if not files:
            raise SetupError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")
        return files
    if path.is_file():
        return [path]
    raise SetupError(f"input {path} does not exist")


def _output_paths(files: list[Path], out_dir: Path) -> list[Path]:
    """``<out>/<stem>.png``; a later file with the same stem (a.jpg after a.png): ``<stem>_<ext>.png``."""
    seen: set[str] = set()
    outs = []
    for f in files:
        name = f"{f.stem}.png" if f.stem not in seen else f"{f.stem}_{f.suffix.lstrip('.').lower()}.png"
        seen.add(f.stem)
        outs.append(out_dir / name)
    return outs


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from invsr_pl.sampling.sampler import InvSRSampler

    if args.chopping_size < 0 or args.chopping_batch < 1:
        raise SetupError("--chopping-size must be >= 0 and --chopping-batch >= 1")
    files = _inputs(args.input)
    backbone, noise_predictor, smoke, device = build_models(args)
    if smoke:
        print(
            "invsr-sr: smoke mode: random tiny backbone and noise predictor (--backbone tiny without "
            "--noise-predictor); the outputs only prove that the whole path runs.",
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
    failed: list[Path] = []
    bar = tqdm(
        list(zip(files, _output_paths(files, args.output), strict=True)), disable=args.no_progress, unit="img"
    )
    for src, dst in bar:
        bar.set_postfix_str(src.name)
        try:
            if dst.resolve() == src.resolve():
                raise ValueError("the output would overwrite the input; choose another --output folder")
            image, alpha, bit_depth = read_image(src)
            generator = torch.Generator(device=device).manual_seed(args.seed)  # per image: order-independent
            sr = sampler(image[None], generator=generator)[0]
            if alpha is not None:  # alpha: plain bicubic, clamped (no diffusion)
                alpha = F.interpolate(alpha[None].to(sr.device), size=sr.shape[-2:], mode="bicubic").clamp(
                    0, 1
                )[0]
            write_image(dst, sr, alpha, bit_depth=bit_depth)
        except Exception as err:  # noqa: BLE001 - one bad image must not stop the others; reported below
            failed.append(src)
            message = str(err) if str(src) in str(err) else f"{src}: {err}"
            tqdm.write(f"invsr-sr: error: {message}", file=sys.stderr)
    bar.close()
    done = len(files) - len(failed)
    print(f"invsr-sr: wrote {done} of {len(files)} image(s) to {args.output}", file=sys.stderr)
    if failed:
        print(f"invsr-sr: {len(failed)} failed: {', '.join(str(f) for f in failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 1 some images failed, 2 setup error)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except SetupError as err:
        print(f"invsr-sr: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
