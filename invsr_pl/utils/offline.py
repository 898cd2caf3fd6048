"""Whether the Hugging Face hub must not be contacted: the one offline check of the project."""

from __future__ import annotations

import os

__all__ = ["hub_offline"]

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to 1/true/yes/on.

    Read from the environment at call time (``huggingface_hub.constants`` is frozen at import, so a flag set
    later, e.g. by a test or a command, would be missed there); the library's constant is honoured too.
    """
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    if any(f.strip().lower() in _TRUE for f in flags):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False
