"""Multiruns through the real ``train.py``: one folder per job, and a summary table at the end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from invsr_pl import sweeps

REPO_ROOT = Path(__file__).resolve().parents[2]


def _multirun(sweep_dir: Path, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py -m experiment=smoke <overrides>`` with its sweep and logs below ``tmp_path``."""
    cmd = [sys.executable, "train.py", "-m", "experiment=smoke", *overrides]
    cmd += [f"hydra.sweep.dir={sweep_dir}", f"paths.log_dir={tmp_path / 'logs'}"]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_job_multirun_writes_a_summary(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    proc = _multirun(sweep_dir, tmp_path, "model.gan_weight=0,0.1", "logger=csv")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in job_dirs] == ["0", "1"]
    weights, psnr = [], {}
    for job in job_dirs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        weights.append(cfg.model.gan_weight)
        assert OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.output_dir == str(job)
        record = json.loads((job / sweeps.JOB_RECORD).read_text())  # written by the Hydra callback
        assert record["status"] == "completed" and record["job"] == int(job.name)
        psnr[job.name] = record["return_value"]  # what train.py returned to the sweeper
    assert weights == [0, 0.1]

    # the callback's table: one row per job, best first, with its override, metrics and folder
    rows = list(csv.DictReader((sweep_dir / "summary.csv").read_text().splitlines()))
    assert sorted(psnr, key=psnr.get, reverse=True) == [r["job"] for r in rows]
    for rank, row in enumerate(rows, start=1):
        job = row["job"]
        assert row["rank"] == str(rank) and row["status"] == "completed" and row["run_dir"] == job
        assert row["model.gan_weight"] == ["0", "0.1"][int(job)]
        assert float(row["val/psnr_1step"]) == pytest.approx(psnr[job], rel=1e-6)
        assert float(row["val/psnr_2step"]) > 0 and 0 < float(row["val/ssim_1step"]) <= 1
    md = (sweep_dir / "summary.md").read_text()
    assert f"Best: job {rows[0]['job']} (`model.gan_weight=" in md
    assert (sweep_dir / "summary.png").read_bytes()[:4] == b"\x89PNG"

    # the command rebuilds the same table from the folder alone
    before = (sweep_dir / "summary.csv").read_text()
    (sweep_dir / "summary.csv").unlink()
    assert sweeps.main([str(sweep_dir)]) == 0
    assert (sweep_dir / "summary.csv").read_text() == before


def test_optuna_search_composes() -> None:
    """hparams_search=loss_weights_optuna selects the plugin's sweeper and validates against its schema."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs pip install -e '.[optuna]'")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=smoke", "hparams_search=loss_weights_optuna"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert sweeper.direction == "maximize" and sweeper.sampler.seed == 12345
    assert set(sweeper.params) == {"model.lpips_weight", "model.gan_weight"}
    assert cfg.optimized_metric == "val/psnr_1step"
    assert instantiate(cfg.hydra.callbacks.sweep_summary).mode == "max"  # follows the sweeper's direction


@pytest.mark.slow
def test_failed_job_still_leaves_a_summary(tmp_path: Path) -> None:
    """The basic sweeper runs every job, then raises for a failed one before on_multirun_end: the table
    written after each job still has every row, with the error (both jobs fail at once, to keep this short;
    the unit tests cover mixed tables)."""
    sweep_dir = tmp_path / "sweep"
    proc = _multirun(sweep_dir, tmp_path, "model.dis_update_freq=0,-1")  # refused by the constructor
    assert proc.returncode != 0
    for job in ("0", "1"):
        record = json.loads((sweep_dir / job / sweeps.JOB_RECORD).read_text())
        assert record["status"] == "failed" and "dis_update_freq" in record["error"]
    rows = list(csv.DictReader((sweep_dir / "summary.csv").read_text().splitlines()))
    assert [(r["job"], r["rank"], r["status"], r["model.dis_update_freq"]) for r in rows] == [
        ("0", "", "failed", "0"),
        ("1", "", "failed", "-1"),
    ]
    md = (sweep_dir / "summary.md").read_text()
    failed = next(line for line in md.splitlines() if line.startswith("- job 0 (`0`): "))
    assert "dis_update_freq" in failed  # the error, on one line
    assert sweeps.main([str(sweep_dir)]) == 1  # rebuilding: jobs without a value
