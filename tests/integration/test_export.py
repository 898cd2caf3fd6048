"""invsr-export round trip: a real (tiny, CPU) training checkpoint -> pipeline folder + official .pth."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.ema import NoisePredictorEMA
from invsr_pl.cli.export import OFFICIAL_NAME, main
from invsr_pl.cli.sr import main as sr_main
from invsr_pl.models.loading import load_noise_predictor
from invsr_pl.models.noise_predictor import NoisePredictor
from invsr_pl.models.tiny import TINY_NOISE_PREDICTOR, build_tiny_sd_turbo, tiny_noise_predictor
from invsr_pl.pipelines import InvSRPipeline
from invsr_pl.systems.invsr import InvSRLitModule
from invsr_pl.utils.images import read_image, write_image
from invsr_pl.utils.provenance import EXPORT_FILE

# what train.py records for a run on the random tiny twin (utils/provenance.py, format 1)
PROVENANCE = {
    "format": 1,
    "backbone": {"name": "tiny", "choice": "tiny", "config": {"seed": 0, "cross_attention_dim": 32}},
    "scale": 4,
    "noise_predictor": {},
    "prompt": None,
}


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
    module.provenance = PROVENANCE  # as train.py sets it
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
    pretrained = NoisePredictor.from_pretrained(tmp_path, subfolder="noise_predictor")
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
    files = sorted(p for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert sorted(f.relative_to(tmp_path / "out").as_posix() for f in files) == [
        EXPORT_FILE,
        "model_index.json",
        OFFICIAL_NAME,
        "noise_predictor/config.json",
        "noise_predictor/diffusion_pytorch_model.safetensors",
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
    folder = tmp_path / "noise_predictor"
    weights = folder / "diffusion_pytorch_model.safetensors"
    sources = [path, tmp_path, folder, weights, tmp_path / OFFICIAL_NAME]
    for source in sources:
        model, note = load_noise_predictor(source, default=lambda: tiny_noise_predictor())
        assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in ema.items()), note
    raw, note = load_noise_predictor(path, use_ema=False)
    assert note.startswith("module weights")
    assert all(torch.equal(raw.state_dict()[k], v) for k, v in module.noise_predictor.state_dict().items())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_noise_predictor(tmp_path / "missing.pth")


def test_export_is_a_pipeline_folder_that_reproduces_invsr_sr(
    trained: tuple[Path, InvSRLitModule], tmp_path: Path
) -> None:
    """model_index.json names the recorded backbone, the provenance is copied unchanged, and
    InvSRPipeline.from_pretrained(folder) gives invsr-sr's output for the same folder exactly."""
    path, _ = trained
    out = tmp_path / "export"
    assert main([str(path), str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "InvSRPipeline" and index["base_model"] == "tiny"
    assert not (out / "unet").exists()  # the backbone is named, not copied
    assert json.loads((out / EXPORT_FILE).read_text()) == PROVENANCE
    src = tmp_path / "in" / "photo.png"
    write_image(src, torch.rand(3, 20, 36, generator=torch.Generator().manual_seed(0)))
    sr_args = ["--noise-predictor", str(out), "--device", "cpu", "--no-progress", "--steps", "2"]
    assert sr_main([str(src), "-o", str(tmp_path / "sr"), *sr_args]) == 0
    expected = read_image(tmp_path / "sr" / "photo.png").image
    pipe = InvSRPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(read_image(src).image, num_inference_steps=2).images[0]
    assert torch.equal(torch.from_numpy(np.asarray(got)).permute(2, 0, 1).float() / 255, expected)


def test_export_with_backbone_and_base_model_checks(
    trained: tuple[Path, InvSRLitModule], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = trained
    assert main([str(path), str(tmp_path / "other"), "--base-model", "stabilityai/sd-turbo"]) == 2
    assert "tiny" in capsys.readouterr().err  # refused: the checkpoint records another backbone
    full = tmp_path / "full"
    assert main([str(path), str(full), "--with-backbone"]) == 0
    assert (full / "unet" / "config.json").is_file() and (full / "vae" / "config.json").is_file()
    named = tmp_path / "named"
    assert main([str(path), str(named)]) == 0
    lr = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    a, b = InvSRPipeline.from_pretrained(full), InvSRPipeline.from_pretrained(named)
    assert torch.equal(a(lr, output_type="pt").images, b(lr, output_type="pt").images)
