"""Multiruns through the real ``train.py``: one folder per job, and a summary table at the end; also sweeps
whose jobs are 2-process DDP runs started by Lightning's re-executing launcher (gloo on CPU), each job its
own single run (invsr_pl/launch/job_process.py)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from invsr_pl import sweeps
from invsr_pl.cli import sweep_summary

REPO_ROOT = Path(__file__).resolve().parents[2]
# 2 processes over gloo with Lightning's re-executing launcher (not spawn); each rank saves its weights into
# <job>/ranks (rank_weights.py, importable by the ranks through PYTHONPATH)
DDP = [
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.strategy=ddp_find_unused_parameters_true",
    "model.max_iterations=2",
    "trainer.val_check_interval=2",
    "callbacks.model_checkpoint.every_n_iterations=2",
    "callbacks.image_logger=null",
    "logger=csv",
    "+callbacks.dump._target_=rank_weights.DumpRankWeights",
    "+callbacks.dump.folder=${paths.output_dir}/ranks",
]


def _multirun(sweep_dir: Path, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py -m experiment=smoke <overrides>`` with its sweep and logs below ``tmp_path``."""
    cmd = [sys.executable, "train.py", "-m", "experiment=smoke", *overrides]
    cmd += [f"hydra.sweep.dir={sweep_dir}", f"paths.log_dir={tmp_path / 'logs'}"]
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


def _last_csv_value(job: Path, key: str) -> float:
    rows = [r for r in csv.DictReader((job / "csv" / "metrics.csv").read_text().splitlines()) if r.get(key)]
    return float(rows[-1][key])


def _assert_one_ddp_run(job: Path) -> None:
    """The job folder holds one 2-process run: a checkpoint, one CSV log, and the two ranks' weights, equal
    to each other (and trained away from their EMA, so the comparison is not vacuous)."""
    assert (job / "checkpoints" / "last.ckpt").is_file()
    assert [p.relative_to(job).as_posix() for p in job.rglob("metrics.csv")] == ["csv/metrics.csv"]
    assert sorted(p.name for p in (job / "ranks").iterdir()) == ["rank0.pt", "rank1.pt"]
    r0, r1 = (torch.load(job / "ranks" / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world_size"], r1["world_size"]) == (0, 1, 2, 2)
    assert r0["iteration"] == r1["iteration"] == 2
    for part in ("np", "d", "ema"):
        for k, v in r0[part].items():
            assert torch.equal(v, r1[part][k]), f"{job.name}: {part}.{k} differs across ranks"
    assert any(not torch.equal(r0["np"][k], r0["ema"][k]) for k in r0["np"])


def _assert_no_nested_sweeps(tmp_path: Path, sweep_dir: Path, jobs: list[str]) -> None:
    """Exactly these job folders, and no sweep (or run folder) started inside a job."""
    assert [p.relative_to(sweep_dir).as_posix() for p in sweeps.find_jobs(sweep_dir)] == jobs
    assert not list(tmp_path.rglob("multiruns")) and not (tmp_path / "logs").exists()


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
    assert sweep_summary.main([str(sweep_dir)]) == 0
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
    assert sweep_summary.main([str(sweep_dir)]) == 1  # rebuilding: jobs without a value


@pytest.mark.slow
@pytest.mark.distributed
def test_sweep_of_ddp_jobs(tmp_path: Path) -> None:
    """``-m`` over list values with ``trainer.devices=2``: each job is one 2-process run of its own overrides
    in its own folder; the sweep returns rank 0's metric and writes the only summary."""
    sweep_dir = tmp_path / "sweep"
    proc = _multirun(sweep_dir, tmp_path, "model.train_timesteps=[250],[200]", *DDP)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    _assert_no_nested_sweeps(tmp_path, sweep_dir, ["0", "1"])
    assert output.count("Launching 2 jobs locally") == 1  # a rank re-running the sweep would launch again
    for job, timesteps in (("0", [250]), ("1", [200])):
        folder = sweep_dir / job
        _assert_one_ddp_run(folder)
        assert OmegaConf.load(folder / ".hydra" / "config.yaml").model.train_timesteps == timesteps
        record = json.loads((folder / sweeps.JOB_RECORD).read_text())
        assert record["status"] == "completed"
        assert record["return_value"] == pytest.approx(_last_csv_value(folder, "val/psnr_1step"), rel=1e-6)
    rows = list(csv.DictReader((sweep_dir / "summary.csv").read_text().splitlines()))
    assert sorted(r["model.train_timesteps"] for r in rows) == ["[200]", "[250]"]
    assert [r["status"] for r in rows] == ["completed", "completed"]
    # rank 1 ran in RUN mode: it wrote none of the sweep's files
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_file()) == [
        "multirun.yaml", "summary.csv", "summary.md", "summary.png",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.distributed
def test_a_failing_ddp_job_fails_alone(tmp_path: Path) -> None:
    """Job 0's value is refused by the constructor in its own process (exit 2, one line); the sweep goes on
    to job 1, and the summary lists both."""
    sweep_dir = tmp_path / "sweep"
    proc = _multirun(sweep_dir, tmp_path, "model.dis_update_freq=0,1", *DDP)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]  # Hydra: a job failed
    failed = json.loads((sweep_dir / "0" / sweeps.JOB_RECORD).read_text())
    assert failed["status"] == "failed"
    assert failed["error"].startswith("SweepJobError: job 0's 2-process run exited with code 2: ")
    assert "dis_update_freq" in failed["error"]
    _assert_one_ddp_run(sweep_dir / "1")
    rows = list(csv.DictReader((sweep_dir / "summary.csv").read_text().splitlines()))
    assert [(r["job"], r["rank"], r["status"]) for r in rows] == [
        ("1", "1", "completed"),
        ("0", "", "failed"),
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_optuna_over_ddp_jobs(tmp_path: Path) -> None:
    """2 Optuna trials of 2-process jobs: each trial's value is rank 0's final metric, told once."""
    import hydra
    from packaging.version import Version

    if Version(hydra.__version__) >= Version("1.4.0.dev0"):
        # Hydra 1.4 instantiates plugins non-recursively: the sampler config reaches hydra-optuna-sweeper 1.3
        # uninstantiated and every Optuna sweep stops before its first trial ('infer_relative_search_space')
        pytest.skip(f"hydra-optuna-sweeper cannot build its sampler on hydra-core {hydra.__version__}")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs pip install -e '.[optuna]'")
    sweep_dir = tmp_path / "sweep"
    search = ["hparams_search=loss_weights_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1"]
    proc = _multirun(sweep_dir, tmp_path, *search, *DDP)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    _assert_no_nested_sweeps(tmp_path, sweep_dir, ["0", "1"])
    assert output.count("Launching 1 jobs locally") == 2  # Optuna: one batch per trial (n_jobs=1)
    values = {}
    for job in ("0", "1"):
        _assert_one_ddp_run(sweep_dir / job)
        record = json.loads((sweep_dir / job / sweeps.JOB_RECORD).read_text())
        values[job] = _last_csv_value(sweep_dir / job, "val/psnr_1step")  # rank 0 logs
        assert record["return_value"] == pytest.approx(values[job], rel=1e-6)  # what Optuna was told
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.best_value == pytest.approx(max(values.values()), rel=1e-6)
    assert len(list(csv.DictReader((sweep_dir / "summary.csv").read_text().splitlines()))) == 2
