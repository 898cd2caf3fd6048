"""Fault and bad-input tests: the real entry points (``invsr-sr``/``invsr-export`` ``main``, ``train(cfg)``,
``train.py`` in a subprocess), asserting on files and exit codes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig
from reliability_helpers import compose_train


@pytest.fixture
def train_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``train_cfg("experiment=smoke", ...)`` -> a config writing below this test's tmp_path."""

    def _make(*overrides: str, subdir: str | None = None) -> DictConfig:
        return compose_train(list(overrides), tmp_path / subdir if subdir else tmp_path)

    return _make
