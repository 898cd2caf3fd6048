"""invsr-export round trip: checkpoint of a real (tiny, CPU) training run -> safetensors + official .pth."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.ema import NoisePredictorEMA
from invsr_pl.cli.export import OFFICIAL_NAME, main
from invsr_pl.models.loading import load_noise_predictor
from invsr_pl.models.noise_predictor import NoisePredictor
from invsr_pl.models.tiny import TINY_NOISE_PREDICTOR, build_tiny_sd_turbo, tiny_noise_predictor
from invsr_pl.systems.invsr import InvSRLitModule


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, InvSRLitModule]:
    """Three G-only iterations with the EMA callback, then a checkpoint (D and LPIPS are not needed)."""
    torch.manual_seed(0)
    module = InvSRLitModule(
        backbone=build_tiny_sd_turbo(seed=0),
        noise_predictor=tiny_noise_predictor(),
        lpips_weight=0.0,
        optimizer_g=partial(torch.optim.AdamW, lr=1e-3),
        lr_warmup_steps=0,
        gradient_checkpointing=False,
        val_lpips=False,
    )
    g = torch.Generator().manual_seed(0)
    batches = [{"lq": torch.rand(2, 3, 16, 16, generator=g), "gt": torch.rand(2, 3, 64, 64, generator=g)}] * 3
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[NoisePredictorEMA()],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_export_ema_round_trip(trained: tuple[Path, InvSRLitModule], tmp_path: Path) -> None:
    path, module = trained
    assert main([str(path), str(tmp_path)]) == 0
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ema = ckpt["ema_noise_predictor"]
    raw = module.noise_predictor.state_dict()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # the EMA really differs from the raw weights

    official = NoisePredictor.from_official(tmp_path / OFFICIAL_NAME, **TINY_NOISE_PREDICTOR)  # strict load
    state = torch.load(tmp_path / OFFICIAL_NAME, map_location="cpu", weights_only=True)
    assert type(state) is dict and all(k.startswith("encoder.") for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())
    pretrained = NoisePredictor.from_pretrained(tmp_path)
    for model in (official, pretrained):
        got = model.state_dict()
        assert got.keys() == ema.keys()
        assert all(torch.equal(got[k], ema[k].float()) for k in ema)


def test_export_raw_weights_with_no_ema(trained: tuple[Path, InvSRLitModule], tmp_path: Path) -> None:
    path, module = trained
    assert main([str(path), str(tmp_path), "--no-ema"]) == 0
    got = NoisePredictor.from_official(tmp_path / OFFICIAL_NAME, **TINY_NOISE_PREDICTOR).state_dict()
    assert all(torch.equal(got[k], v) for k, v in module.noise_predictor.state_dict().items())


def test_export_errors_are_clear(
    trained: tuple[Path, InvSRLitModule], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = trained
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    del ckpt["ema_noise_predictor"]
    no_ema = tmp_path / "no_ema.ckpt"
    torch.save(ckpt, no_ema)
    assert main([str(no_ema), str(tmp_path / "out")]) == 2
    assert "--no-ema" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]) == 2
    assert "missing.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_exported_files_have_ordinary_permissions(
    trained: tuple[Path, InvSRLitModule], tmp_path: Path
) -> None:
    path, _ = trained
    assert main([str(path), str(tmp_path / "out")]) == 0
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        OFFICIAL_NAME,
    ]  # no leftovers
    expected = 0o666 & ~_umask()
    assert all(f.stat().st_mode & 0o777 == expected for f in files), [oct(f.stat().st_mode) for f in files]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_load_noise_predictor_every_source(trained: tuple[Path, InvSRLitModule], tmp_path: Path) -> None:
    """One loader for invsr-sr and evaluate.py: .ckpt (EMA / raw), export folder, its .safetensors, .pth."""
    path, module = trained
    assert main([str(path), str(tmp_path)]) == 0
    ema = torch.load(path, map_location="cpu", weights_only=True)["ema_noise_predictor"]
    sources = [path, tmp_path, tmp_path / "diffusion_pytorch_model.safetensors", tmp_path / OFFICIAL_NAME]
    for source in sources:
        model, note = load_noise_predictor(source, default=lambda: tiny_noise_predictor())
        assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in ema.items()), note
    raw, note = load_noise_predictor(path, use_ema=False)
    assert note.startswith("module weights")
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in module.noise_predictor.state_dict().items())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_noise_predictor(tmp_path / "missing.pth")
