"""The batch is global: 1 and 2 processes of one config train on the same number of images per iteration,
split as invsr_pl.utils.batching derives it; a global batch that does not divide stops before any model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as L
import pytest
from omegaconf import DictConfig

from invsr_pl.launch.startup_checks import SetupError
from invsr_pl.systems.invsr import InvSRLitModule
from train import train

MakeCfg = Callable[..., DictConfig]


class CountSamples(L.Callback):
    """Per rank: images of each training batch, micro-batches the module splits it into, and the plan."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.images: list[int] = []
        self.micro: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.images.append(int(batch["lq"].shape[0]))
        self.micro.append(len(pl_module._micro_batches(batch["lq"], batch["gt"], batch["lq"][:, 0, 0, 0])))

    def on_train_end(self, trainer, pl_module) -> None:
        plan = trainer.datamodule.batch_plan
        record = {"images": self.images, "micro": self.micro, "per_device": plan.per_device_batch_size,
                  "micro_batches": plan.micro_batches, "world": plan.world_size}  # fmt: skip
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _run(train_cfg: MakeCfg, tmp_path: Path, name: str, *overrides: str) -> list[dict]:
    folder = tmp_path / name
    folder.mkdir()
    cfg = train_cfg(
        "experiment=smoke",
        "data.global_batch_size=4",
        "model.micro_batch_size=1",
        "model.max_iterations=2",
        "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.every_n_iterations=2",
        "logger=csv",
        f"+callbacks.count._target_={__name__}.CountSamples",
        f"+callbacks.count.folder={folder}",
        *overrides,
        subdir=name,
    )
    train(cfg)
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank*.json"))]


@pytest.mark.slow
def test_one_and_two_processes_see_the_same_global_batch(train_cfg: MakeCfg, tmp_path: Path) -> None:
    one = _run(train_cfg, tmp_path, "one", "trainer=cpu")
    two = _run(train_cfg, tmp_path, "two", "trainer=ddp_sim")
    assert len(one) == 1 and len(two) == 2
    per_iteration = {
        "one": [sum(r["images"][i] for r in one) for i in range(2)],
        "two": [sum(r["images"][i] for r in two) for i in range(2)],
    }
    assert per_iteration["one"] == per_iteration["two"] == [4, 4]
    # 4 = 1 device x 4 images in 4 micro-batches of 1 = 2 devices x 2 images in 2 micro-batches of 1
    keys = ("world", "per_device", "micro_batches", "micro")
    assert [one[0][k] for k in keys] == [1, 4, 4, [4, 4]]
    for rank in two:
        assert [rank[k] for k in keys] == [2, 2, 2, [2, 2]]


def test_non_dividing_global_batch_fails_before_any_model(
    train_cfg: MakeCfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the batch check")

    monkeypatch.setattr(InvSRLitModule, "__init__", no_model)
    cfg = train_cfg("experiment=smoke", "trainer=ddp_sim", "data.global_batch_size=5")
    with pytest.raises(SetupError, match=r"global_batch_size=5 does not divide over 2 device.*1, 5.*4 or 6"):
        train(cfg)
