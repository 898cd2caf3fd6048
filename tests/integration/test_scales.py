"""The top-level `scale` key trains an x2 model end to end, and its export gives exactly 2x outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from invsr_pl.cli.export import main as export_main
from invsr_pl.cli.sr import main as sr_main
from invsr_pl.utils.images import read_image, write_image
from train import train

MakeCfg = Callable[..., DictConfig]


@pytest.mark.slow
def test_x2_quickstart_trains_and_its_noise_predictor_gives_2x(train_cfg: MakeCfg, tmp_path: Path) -> None:
    cfg = train_cfg(
        "experiment=quickstart",
        "scale=2",
        "model.max_iterations=3",
        "trainer.val_check_interval=3",
        "callbacks.model_checkpoint.every_n_iterations=3",
        "logger=csv",
    )
    _, objects = train(cfg)
    model, datamodule = objects["model"], objects["datamodule"]
    assert model.iteration == 3 and model.noise_predictor.scale == 2
    assert datamodule.degradation.scale == 2 and datamodule.val_set.scale == 2
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    exported = tmp_path / "x2_export"
    assert export_main([str(ckpt), str(exported)]) == 0  # invsr-export: the EMA noise predictor
    src = tmp_path / "in" / "photo.png"
    src.parent.mkdir()
    write_image(src, torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(0)))
    out = tmp_path / "out"
    for source in (exported, ckpt):  # the exported folder and the training checkpoint itself
        args = ["--noise-predictor", str(source), "--device", "cpu", "--no-progress"]  # the recorded backbone
        assert sr_main([str(src), "-o", str(out / source.name), *args]) == 0
        assert read_image(out / source.name / "photo.png").image.shape == (3, 48, 80)  # exactly 2x
