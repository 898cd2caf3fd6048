"""End-to-end ``train(cfg)``: smoke and quick-start runs, exact resume, 2-process DDP on CPU."""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig
from tree_compare import assert_same_tree, load_checkpoint

from callbacks.ema import EMA_CHECKPOINT_KEY, NoisePredictorEMA
from train import _log_outputs, train

MakeCfg = Callable[..., DictConfig]


def _assert_run_outputs(run_dir: Path) -> dict[str, Any]:
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file(), f"no checkpoint in {run_dir}"
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    assert list((run_dir / "images" / "val").glob("iter_*.png")), "no validation grid labelled in iterations"
    ckpt = load_checkpoint(last)
    assert EMA_CHECKPOINT_KEY in ckpt
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"]), "frozen SD-Turbo in the checkpoint"
    return ckpt


def _final_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "train"][-4:]


def test_smoke_run(train_cfg: MakeCfg, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="train")
    metrics, objects = train(train_cfg("experiment=smoke", "test=true"))
    ckpt = _assert_run_outputs(tmp_path / "run")
    run = tmp_path / "run"  # the run ends with where everything went
    assert _final_lines(caplog) == [
        f"Run folder: {run}",
        f"Checkpoint: {run / 'checkpoints' / 'last.ckpt'}",
        f"Validation images: {run / 'images' / 'val'}",
        f"TensorBoard: tensorboard --logdir {objects['loggers'][0].log_dir}",
    ]
    assert Path(objects["loggers"][0].log_dir) == run / "tensorboard"
    assert objects["model"].iteration == 4
    assert math.isfinite(metrics["val/psnr_1step"])
    assert is_overridden("test_step", objects["model"])
    assert {"test/val/psnr_1step", "test/val/ssim_1step"} <= set(metrics), sorted(metrics)
    np_keys = set(objects["model"].noise_predictor.state_dict())
    assert set(ckpt[EMA_CHECKPOINT_KEY]) == np_keys

    # validate-only from the checkpoint: a fresh EMA callback reads the EMA weights from the file and swaps
    # them in; the training weights come back afterwards
    ema = NoisePredictorEMA()
    trainer = L.Trainer(callbacks=[ema], logger=False, enable_progress_bar=False, limit_val_batches=1)
    last = str(tmp_path / "run/checkpoints/last.ckpt")
    trainer.validate(objects["model"], objects["datamodule"], ckpt_path=last)
    assert ema.ema is not None
    for k, v in ckpt[EMA_CHECKPOINT_KEY].items():
        assert torch.equal(ema.ema[k], v)
    for k, v in objects["model"].noise_predictor.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][f"noise_predictor.{k}"])


def test_fast_dev_run_names_no_checkpoint_it_did_not_write(
    train_cfg: MakeCfg, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """debug=fdr: the checkpoint line names a file that exists, or says none was written; and a checkpoint
    callback that remembers a path it never wrote (what fdr used to log) gives 'none written'."""
    caplog.set_level(logging.INFO, logger="train")
    _, objects = train(train_cfg("experiment=smoke", "debug=fdr"))
    lines = _final_lines(caplog)
    checkpoint = next(line for line in lines if line.startswith("Checkpoint: "))
    written = checkpoint.removeprefix("Checkpoint: ")
    assert written.startswith("none written") or Path(written).is_file(), checkpoint
    assert not any(line.startswith("TensorBoard: ") for line in lines)  # fdr logs nothing

    trainer = objects["trainer"]
    trainer.checkpoint_callback.last_model_path = str(tmp_path / "never" / "last.ckpt")
    caplog.clear()
    _log_outputs(trainer)
    assert "Checkpoint: none written (fast_dev_run saves none)" in _final_lines(caplog)


def test_image_logger_without_tensorboard(tmp_path: Path) -> None:
    """A CSV-only run still gets PNG grids (LQ | SR per step count | GT) and no error."""
    from lightning.pytorch.loggers import CSVLogger

    from callbacks.image_logger import ValidationImageLogger

    module = L.LightningModule()
    module.iteration = 7  # InvSR iterations label the grids, not trainer.global_step
    module.last_val_images = {
        "lq": torch.rand(2, 3, 8, 8),
        "gt": torch.rand(2, 3, 32, 32),
        "sr": {3: torch.rand(2, 3, 32, 32), 1: torch.rand(2, 3, 32, 32)},
    }
    trainer = L.Trainer(logger=CSVLogger(tmp_path), default_root_dir=tmp_path, enable_progress_bar=False)
    cb = ValidationImageLogger(max_images=2, output_dir=str(tmp_path))
    cb.on_validation_end(trainer, module)
    assert cb.last_png is not None and cb.last_png.is_file() and cb.last_png.name == "iter_00000007.png"
    grid, cols = ValidationImageLogger.build_grid(module.last_val_images, max_images=2)
    assert cols == 4 and grid.shape == (3, 2 * 34 + 2, 4 * 34 + 2)


@pytest.mark.slow
def test_quickstart_run(train_cfg: MakeCfg, tmp_path: Path) -> None:
    start = time.perf_counter()
    metrics, objects = train(train_cfg("experiment=quickstart"))
    elapsed = time.perf_counter() - start
    _assert_run_outputs(tmp_path / "run")
    assert objects["model"].iteration == objects["cfg"].model.max_iterations
    assert "val/psnr_1step" in metrics
    print(f"quickstart: {elapsed:.1f} s")


# ---------------------------------------------------------------------------------------------- resume
def _csv_losses(run_dir: Path) -> dict[int, float]:
    losses: dict[int, float] = {}
    for path in run_dir.rglob("metrics.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(train_cfg: MakeCfg, tmp_path: Path) -> None:
    """4 iterations == 2 + resume from last.ckpt (``ckpt_path=last``) + 2 more, to float tolerance."""
    common = [
        "experiment=smoke",
        "logger=csv",
        "trainer.val_check_interval=100",  # no validation: this compares training state only
        "callbacks.model_checkpoint.every_n_iterations=1",
        "callbacks.image_logger=null",
    ]
    train(train_cfg(*common, "model.max_iterations=4", subdir="full"))
    full = load_checkpoint(tmp_path / "full" / "run" / "checkpoints" / "last.ckpt")

    logs = tmp_path / "split" / "logs"
    first = [*common, f"paths.log_dir={logs}", f"paths.output_dir={logs}/smoke/runs/first"]
    train(train_cfg(*first, "model.max_iterations=2", subdir="split"))
    assert load_checkpoint(logs / "smoke/runs/first/checkpoints/last.ckpt")["invsr_iteration"] == 2
    second = [*common, f"paths.log_dir={logs}", f"paths.output_dir={logs}/smoke/runs/second"]
    second.append("ckpt_path=last")
    _, objects = train(train_cfg(*second, "model.max_iterations=4", subdir="split"))
    assert objects["ckpt_path"].endswith("first/checkpoints/last.ckpt")
    resumed = load_checkpoint(logs / "smoke/runs/second/checkpoints/last.ckpt")

    assert resumed["global_step"] == full["global_step"]
    assert resumed["invsr_iteration"] == full["invsr_iteration"] == 4
    for key in ("state_dict", EMA_CHECKPOINT_KEY, "optimizer_states", "lr_schedulers"):
        assert_same_tree(full[key], resumed[key], key)
    ema_state = [v for k, v in full["callbacks"].items() if "NoisePredictorEMA" in k]
    assert ema_state and ema_state[0]["num_updates"] == 4
    for key, state in full["callbacks"].items():  # checkpoint paths differ by run folder; all else must match
        if not key.startswith("ModelCheckpoint"):
            assert_same_tree(state, resumed["callbacks"][key], key)
    assert_same_tree(full["loops"], resumed["loops"], "loops")

    full_losses = _csv_losses(tmp_path / "full" / "run")
    split_losses = {**_csv_losses(logs / "smoke/runs/first"), **_csv_losses(logs / "smoke/runs/second")}
    assert full_losses and set(full_losses) == set(split_losses)
    for step, loss in full_losses.items():
        assert split_losses[step] == pytest.approx(loss, rel=1e-5), f"loss differs at step {step}"


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_sim_ranks_stay_identical(train_cfg: MakeCfg, tmp_path: Path) -> None:
    dump = tmp_path / "ranks"
    dump.mkdir()
    cfg = train_cfg(
        "experiment=smoke",
        "trainer=ddp_sim",
        "model.max_iterations=3",
        "logger=csv",
        "+callbacks.dump._target_=rank_weights.DumpRankWeights",
        f"+callbacks.dump.folder={dump}",
    )
    train(cfg)
    r0, r1 = load_checkpoint(dump / "rank0.pt"), load_checkpoint(dump / "rank1.pt")
    assert r0["iteration"] == r1["iteration"] == 3
    for part in ("np", "d", "ema"):
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), f"{part}.{k} differs across ranks"
    # training moved the weights away from their average (so the comparison is not vacuous)
    assert any(not torch.equal(r0["np"][k], r0["ema"][k]) for k in r0["np"])
