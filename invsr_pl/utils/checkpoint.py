"""Weight files and training checkpoints: the format, and the one place that reads them (docs/checkpoints.md).

Nothing here unpickles arbitrary objects: ``.safetensors`` files go through safetensors, anything else
through ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers. A file that
cannot be read (random bytes, truncated, or a pickle that would need to run code) raises
:class:`WeightFileError`, whose message is one line naming the file and what is wrong; the commands print it
and exit with code 2.

Training checkpoint layout (written through Lightning by ``InvSRLitModule`` and ``NoisePredictorEMA``):

- ``state_dict``: ``noise_predictor.*`` and ``discriminator.*`` (the trainable parts; the frozen SD-Turbo and
  LPIPS are never saved), :data:`STATE_PREFIX`, :data:`TRAINABLE_PREFIXES`;
- :data:`EMA_KEY`: the EMA noise-predictor weights, ``NoisePredictor.state_dict()`` keys (no prefix);
- :data:`CONFIG_KEY`: the ``NoisePredictor`` constructor arguments (so it can be rebuilt without Hydra);
- :data:`ITERATION_KEY`, :data:`SKIPPED_STEPS_KEY`, :data:`CONSECUTIVE_NONFINITE_KEY`: the module's counters;
- the rest is Lightning's (optimisers, schedulers, loops, callbacks, data-module state).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

__all__ = [
    "CONFIG_KEY",
    "CONSECUTIVE_NONFINITE_KEY",
    "EMA_KEY",
    "ITERATION_KEY",
    "SKIPPED_STEPS_KEY",
    "STATE_PREFIX",
    "TRAINABLE_PREFIXES",
    "WRAPPER_PREFIXES",
    "CheckpointMismatchError",
    "WeightFileError",
    "check_trainable_keys",
    "drop_frozen",
    "checkpoint_problem",
    "load_checkpoint",
    "noise_predictor_state",
    "read_state_dict",
    "strip_wrapper_prefixes",
]

EMA_KEY = "ema_noise_predictor"  # written by callbacks.ema.NoisePredictorEMA.on_save_checkpoint
CONFIG_KEY = "noise_predictor_config"  # written by InvSRLitModule.on_save_checkpoint
ITERATION_KEY = "invsr_iteration"  # InvSR iterations (trainer.global_step counts G and D steps)
SKIPPED_STEPS_KEY = "invsr_skipped_steps"
CONSECUTIVE_NONFINITE_KEY = "invsr_consecutive_nonfinite"
STATE_PREFIX = "noise_predictor."
# the trained parts; everything else in the module (SD-Turbo, LPIPS, metrics) is frozen and never saved
TRAINABLE_PREFIXES = ("noise_predictor.", "discriminator.")
# DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers prefix every key (docs/checkpoints.md)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightFileError(ValueError):
    """A weight file or checkpoint that cannot be read safely: corrupt, truncated, not a weight file, or a
    pickle that would need to run code. The message is one line and names the file."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that lacks (or mis-shapes) weights the model trains; the message names them."""


def strip_wrapper_prefixes(key: str) -> str:
    """``module._orig_mod.encoder.x`` -> ``encoder.x`` (any order, any repetition of the wrapper prefixes)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _file_format(path: Path) -> str | None:
    """``"zip"`` (``torch.save`` since PyTorch 1.6), ``"pickle"`` (legacy ``torch.save``), ``"safetensors"``
    or None (none of them), from the first bytes of the file."""
    with path.open("rb") as f:
        head = f.read(9)
    if head.startswith(b"PK"):
        return "zip"
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode, how the legacy format begins
        return "pickle"
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    return None


def _torch_load(path: Path, what: str, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``; every failure becomes a one-line :class:`WeightFileError`."""
    if path.stat().st_size == 0:
        raise WeightFileError(f"{what} {path} is empty (0 bytes): an interrupted write?")
    kind = _file_format(path)
    if kind is None:  # e.g. a text file: torch.load would fail with a bare KeyError on its first byte
        raise WeightFileError(
            f"{what} {path} is not a weight file (neither safetensors nor a PyTorch checkpoint)"
        )
    if kind == "safetensors":
        raise WeightFileError(f"{what} {path} is a safetensors weight file, not a PyTorch checkpoint")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            what_object = f" (unsupported global {found.group(1)})" if found else ""
            raise WeightFileError(
                f"{what} {path} holds Python objects{what_object} other than tensors and plain containers, "
                "so it is not loaded (unpickling could run arbitrary code); if you trust it, re-save it as "
                "tensors"
            ) from err
        raise WeightFileError(f"{what} {path} is not a PyTorch weight file ({_first_line(err)})") from err
    except (EOFError, KeyError, zipfile.BadZipFile) as err:
        raise WeightFileError(f"{what} {path} is truncated or corrupt ({_first_line(err)})") from err
    except RuntimeError as err:
        message = str(err)
        if mmap and "mmap" in message:  # a legacy (non-zip) torch.save file: read it whole instead
            return _torch_load(path, what, mmap=False)
        if "zip archive" in message or "central directory" in message or "PytorchStreamReader" in message:
            raise WeightFileError(f"{what} {path} is truncated or corrupt ({_first_line(err)})") from err
        raise WeightFileError(f"{what} {path} cannot be read ({_first_line(err)})") from err
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise WeightFileError(f"{what} {path} cannot be read ({_first_line(err)})") from err


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, Tensor]:
    """Read a weight file into a plain ``name -> tensor`` dict on the CPU.

    Accepts ``.safetensors`` or a pickled dict of tensors; unwraps a ``{"state_dict": ...}`` entry and
    strips :data:`WRAPPER_PREFIXES`, so the released InvSR ``.pth`` files, our exports and DDP/compiled dumps
    all read the same way.

    Args:
        path: the file.
        what: what the file should hold, for error messages (e.g. ``"noise predictor checkpoint"``).

    Raises:
        FileNotFoundError: the file does not exist.
        WeightFileError: the file cannot be read safely or does not hold a mapping of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix == ".safetensors" or (path.stat().st_size and _file_format(path) == "safetensors"):
        try:
            raw: object = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightFileError(
                f"{what} {path} is not a valid .safetensors file, truncated or corrupt ({_first_line(err)})"
            ) from err
    else:
        raw = _torch_load(path, what)
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise WeightFileError(f"{what} {path} does not hold a state dict (got {type(raw).__name__})")
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise WeightFileError(f"{what} {path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[strip_wrapper_prefixes(key)] = value
    return out


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a Lightning checkpoint on the CPU with tensors-only unpickling (``weights_only=True``).

    ``train.py`` instantiates with ``_convert_="all"``, so our checkpoints hold only tensors and plain
    containers; a file that needs full unpickling is refused rather than trusted (it could run code).

    Args:
        mmap: map the tensors from the file instead of reading them (cheap key checks on large files).

    Raises:
        FileNotFoundError: no such file.
        WeightFileError: unreadable, truncated, or objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    checkpoint = _torch_load(path, "checkpoint", mmap=mmap)
    if not isinstance(checkpoint, dict):
        raise WeightFileError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def checkpoint_problem(path: str | Path) -> str | None:
    """None if ``path`` reads as a checkpoint dict with a ``state_dict``, else why not (one line).

    Maps the tensors instead of reading them, so it is cheap even for large files.
    """
    try:
        checkpoint = load_checkpoint(path, mmap=True)
    except (OSError, WeightFileError) as err:
        return str(err)
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        return f"checkpoint {path} has no 'state_dict': not a Lightning checkpoint"
    return None


def check_trainable_keys(checkpoint: Mapping[str, Any], model: nn.Module, path: str | Path = "") -> None:
    """Refuse a checkpoint that lacks (or mis-shapes) any trainable weight of ``model``.

    Lightning loads with ``strict=False`` here (the frozen parts are never saved), which alone would resume a
    checkpoint without the noise predictor from random weights. Only keys under :data:`TRAINABLE_PREFIXES` are
    required; frozen, never-saved parts may be absent.

    Args:
        checkpoint: a loaded Lightning checkpoint (``load_checkpoint(path, mmap=True)`` is enough).
        model: the LightningModule about to be trained.
        path: for the message.

    Raises:
        CheckpointMismatchError: one line naming the missing / mis-shaped keys (the first few).
    """
    saved = checkpoint.get("state_dict", {})
    own = {k: v for k, v in model.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}
    missing = sorted(k for k in own if k not in saved)
    shapes = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in saved and isinstance(saved[k], Tensor) and saved[k].shape != v.shape
    ]
    if missing or shapes:
        problems = []
        if missing:
            problems.append(f"{len(missing)} trainable weights missing: {_head(missing)}")
        if shapes:
            problems.append(f"{len(shapes)} shapes differ (checkpoint vs model): {_head(shapes)}")
        raise CheckpointMismatchError(
            f"ckpt_path {path} does not fit the model: {'; '.join(problems)} (resuming would silently train "
            "from random weights)"
        )


def _head(items: Iterable[str], n: int = 4) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


def noise_predictor_state(checkpoint: Mapping[str, Any], use_ema: bool = True) -> dict[str, Tensor]:
    """The noise predictor's weights (NoisePredictor state-dict keys, CPU fp32) from a loaded checkpoint.

    Raises:
        KeyError: ``use_ema`` without :data:`EMA_KEY`, or no ``noise_predictor.*`` weights at all.
    """
    if use_ema:
        if EMA_KEY not in checkpoint:
            raise KeyError(
                f"checkpoint has no {EMA_KEY!r} (trained without the EMA callback?); pass --no-ema to export "
                "the raw noise-predictor weights instead"
            )
        state = checkpoint[EMA_KEY]
    else:
        full = checkpoint.get("state_dict", {})
        state = {k[len(STATE_PREFIX) :]: v for k, v in full.items() if k.startswith(STATE_PREFIX)}
        if not state:
            raise KeyError(
                f"checkpoint state_dict has no {STATE_PREFIX!r} keys; is it an InvSR training checkpoint?"
            )
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def drop_frozen(state_dict: dict[str, Any], frozen: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    """Remove the keys of frozen, never-checkpointed parts (``prefix + p`` for each ``p`` in ``frozen``)
    from a module's ``state_dict`` in place and return it: checkpoints hold what trains, not the frozen
    backbone (docs/checkpoints.md, docs/lightning.md#partial-checkpoints)."""
    for key in [k for k in state_dict if k.startswith(tuple(prefix + p for p in frozen))]:
        del state_dict[key]
    return state_dict
