"""StrictModelMixin: diffusers' ``from_pretrained``, but a weight file that does not fit is an error.

diffusers' ``ModelMixin.from_pretrained`` warns about missing keys and initialises them at random, and skips
unexpected ones; a noise predictor or discriminator loaded that way would silently run half-random. Our
models load strictly everywhere (docs/checkpoints.md), so their ``from_pretrained`` refuses such a folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffusers.models.modeling_utils import ModelMixin

__all__ = ["StrictModelMixin"]


def _head(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" ... (+{len(items) - n} more)" if len(items) > n else "")


class StrictModelMixin(ModelMixin):
    """``ModelMixin`` whose ``from_pretrained`` requires every key, no extra key and every shape to match."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, **kwargs: Any):
        """diffusers' ``from_pretrained`` (folder or hub id, ``subfolder=``, ``torch_dtype=`` ...), strict.

        Raises:
            RuntimeError: the weights lack keys of the model, hold other keys, or differ in shape (one line).
            FileNotFoundError: a local path (absolute, ``./``, ``~``, or deeper than ``owner/name``) that
                does not exist.
            OSError: no such hub id, a folder without the files, or the hub is unreachable (diffusers').
        """
        name = str(pretrained_model_name_or_path)
        path = Path(name).expanduser()
        # a path that cannot be a hub id ("owner/name") is a missing folder: say so instead of asking the hub
        if not path.exists() and (path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1):
            raise FileNotFoundError(f"{cls.__name__} folder {path} does not exist")
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, output_loading_info=True, **kwargs
        )
        problems = [
            f"{len(info[key])} {label} [{_head([str(k) for k in info[key]])}]"
            for key, label in (
                ("missing_keys", "missing"),
                ("unexpected_keys", "unexpected"),
                ("mismatched_keys", "shape mismatches"),
            )
            if info.get(key)
        ]
        if problems:
            where = pretrained_model_name_or_path
            if kwargs.get("subfolder"):
                where = f"{where} (subfolder {kwargs['subfolder']})"
            raise RuntimeError(f"weights in {where} do not match {cls.__name__}: {'; '.join(problems)}")
        return (model, info) if want_info else model
