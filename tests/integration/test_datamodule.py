"""SRDataModule with Lightning: device-side degradation while training, paired val/test batches, checkpointed
degradation state, exact mid-epoch resume, and the conf/data configs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from datamodules.degradation.pipeline import RealESRGANDegradation
from datamodules.samples import SampleGTImages, SamplePairs
from datamodules.sr_datamodule import SRDataModule

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _dm(pool: int = 0, seed: int = 0, repeat: int = 3, test_datasets=None) -> SRDataModule:
    return SRDataModule(
        train_dataset=SampleGTImages(names=["astronaut", "coffee"], gt_size=64, repeat=repeat),
        val_dataset=SamplePairs(names=["chelsea"], gt_size=64, lq_mode="bicubic"),
        test_datasets=test_datasets,
        degradation=RealESRGANDegradation(scale=4),
        global_batch_size=2,
        num_workers=0,
        pin_memory=False,
        persistent_workers=True,  # ignored without workers
        pair_pool_size=pool,
        seed=seed,
    )


def test_degrade_batch_without_trainer_gives_lq_at_gt_over_scale():
    dm = _dm(pool=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"gt"} and batch["gt"].shape == (2, 3, 64, 64)
    out = dm.degrade_batch(batch)
    assert out["lq"].shape == (2, 3, 16, 16) and out["gt"].shape == (2, 3, 64, 64)
    assert out["lq"].dtype == torch.float32 and 0.0 <= float(out["lq"].min()) <= float(out["lq"].max()) <= 1.0


def test_state_dict_round_trip_reproduces_the_next_degraded_batch():
    dm = _dm(pool=4)
    batches = [dm.degrade_batch({"gt": torch.rand(2, 3, 64, 64)}) and None for _ in range(3)]  # pool is full
    state = dm.state_dict()
    assert state["ranks"][0]["generator"]["device_type"] == "cpu"
    gt = (torch.rand(2, 3, 64, 64) * 255).round() / 255
    want = dm.degrade_batch({"gt": gt.clone()})
    other = _dm(pool=4)
    other.load_state_dict(state)
    got = other.degrade_batch({"gt": gt.clone()})
    torch.testing.assert_close(got["lq"], want["lq"], rtol=0, atol=0)
    torch.testing.assert_close(got["gt"], want["gt"], rtol=0, atol=0)
    assert batches == [None] * 3
    fresh = _dm(pool=4).degrade_batch({"gt": gt.clone()})  # without the state: a different stream
    assert not torch.equal(fresh["lq"], want["lq"])


def test_seed_and_rank_streams_differ():
    gt = torch.rand(2, 3, 64, 64)
    a = _dm(seed=0).degrade_batch({"gt": gt})["lq"]
    b = _dm(seed=0).degrade_batch({"gt": gt})["lq"]
    c = _dm(seed=1).degrade_batch({"gt": gt})["lq"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_val_and_test_loaders():
    bic = SamplePairs(names=["coffee", "rocket"], gt_size=32, lq_mode="bicubic")
    dm = _dm(test_datasets={"b": bic, "a": SamplePairs(names=["camera"], gt_size=32, lq_mode="bicubic")})
    dm.setup("test")
    assert dm.test_names == ["b", "a"]
    loaders = dm.test_dataloader()
    batch = next(iter(loaders[0]))
    assert (
        batch["name"] == ["coffee"]
        and batch["lq"].shape == (1, 3, 8, 8)
        and batch["gt"].shape == (1, 3, 32, 32)
    )
    assert next(iter(loaders[1]))["name"] == ["camera"]
    assert _dm().test_names == ["val"]  # no test_datasets: the validation set
    assert next(iter(_dm().val_dataloader()))["name"] == ["chelsea"]


class _Recorder(L.LightningModule):
    """Trains one scalar; records what every training / validation batch looked like."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.train_batches: list[dict[str, torch.Tensor]] = []
        self.val_batches: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.train_batches.append({k: v.detach().clone() for k, v in batch.items()})
        return (self.w - batch["lq"].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_fast_dev_run_gives_the_module_lq_gt_pairs(tmp_path):
    model = _Recorder()
    _trainer(tmp_path, fast_dev_run=2).fit(model, datamodule=_dm(pool=2))
    assert len(model.train_batches) == 2
    for batch in model.train_batches:
        assert set(batch) == {"lq", "gt"}
        assert batch["lq"].shape == (2, 3, 16, 16) and batch["gt"].shape == (2, 3, 64, 64)
    (val,) = model.val_batches[:1]
    assert set(val) == {"lq", "gt", "name"} and val["name"] == ["chelsea"]  # val batches are not degraded
    assert val["lq"].shape == (1, 3, 16, 16)


class _SaveAt(L.Callback):
    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("resume_step", [4, 3])  # mid-epoch (3 batches per epoch) and at an epoch end
def test_resume_continues_with_identical_batches(tmp_path, resume_step):
    ckpt = tmp_path / "mid.ckpt"
    full = _Recorder()
    _trainer(tmp_path, max_steps=7, callbacks=[_SaveAt(resume_step, ckpt)], limit_val_batches=0).fit(
        full, datamodule=_dm(pool=4)
    )
    resumed = _Recorder()
    _trainer(tmp_path, max_steps=7, limit_val_batches=0).fit(resumed, datamodule=_dm(pool=4), ckpt_path=ckpt)
    assert len(full.train_batches) == 7
    tail = full.train_batches[resume_step:]
    assert len(resumed.train_batches) == len(tail)
    for want, got in zip(tail, resumed.train_batches, strict=True):
        torch.testing.assert_close(got["gt"], want["gt"], rtol=0, atol=0)
        torch.testing.assert_close(got["lq"], want["lq"], rtol=0, atol=0)


def test_data_configs_compose_and_samples_instantiates():
    hydra = pytest.importorskip("hydra")
    from hydra.utils import instantiate

    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name in ("sr_realesrgan", "paired"):
            cfg = hydra.compose(config_name="train", overrides=[f"data={name}"])
            assert cfg.data._target_ == "datamodules.sr_datamodule.SRDataModule"
            assert cfg.data.degradation._target_.endswith("RealESRGANDegradation")
        cfg = hydra.compose(
            config_name="train",
            overrides=["data=samples", "data.val_dataset.num_images=1", "data.val_dataset.gt_size=64"],
        )
        assert cfg.data.train_dataset.gt_size == 64
        dm = instantiate(cfg.data)
    assert isinstance(dm, SRDataModule) and dm.seed == cfg.seed
    dm.setup("fit")
    out = dm.degrade_batch(next(iter(dm.train_dataloader())))
    assert out["lq"].shape == (2, 3, 16, 16)
    assert next(iter(dm.val_dataloader()))["lq"].shape == (1, 3, 16, 16)


@pytest.mark.gpu
def test_gpu_degradation_state_round_trip_and_trainer(tmp_path):
    gt = ((torch.rand(2, 3, 64, 64) * 255).round() / 255).cuda()
    dm = _dm(pool=4)
    for _ in range(3):
        dm.degrade_batch({"gt": gt})
    state = dm.state_dict()
    assert state["ranks"][0]["generator"]["device_type"] == "cuda"
    want = dm.degrade_batch({"gt": gt})
    other = _dm(pool=4)
    other.load_state_dict(state)
    got = other.degrade_batch({"gt": gt})
    assert got["lq"].is_cuda and got["lq"].shape == (2, 3, 16, 16)
    torch.testing.assert_close(got["lq"], want["lq"], rtol=0, atol=0)
    torch.testing.assert_close(got["gt"], want["gt"], rtol=0, atol=0)
    model = _Recorder()
    trainer = L.Trainer(accelerator="gpu", devices=1, fast_dev_run=2, logger=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=_dm(pool=2))
    assert model.train_batches[0]["lq"].is_cuda and model.train_batches[0]["lq"].shape == (2, 3, 16, 16)


def _epoch_batches(dm: SRDataModule, epochs: int) -> list[torch.Tensor]:
    dm.setup("fit")
    loader = dm.train_dataloader()
    return [batch["gt"] for _ in range(epochs) for batch in loader]


def test_worker_crops_are_seeded_per_rank_worker_and_epoch():
    def make() -> SRDataModule:
        dm = _dm(repeat=2)
        dm.num_workers, dm.persistent_workers = 2, False
        return dm

    first, second = _epoch_batches(make(), 2), _epoch_batches(make(), 2)
    assert len(first) == 4
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same seed -> same batches, with workers
    epoch0, epoch1 = torch.cat(first[:2]), torch.cat(first[2:])
    assert not torch.equal(epoch0, epoch1)  # a new epoch draws new crops
