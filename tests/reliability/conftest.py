"""Fault and bad-input tests: the real entry points (``invsr-sr``/``invsr-export`` ``main``, ``train(cfg)``,
``train.py`` in a subprocess), asserting on files and exit codes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def _integration_conftest():
    """The integration suite's ``compose_train`` (one way to compose the real configs for tests)."""
    spec = importlib.util.spec_from_file_location(
        "_integration_conftest", REPO_ROOT / "tests" / "integration" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compose_train = _integration_conftest().compose_train


@pytest.fixture
def train_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``train_cfg("experiment=smoke", ...)`` -> a config writing below this test's tmp_path."""

    def _make(*overrides: str, subdir: str | None = None) -> DictConfig:
        return compose_train(list(overrides), tmp_path / subdir if subdir else tmp_path)

    return _make


def run_train_py(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python train.py OVERRIDES`` from the repository root, offline, one CPU thread."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def smoke_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """A seconds-long CPU run (experiment=smoke) with every output below ``tmp_path``."""
    return [
        "experiment=smoke",
        "logger=csv",
        "callbacks.image_logger=null",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *extra,
    ]
