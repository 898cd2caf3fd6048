"""Compose the real training configs (conf/) for integration tests, with every output inside tmp_path."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "conf"
if str(REPO_ROOT) not in sys.path:  # train.py lives at the repository root, outside any package
    sys.path.insert(0, str(REPO_ROOT))


def compose_train(overrides: list[str], tmp_path: Path | None = None) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``; with ``tmp_path`` all outputs and logs go there.

    ``paths.output_dir`` / ``paths.work_dir`` normally come from ``${hydra:...}``, which only resolves
    inside a ``@hydra.main`` run, so they are set explicitly here.
    """
    paths = [f"paths.root_dir={REPO_ROOT}", f"paths.work_dir={REPO_ROOT}"]
    if tmp_path is not None:
        paths += [f"paths.output_dir={tmp_path / 'run'}", f"paths.log_dir={tmp_path / 'logs'}"]
    else:
        paths += ["paths.output_dir=/nonexistent/compose-only"]
    given = {o.split("=", 1)[0] for o in overrides}
    paths = [p for p in paths if p.split("=", 1)[0] not in given]  # an explicit override wins
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*paths, *overrides])


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """``compose_cfg(overrides, tmp_path=None)``: see :func:`compose_train`."""
    return compose_train


@pytest.fixture
def train_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``train_cfg("experiment=smoke", ...)`` -> a config writing below this test's tmp_path."""

    def _make(*overrides: str, subdir: str | None = None) -> DictConfig:
        root = tmp_path / subdir if subdir else tmp_path
        return compose_train(list(overrides), root)

    return _make
