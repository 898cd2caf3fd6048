"""Reading weight files safely: the one loader behind every ``from_official`` / ``load_checkpoint``.

Nothing here unpickles arbitrary objects: ``.safetensors`` files go through safetensors, anything else through
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

# DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers prefix every key (INVSR_REFERENCE §1.2, §7.4)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(key: str) -> str:
    """``module._orig_mod.encoder.x`` -> ``encoder.x`` (any order, any repetition of the wrapper prefixes)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict[str, Tensor]:
    """Read a weight file into a plain ``name -> tensor`` dict on the CPU.

    Accepts ``.safetensors`` or a pickled dict of tensors; unwraps a ``{"state_dict": ...}`` entry and
    strips :data:`WRAPPER_PREFIXES` (INVSR_REFERENCE §7.4), so the released InvSR ``.pth`` files, our exports
    and DDP/compiled dumps all read the same way.

    Args:
        path: the file.
        what: what the file should hold, for error messages (e.g. ``"noise predictor checkpoint"``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file does not hold a mapping of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        raw: object = load_file(str(path), device="cpu")
    else:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(raw).__name__})")
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        out[strip_wrapper_prefixes(key)] = value
    return out
