"""``invsr-sr``: super-resolve an image file or a folder of images with InvSR (docs/sampling.md).

Examples::

    invsr-sr photo.jpg -o out/ --noise-predictor noise_predictor_sd_turbo_v5.pth
    invsr-sr -i in/ -o out/ --backbone /models/sd-turbo --noise-predictor runs/x/np --steps 3
    invsr-sr in/ -o out/ --noise-predictor np.pth -s 2 --suffix x2 --ext jpg  # x4 resized to x2, a_x2.jpg
    invsr-sr inputs/ -o out/ --backbone tiny        # offline smoke run with tiny networks
    invsr-sr inputs/ -o out/ --backbone tiny_sd35_turbo   # the same on the SD3.5 twin (tiny_sdxl_turbo: SDXL)
    invsr-sr in/ -o out/ --noise-predictor exports/sdxl   # the backbone (SDXL-Turbo) recorded with the export

Names (:func:`output_name`, the demo uses the same rule): every input ``<stem>.<ext>`` becomes
``<out>/<stem>[_<suffix>].<format>``, by default ``<stem>.png``; ``--ext auto`` keeps the input's format.
Inputs that share a stem (``a.jpg``, ``a.png``) are all written as ``<stem>_<input ext>...`` (said on stderr);
the frames of a multi-page TIFF or animated image as ``<stem>_p<k>...`` (k from 1). An output that would
replace an input, or two outputs on one name, stop the run before any work. Existing outputs that are not
inputs are replaced. Files are written atomically: an interrupted run leaves no half-written image. The size
is exactly the model's scale (or ``--outscale``) times the input's; alpha is upscaled and re-attached; 16-bit
and float inputs give 16-bit PNG/TIFF outputs (jpg and webp are 8-bit).

Exit codes: 0 all written; 1 some inputs failed (each named on stderr with the reason: corrupt files,
symlink loops, images above ``--max-megapixels``, decompression bombs); 2 setup error (bad arguments, ``-o``
an existing file or a folder that cannot be written, name clashes, weights missing or unreadable, a backbone
other than the recorded one), before any model is loaded or image processed; 130 interrupted (Ctrl-C): the
finished outputs are kept. Files that are not images are listed as ignored.

Start-up: torch, diffusers and the models are imported only once the run needs them, so ``--help`` and the
argument and folder checks answer in about a second.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invsr_pl.models.builtin import (
    BUILTIN_BACKBONES,
    SD_TURBO_RANDOM,
    TINY,
    TINY_SD35_TURBO,
    TINY_SDXL_TURBO,
    TINY_TRAINED,
    TINY_TWINS,
)
from invsr_pl.utils.errors import SetupError
from invsr_pl.utils.images import (
    IMAGE_EXTENSIONS,
    ImageInfo,
    ImageReadError,
    ImageTooLargeError,
    list_images,
    output_name,
    probe_image,
)
from invsr_pl.utils.quiet import quiet_dependencies
from invsr_pl.utils.seeding import DEFAULT_SEED

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_SEED",
    "SetupError",
    "add_model_arguments",
    "build_models",
    "build_parser",
    "main",
    "output_name",
]

DEFAULT_BACKBONE = "stabilityai/sd-turbo"
# = invsr_pl.sampling.color_fix.COLOR_FIX_METHODS, spelled out so that --help does not import torch (a unit
# test keeps the two equal)
COLOR_FIX_CHOICES = ("none", "wavelet", "ycbcr", "adain")
EXT_CHOICES = ("auto", "png", "jpg", "webp")  # Real-ESRGAN's --ext (plus webp)
DEFAULT_MAX_MEGAPIXELS = 100.0  # of input: 100 MP is a 1.6-gigapixel x4 output; a 40000^2 bomb is 1600 MP
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (not ``None``, ``False`` or an empty string)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, ""):
            return action.help or ""
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------- arguments
class _TimestepsAction(argparse.Action):
    """``-t 200 100 50`` (the official script's form) or ``--timesteps 200,100,50``; both may mix."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        tokens = [v for value in values for v in value.replace(",", " ").split()]
        try:
            steps = [int(v) for v in tokens]
        except ValueError:
            raise argparse.ArgumentError(
                self,
                f"expected integers like 200 100 50 or 200,100,50, got {' '.join(values)!r} "
                "(give INPUT before the timesteps, or use -i/--input)",
            ) from None
        from invsr_pl.models.timesteps import validate_timesteps

        try:
            setattr(namespace, self.dest, validate_timesteps(steps))
        except ValueError as err:
            raise argparse.ArgumentError(self, str(err)) from None


def _outscale(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number like 2 or 3.5, got {text!r}") from err
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"--outscale must be a positive number, got {text!r}")
    return value


def _megapixels(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number of megapixels like 100, got {text!r}") from err
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"--max-megapixels must be >= 0 (0 or inf: no limit), got {text!r}")
    return value


def _suffix(text: str) -> str:
    if os.sep in text or (os.altsep and os.altsep in text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"--suffix must be part of a file name, got {text!r}")
    return text


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options shared by ``invsr-sr`` and ``invsr-demo`` (read back by :func:`build_models`):
    ``--backbone``, ``--noise-predictor``, ``--allow-backbone-mismatch``, ``--device``, ``--dtype``,
    ``--revision``, ``--cache-dir``, ``--compile``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--backbone",
        default=None,
        help="hub id or local diffusers folder of SD-Turbo, SDXL-Turbo or SD3.5 Large Turbo, or a built-in: "
        f"'{TINY}', '{TINY_SDXL_TURBO}', '{TINY_SD35_TURBO}' (tiny twins, offline smoke), '{TINY_TRAINED}', "
        f"'{SD_TURBO_RANDOM}'; default: the one recorded with --noise-predictor (train.py checkpoints and "
        f"exports record it), else {DEFAULT_BACKBONE}",
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
    group.add_argument(
        "--allow-backbone-mismatch",
        action="store_true",
        help="use --backbone even when the noise predictor records that it was trained with another one",
    )
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, mps")
    group.add_argument(
        "--dtype", default="auto", help="backbone weights: auto (fp16 on CUDA), float32, float16, bfloat16"
    )
    group.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet and noise predictor (slow first image)"
    )
    group.add_argument(
        "-v", "--verbose", action="store_true",
        help="keep the dependencies' own warnings and notes (default: quiet; INVSR_VERBOSE=1 does the same)",
    )  # fmt: skip


def _add_compatibility_flags(parser: argparse.ArgumentParser) -> None:
    """Spellings users bring from Real-ESRGAN's ``inference_realesrgan.py`` and InvSR's official
    ``inference_invsr.py``: each sets the same value as the flag it names (no default of its own)."""
    group = parser.add_argument_group(
        "compatibility flags",
        "spellings of Real-ESRGAN's and the official InvSR inference scripts; each is the flag it names",
    )
    same = {"default": argparse.SUPPRESS}
    group.add_argument(
        "--tile", dest="chopping_size", type=int, help="= --chopping-size (Real-ESRGAN)", **same
    )
    fp32 = {"action": "store_const", "const": "float32", "help": "= --dtype float32 (Real-ESRGAN)"}
    group.add_argument("--fp32", dest="dtype", **fp32, **same)
    group.add_argument("--in_path", dest="input_option", type=Path, help="= -i/--input (InvSR)", **same)
    group.add_argument("--out_path", dest="output", type=Path, help="= -o/--output (InvSR)", **same)
    group.add_argument("--num_steps", dest="steps", type=int, help="= --steps (InvSR)", **same)
    group.add_argument(
        "--chopping_size", dest="chopping_size", type=int, help="= --chopping-size (InvSR)", **same
    )
    group.add_argument(
        "--chopping_bs", dest="chopping_batch", type=int, help="= --chopping-batch (InvSR)", **same
    )
    choices = (*COLOR_FIX_CHOICES, "")
    group.add_argument("--color_fix", choices=choices, help="= --color-fix, '' none (InvSR)", **same)
    group.add_argument("--sd_path", dest="backbone", help="= --backbone (InvSR)", **same)
    group.add_argument(
        "--started_ckpt_path", dest="noise_predictor", type=Path, help="= --noise-predictor (InvSR)", **same
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invsr-sr",
        description="InvSR super-resolution of an image or a folder of images (png, jpg, bmp, webp, tif). "
        "Exit codes: 0 all written, 1 some inputs failed (named), 2 setup error, 130 interrupted.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "input", type=Path, nargs="?", default=None, help="an image file or a folder (non-recursive)"
    )
    p.add_argument("-i", "--input", type=Path, dest="input_option", default=None, help="same as INPUT")
    p.add_argument(
        "-o", "--output", type=Path, default=None, help="output folder (required); writes <stem>.png"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="number of steps, paper schedule (1-5, more ok); default 1"
    )
    p.add_argument(
        "-t",
        "--timesteps",
        nargs="+",
        action=_TimestepsAction,
        default=None,
        metavar="T",
        help="descending user timesteps, space- or comma-separated: -t 200 100 or --timesteps 200,100",
    )
    p.add_argument(
        "-s",
        "--outscale",
        type=_outscale,
        default=None,
        help="final scale: the model's result resized (bicubic, antialiased) to this factor; default: the "
        "model's own scale",
    )
    p.add_argument("--suffix", type=_suffix, default="", help="appended to output names: <stem>_<suffix>.png")
    p.add_argument(
        "--ext",
        choices=EXT_CHOICES,
        default="png",
        help="output format; auto: the input's own (png for alpha in jpg/bmp inputs); jpg and webp are "
        "8-bit, jpg cannot hold alpha (such images are written as png)",
    )
    p.add_argument(
        "--chopping-size", type=int, default=128, help="LR patch size (multiple of 16); 0: no chopping"
    )
    p.add_argument("--chopping-batch", type=int, default=8, help="patches per network call")
    p.add_argument("--color-fix", choices=COLOR_FIX_CHOICES, default="none", help="colour correction")
    p.add_argument(
        "--max-megapixels",
        type=_megapixels,
        default=DEFAULT_MAX_MEGAPIXELS,
        help="largest input (width x height / 1e6, read from the header before decoding); larger ones fail "
        "by name, the others are written; 0 or inf: no limit",
    )
    add_model_arguments(p)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of each image's noise draws")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_compatibility_flags(p)
    return p


def _settle(args: argparse.Namespace) -> None:
    """Cross-flag checks and the values the aliases may leave unset."""
    if args.output is None:
        raise SetupError("no output folder: pass -o/--output")
    if args.timesteps is not None and args.steps is not None and args.steps != len(args.timesteps):
        raise SetupError(
            f"--steps {args.steps} disagrees with the {len(args.timesteps)} timesteps given; give one of them"
        )
    if args.steps is not None and args.steps < 1:
        raise SetupError(f"--steps must be >= 1, got {args.steps}")
    args.steps = args.steps or 1
    args.color_fix = args.color_fix or "none"  # the official script's '' means no fix
    if args.chopping_size < 0 or args.chopping_batch < 1:
        raise SetupError("--chopping-size must be >= 0 and --chopping-batch >= 1")
    mp = args.max_megapixels
    args.max_pixels = None if mp == 0 or math.isinf(mp) else max(1, int(mp * 1e6))


# ---------------------------------------------------------------------------------------------- models
def _device(name: str) -> torch.device:
    import torch

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
        raise SetupError(_one_line(err, path, "cannot load the noise predictor")) from None


def _one_line(err: Exception, path: Path, what: str) -> str:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    return message if str(path) in message else f"{what} {path}: {message}"


def _provenance(args: argparse.Namespace) -> dict[str, Any] | None:
    """What ``--noise-predictor`` records about its training (None: nothing recorded, e.g. official .pth)."""
    if args.noise_predictor is None:
        return None
    from invsr_pl.utils.provenance import read_provenance

    try:
        return read_provenance(args.noise_predictor)
    except FileNotFoundError as err:
        raise SetupError(str(err)) from err
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        raise SetupError(_one_line(err, args.noise_predictor, "cannot read the noise predictor")) from None


def _choose_backbone(args: argparse.Namespace, provenance: dict[str, Any] | None) -> dict[str, Any] | None:
    """Set ``args.backbone`` (and ``args.revision``) to the backbone to load; return the recorded backbone
    config when the one chosen is the one recorded (so the tiny twins are rebuilt exactly as trained).

    No ``--backbone``: the recorded one, else :data:`DEFAULT_BACKBONE`. A different one than recorded is a
    setup error unless ``--allow-backbone-mismatch`` (docs/checkpoints.md).
    """
    recorded = (provenance or {}).get("backbone") or None
    if args.backbone is None:
        if recorded is None:
            args.backbone = DEFAULT_BACKBONE
            return None
        args.backbone = str(recorded["name"])
        args.revision = args.revision or recorded.get("revision")
        print(
            f"using the backbone {args.backbone!r} recorded with {args.noise_predictor} (no --backbone)",
            file=sys.stderr,
        )
        return recorded.get("config")
    if recorded is None:
        return None
    from invsr_pl.utils.provenance import BackboneMismatchError, check_backbone

    try:
        check_backbone(
            provenance,
            args.backbone,
            args.revision,
            weights=args.noise_predictor,
            requested_as=f"--backbone {args.backbone}",
            accept_hint="pass --allow-backbone-mismatch",
        )
    except BackboneMismatchError:
        have = str(recorded["name"]) + (f"@{recorded['revision']}" if recorded.get("revision") else "")
        message = (
            f"{args.noise_predictor} was trained with the backbone {have!r}, not {args.backbone!r} "
            "(--backbone): its outputs would mean nothing"
        )
        if not args.allow_backbone_mismatch:
            raise SetupError(
                f"{message}; drop --backbone to use {have!r}, or pass --allow-backbone-mismatch"
            ) from None
        print(f"warning: {message} (running anyway: --allow-backbone-mismatch)", file=sys.stderr)
        return None
    return recorded.get("config")


# what smoke mode and the page say about each built-in backbone
_BUILTIN_NOTES = {
    TINY: "a random tiny SD-Turbo twin",
    TINY_TRAINED: "the tiny trained SD-Turbo twin",
    SD_TURBO_RANDOM: "SD-Turbo's architecture, random weights",
    TINY_SDXL_TURBO: "a random tiny SDXL-Turbo twin",
    TINY_SD35_TURBO: "a random tiny SD3.5 Large Turbo twin",
}


def _builtin_backbone(args: argparse.Namespace, dtype: str, config: dict[str, Any] | None):
    """``(FrozenBackbone, note)`` of a built-in backbone (:data:`BUILTIN_BACKBONES`), built by
    :func:`invsr_pl.models.backbones.build_builtin` from a recorded ``config`` (its seed / width / latent
    channels / weight file: plain values only, no ``_target_`` from a file is ever instantiated).

    Without a record: ``tiny`` is the tiny *trained* twin when its weights are installed, else a random one;
    the random twins are seeded with ``--seed``."""
    from invsr_pl.models import backbones

    name = args.backbone
    if config is None and name == TINY:
        try:
            from invsr_pl.models.tiny_trained import DEFAULT_WEIGHTS
        except ImportError:
            DEFAULT_WEIGHTS = None  # noqa: N806 - the module is optional
        if DEFAULT_WEIGHTS is not None and Path(DEFAULT_WEIGHTS).is_file():
            name = TINY_TRAINED
    if config is None and name in TINY_TWINS:
        config = {"seed": getattr(args, "seed", DEFAULT_SEED)}
    note = _BUILTIN_NOTES[name]
    try:
        return backbones.build_builtin(name, dtype, config), note
    except FileNotFoundError as err:
        raise SetupError(str(err)) from err


def _family(args: argparse.Namespace, provenance: dict[str, Any] | None) -> str:
    """The family of a hub id / folder ``--backbone``: the ``model/backbone`` option recorded with the
    noise predictor when it names one (a folder's name says nothing), else what the folder or id says."""
    from invsr_pl.models.backbones import family_of

    recorded = (provenance or {}).get("backbone") or {}
    same = str(recorded.get("name")) == str(args.backbone)
    return family_of(str(args.backbone), recorded.get("choice") if same else None)


def _hub_backbone(args: argparse.Namespace, device: torch.device, family: str):  # -> FrozenBackbone
    from invsr_pl.models.backbones import load_pretrained
    from invsr_pl.models.weights_folder import BackboneWeightsNotFound

    try:
        return load_pretrained(
            args.backbone,
            family,
            dtype=args.dtype,
            revision=args.revision,
            cache_dir=args.cache_dir,
            device=str(device),
        )
    except BackboneWeightsNotFound as err:
        raise SetupError(_backbone_missing(args.backbone, str(err), family)) from None
    except FileNotFoundError as err:
        raise SetupError(str(err)) from err


def _backbone_missing(name: str, message: str, family: str = "sd_turbo") -> str:
    """The backbone's missing-weights message in this command's terms: the ``--backbone`` flag and the
    installed ``hf`` command for the family's model id, not a Hydra key (the model's own message speaks to
    the configs); the layout and any note (SD3.5's gated licence) are kept."""
    from invsr_pl.models.backbones import WEIGHTS

    spec = WEIGHTS[family]
    local = "weights/" + spec.model_id.rsplit("/", 1)[-1]
    reason = re.search(r"could not be loaded: (.*?)\. Download", message)
    layout = re.search(r"(The folder must have the diffusers layout: .*)$", message)
    text = f"{spec.name} weights for {name!r} could not be loaded"
    text += f": {reason.group(1)}" if reason else ""
    text += (
        f"; download it once where the Hugging Face hub is reachable (`hf download {spec.model_id} "
        f"--local-dir {local}`) and pass --backbone {local}."
    )
    return text + (f" {layout.group(1)}" if layout else (f" {spec.note}" if spec.note else ""))


def _required_noise_predictor(family: str) -> str:
    """The message for a real backbone without ``--noise-predictor``: where to get one for its family."""
    if family == "sd_turbo":
        return (
            "--noise-predictor is required with a real backbone: download noise_predictor_sd_turbo_v5.pth "
            "(`hf download OAOA/InvSR noise_predictor_sd_turbo_v5.pth --local-dir weights`) and pass "
            "--noise-predictor weights/noise_predictor_sd_turbo_v5.pth, or a trained/exported folder"
        )
    return (
        f"--noise-predictor is required with a real backbone: no {family} noise predictor is released; pass "
        f"a train.py checkpoint or an invsr-export folder trained with model/backbone={family}"
    )


def _check_geometry(noise_predictor: Any, backbone: Any, args: argparse.Namespace) -> None:
    """The noise predictor must predict the backbone's latent channels (4 for SD-Turbo / SDXL-Turbo, 16 for
    SD3.5): one line, exit 2."""
    have, want = int(noise_predictor.latent_channels), int(backbone.latent_channels)
    if have != want:
        source = args.noise_predictor if args.noise_predictor is not None else "the noise predictor"
        raise SetupError(
            f"{source} predicts {have}-channel latents but the backbone {args.backbone!r} "
            f"({type(backbone).__name__}) has {want} latent channels: it was trained for another backbone"
        )


def build_models(args: argparse.Namespace):  # -> (FrozenBackbone, NoisePredictor, smoke, torch.device)
    """Load (or, in smoke mode, build) the models named by :func:`add_model_arguments`'s options.

    Without ``--backbone`` the backbone recorded with the noise predictor is used (else
    :data:`DEFAULT_BACKBONE`), and ``args.backbone`` is set to the one loaded.

    Returns:
        ``(backbone, noise_predictor, smoke, device)``: the frozen backbone on ``device`` in the requested
        dtype, the noise predictor in eval mode on ``device`` in the backbone's dtype (its ``scale`` is the
        SR factor), whether these are untrained smoke-mode networks, and the resolved device.

    Raises:
        SetupError: unknown device, missing/unreadable weights, a backbone other than the recorded one; the
            message is one line for the user.
    """
    quiet_dependencies(verbose=getattr(args, "verbose", False))  # before diffusers imports bitsandbytes

    from invsr_pl.models.sd_turbo import resolve_dtype
    from invsr_pl.models.tiny import tiny_noise_predictor

    device = _device(args.device)
    seed = getattr(args, "seed", DEFAULT_SEED)
    try:
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as err:
        raise SetupError(str(err)) from None
    provenance = _provenance(args)
    recorded_config = _choose_backbone(args, provenance)
    builtin = args.backbone in BUILTIN_BACKBONES
    smoke = args.backbone in (*TINY_TWINS, TINY_TRAINED) and args.noise_predictor is None
    family = None if builtin else _family(args, provenance)
    if not builtin and args.noise_predictor is None:
        raise SetupError(_required_noise_predictor(family))
    # the small noise predictor first: a wrong path fails before the multi-GB backbone is read
    noise_predictor = None if args.noise_predictor is None else _load_noise_predictor(args.noise_predictor)
    if builtin:
        backbone, note = _builtin_backbone(args, str(dtype).removeprefix("torch."), recorded_config)
        args.backbone_note = note
    else:
        backbone = _hub_backbone(args, device, family)
    if noise_predictor is None:  # smoke mode: a random tiny one for the backbone's latents
        noise_predictor = tiny_noise_predictor(scale=4, seed=seed, latent_channels=backbone.latent_channels)
    _check_geometry(noise_predictor, backbone, args)
    from invsr_pl.utils.compile import prepare_for_inference

    backbone = backbone.to(device)
    noise_predictor = noise_predictor.to(device).float()  # .to(dtype=) of a diffusers model warns
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
def _output_ext(src: Path, info: ImageInfo, ext: str) -> str:
    """The output format of ``src``: ``--ext``, or for ``auto`` the input's own; png when the format
    cannot hold the image's alpha channel (jpg, bmp)."""
    chosen = src.suffix.lstrip(".").lower() if ext == "auto" else ext
    return "png" if info.has_alpha and chosen in ("jpg", "jpeg", "bmp") else chosen


@dataclass(frozen=True)
class _Job:
    src: Path
    frame: int  # 0-based frame of a multi-frame file
    dst: Path


@dataclass
class _Plan:
    jobs: list[_Job]
    failed: list[tuple[Path, str]]  # inputs known bad before any work (symlink loops, bombs, headers)
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


def _reason(err: BaseException) -> str:
    """One line for the failure list."""
    text = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, ImageTooLargeError) and "above the limit" in text:
        return f"{text} (raise --max-megapixels; 0 = no limit)"
    return text if isinstance(err, ImageReadError) and text else f"{type(err).__name__}: {text}".rstrip(": ")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _plan(
    path: Path, out_dir: Path, *, ext: str = "png", suffix: str = "", max_pixels: int | None = None
) -> _Plan:
    """Every output name, decided and checked before any model is loaded; a file that cannot be planned
    (unreadable header, too many pixels, a decompression bomb, any error) is a failure of its own."""
    images, failed, ignored = _scan(path)
    infos: dict[Path, ImageInfo] = {}
    for src in images:
        try:
            infos[src] = probe_image(src, max_pixels)
        except Exception as err:  # noqa: BLE001 - one bad file must not sink the batch (named at the end)
            failed.append((src, _reason(err)))
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for src in infos:
        by_stem[src.stem.casefold()].append(src)  # case-insensitive file systems: A.png == a.png
    notes, jobs = [], []
    for src, info in infos.items():
        shared = len(by_stem[src.stem.casefold()]) > 1
        stem = f"{src.stem}_{src.suffix.lstrip('.').lower()}" if shared else src.stem
        out_ext = _output_ext(src, info, ext)
        if out_ext != _output_ext(src, info._replace(has_alpha=False), ext):
            notes.append(f"{src} has an alpha channel, which {ext} cannot hold: writing it as png")
        n = info.frames
        names = [output_name(stem, out_ext, suffix, k + 1 if n > 1 else None) for k in range(n)]
        if n > 1:
            notes.append(f"{src} has {n} frames: writing {names[0]} ... {names[-1]}")
        jobs += [_Job(src, k, out_dir / names[k]) for k in range(n)]
    for group in by_stem.values():
        if len(group) > 1:
            names = ", ".join(f"{s.name} -> {s.stem}_{s.suffix.lstrip('.').lower()}..." for s in group)
            notes.append(f"inputs share the name {group[0].stem!r}, so each keeps its extension: {names}")
    owner: dict[str, _Job] = {}
    inputs = {os.path.normcase(os.path.abspath(p)) for p in images}
    inodes = {i for i in map(_identity, images) if i is not None}  # -o reached through a symlink
    for job in jobs:
        key = os.path.normcase(os.path.abspath(job.dst))
        if key in inputs or (job.dst.exists() and _identity(job.dst) in inodes):
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


def _check_output_folder(out_dir: Path) -> None:
    """Refuse an ``-o`` that exists as a file, or that cannot be written (it, or the nearest folder above
    it that exists: read-only permissions or file system), before any model loads."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SetupError(f"-o {out_dir} exists and is not a folder")
    existing = out_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SetupError(f"cannot create the output folder {out_dir}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # also False on a read-only file system (EROFS)
        where = "the output folder" if existing == out_dir.absolute() else f"{existing}, above {out_dir},"
        raise SetupError(f"cannot write to {out_dir}: {where} is not writable (read-only)")


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Pillow's process-wide decompression-bomb limit lifted while ``--max-megapixels`` (checked from each
    header before decoding, utils/images.py) decides, so that ``0`` really means no limit."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class _Tally:
    """What the run has done so far, for the final report (also after Ctrl-C)."""

    planned: int = 0
    written: int = 0
    seconds: float = 0.0  # spent on the written images
    started: float = 0.0  # time.perf_counter() at the start of main


def _run(args: argparse.Namespace, tally: _Tally) -> int:
    _settle(args)
    _check_output_folder(args.output)
    plan = _plan(_input_path(args), args.output, ext=args.ext, suffix=args.suffix, max_pixels=args.max_pixels)
    tally.planned = len(plan.jobs)
    for note in plan.notes:
        print(f"invsr-sr: {note}", file=sys.stderr)

    import torch
    from tqdm import tqdm

    from invsr_pl.pipelines import InvSRPipeline
    from invsr_pl.sampling.sampler import InvSRSampler
    from invsr_pl.utils.images import read_image, write_image

    backbone, noise_predictor, smoke, device = build_models(args)
    if smoke:
        print(
            f"invsr-sr: smoke mode: {getattr(args, 'backbone_note', 'a tiny SD-Turbo twin')} and a random "
            f"tiny noise predictor (--backbone {args.backbone} without --noise-predictor); the outputs only "
            "prove that the whole path runs.",
            file=sys.stderr,
        )
    # the one inference path (issue 19): the pipeline over the loaded modules does the SR, the OOM
    # fallback, --outscale and the alpha channel; this command reads and writes the files
    pipe = InvSRPipeline.from_backbone(backbone, noise_predictor)
    pipe.set_progress_bar_config(disable=True)
    settings = {
        "num_inference_steps": None if args.timesteps else args.steps,
        "timesteps": args.timesteps,
        "chopping_size": args.chopping_size or None,
        "chopping_batch_size": args.chopping_batch,
        "color_fix": args.color_fix,
        "generator": args.seed,  # a fresh generator per image: outputs do not depend on the order
        "outscale": args.outscale,
        "output_type": "pt",
    }
    try:  # the settings the pipeline's sampler will get, checked once: a bad one is a setup error
        InvSRSampler(
            backbone,
            noise_predictor,
            num_steps=settings["num_inference_steps"],
            timesteps=args.timesteps,
            chopping_size=settings["chopping_size"],
            chopping_batch=args.chopping_batch,
            color_fix=args.color_fix,
        )
    except ValueError as err:
        raise SetupError(str(err)) from err
    print(
        f"invsr-sr: models ready on {device} in {time.perf_counter() - tally.started:.1f} s", file=sys.stderr
    )

    args.output.mkdir(parents=True, exist_ok=True)
    failed = list(plan.failed)
    bar = tqdm(plan.jobs, disable=args.no_progress, unit="img")
    for job in bar:
        bar.set_postfix_str(job.src.name)
        start = time.perf_counter()
        try:
            image, alpha, bit_depth = read_image(job.src, frame=job.frame, max_pixels=args.max_pixels)
            lr = image if alpha is None else torch.cat([image, alpha])
            out = pipe(lr, **settings).images[0]  # (3 or 4, H, W) float32 in [0, 1], on the CPU
            depth = bit_depth if job.dst.suffix.lower() in (".png", ".tif", ".tiff") else 8
            write_image(job.dst, out[:3], None if alpha is None else out[3:], bit_depth=depth)
        except Exception as err:  # noqa: BLE001 - one bad image must not stop the others; reported below
            failed.append((job.src, _reason(err)))
            tqdm.write(f"invsr-sr: error: {job.src}: {failed[-1][1]}", file=sys.stderr)
            continue
        seconds = time.perf_counter() - start
        tally.written += 1
        tally.seconds += seconds
        tqdm.write(
            f"invsr-sr: {job.dst.name}: {image.shape[-1]}x{image.shape[-2]} -> "
            f"{out.shape[-1]}x{out.shape[-2]} in {seconds:.2f} s",
            file=sys.stderr,
        )
    bar.close()
    _report(args, tally)
    if plan.ignored:
        names = ", ".join(p.name for p in plan.ignored)
        print(f"invsr-sr: ignored {len(plan.ignored)} non-image file(s): {names}", file=sys.stderr)
    if failed:
        print(f"invsr-sr: {len(failed)} failed:", file=sys.stderr)
        for src, reason in failed:
            print(f"  {src}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def _report(args: argparse.Namespace, tally: _Tally) -> None:
    per_image = f", {tally.seconds / tally.written:.2f} s per image" if tally.written else ""
    print(
        f"invsr-sr: wrote {tally.written} of {tally.planned} image(s) to {args.output} in "
        f"{time.perf_counter() - tally.started:.1f} s in all{per_image}",
        file=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 ok, 1 some images failed, 2 setup error,
    130 interrupted)."""
    tally = _Tally(started=time.perf_counter())
    args = build_parser().parse_args(argv)
    try:
        with _own_pixel_limit():
            return _run(args, tally)
    except SetupError as err:
        print(f"invsr-sr: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # every finished output is complete (atomic writes); the one being written was never renamed
        print(file=sys.stderr)
        _report(args, tally)
        print(
            "invsr-sr: interrupted: the finished outputs are kept, no partial file is left; run the same "
            "command again to redo the rest",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
