"""Comparing checkpoints: nested state (tensors, dicts, lists, floats) equal to the resume tolerance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tree(a: Any, b: Any, where: str = "") -> None:
    """``a == b`` leaf by leaf: tensors to rtol 1e-5 / atol 1e-6, floats to rel 1e-6, the rest exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6), where
    else:
        assert a == b, where
