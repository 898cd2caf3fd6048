"""The global batch splits over devices and micro-batches as docs/training.md states."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from invsr_pl.utils.batching import check_batch_config, derive_batch, resolve_world_size


@pytest.mark.parametrize(
    ("world", "micro", "per_device", "micro_used", "steps"),
    [
        (1, 16, 64, 16, 4),
        (2, 16, 32, 16, 2),
        (4, 16, 16, 16, 1),
        (8, 16, 8, 8, 1),
        (16, None, 4, 4, 1),
        (1, 24, 64, 24, 3),
    ],
)
def test_paper_batch_over_device_counts(world, micro, per_device, micro_used, steps):
    plan = derive_batch(64, world, micro)
    assert (plan.per_device_batch_size, plan.micro_batch_size, plan.micro_batches) == (
        per_device,
        micro_used,
        steps,
    )
    assert plan.per_device_batch_size * plan.world_size == 64
    assert "64" in plan.describe()


def test_non_dividing_global_batch_lists_what_works():
    with pytest.raises(ValueError, match="data.global_batch_size=64 does not divide over 3") as err:
        derive_batch(64, 3, 16)
    assert "1, 2, 4, 8, 16, 32, 64" in str(err.value) and "63 or 66" in str(err.value)


@pytest.mark.parametrize("bad", [(0, 1, None), (8, 0, None), (8, 1, 0), (8, 1, -2)])
def test_non_positive_values(bad):
    with pytest.raises(ValueError, match="positive integer"):
        derive_batch(*bad)


@pytest.mark.parametrize(
    ("devices", "nodes", "accel", "world"),
    [
        (1, 1, "cpu", 1),
        (4, 2, "gpu", 8),
        ("2", 1, "gpu", 2),
        ([0, 1, 2], 1, "gpu", 3),
        ("0,1", 2, "gpu", 4),
        ("auto", 1, "cpu", 1),
        (-1, 3, "cpu", 3),
    ],
)
def test_world_size(devices, nodes, accel, world):
    assert resolve_world_size(devices, nodes, accel) == world


def test_check_batch_config_reads_the_composed_keys():
    cfg = OmegaConf.create(
        {
            "data": {"global_batch_size": 64},
            "model": {"micro_batch_size": 16},
            "trainer": {"devices": 8, "num_nodes": 1, "accelerator": "gpu"},
        }
    )
    plan = check_batch_config(cfg)
    assert (plan.per_device_batch_size, plan.micro_batches) == (8, 1)
    cfg.trainer.devices = 6
    with pytest.raises(ValueError, match="does not divide over 6"):
        check_batch_config(cfg)
    assert check_batch_config(OmegaConf.create({"data": {"batch_size": 4}})) is None
