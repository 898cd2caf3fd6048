"""Shared pytest configuration: hardware/network markers skip themselves where they cannot run."""

from __future__ import annotations

import os

import pytest
import torch
from hydra.core.hydra_config import HydraConfig

# Tiny models are dominated by per-op overhead, where extra intra-op threads only add contention on the
# 2-core CI machine (measured: a sampler test file went from 115 s to 25 s). Override with INVSR_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("INVSR_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_gpu = torch.cuda.is_available()
    run_network = os.environ.get("INVSR_RUN_NETWORK", "0") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_net = pytest.mark.skip(reason="downloads weights; set INVSR_RUN_NETWORK=1 to run")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "network" in item.keywords and not run_network:
            item.add_marker(skip_net)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default tests never touch the network: the Hugging Face hub is forced offline."""
    if os.environ.get("INVSR_RUN_NETWORK", "0") != "1":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _no_leftover_hydra_config():
    """Tests that compose with ``return_hydra_config`` set the process-wide HydraConfig; clear it after each
    test, so that a later test does not run "inside" an earlier one's Hydra job (e.g. run names of the
    trackers, command-line overrides read by evaluate.py)."""
    yield
    HydraConfig.instance().cfg = None
