"""A two-job multirun through the real ``train.py`` (Hydra's basic sweeper, one folder per job)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_job_multirun(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=smoke",
        "model.gan_weight=0,0.1",
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "logger=csv",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in job_dirs] == ["0", "1"]
    weights = []
    for job in job_dirs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        weights.append(cfg.model.gan_weight)
        assert OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.runtime.output_dir == str(job)
    assert weights == [0, 0.1]
