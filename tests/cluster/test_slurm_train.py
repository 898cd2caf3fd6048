"""Training under a real SLURM scheduler (the session's one-host cluster, tests/cluster/conftest.py).

- the project's sbatch script (scripts/slurm/train.sbatch, the README's) as a 2-task job ends with the weights
  of the same run on two local processes;
- ``scontrol requeue`` mid-run: the job saves at an iteration boundary, is requeued, resumes from its
  checkpoint and ends with the weights of the uninterrupted job;
- ``python train.py -m hydra/launcher=slurm ...`` submits a 2-job sweep whose summary has both rows.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from slurm_helpers import REPO_ROOT, TINY_SBATCH, TINY_TRAIN, TRAIN_SBATCH, Cluster, load_checkpoint

from callbacks.ema import EMA_CHECKPOINT_KEY

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

EMA_KEY = EMA_CHECKPOINT_KEY


def _assert_same(a: Any, b: Any, where: str) -> None:
    """The tolerance of the resume tests (tests/integration/test_train.py)."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_same_training_state(expected: Path, got: Path) -> None:
    want, have = load_checkpoint(expected), load_checkpoint(got)
    assert have["invsr_iteration"] == want["invsr_iteration"] == 8
    assert have["global_step"] == want["global_step"]
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        _assert_same(want[key], have[key], key)
    _assert_same(want[EMA_KEY], have[EMA_KEY], EMA_KEY)


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"{what}: not after {timeout:.0f} s")


def _submit_tiny(cluster: Cluster, logs: Path, *extra: str) -> tuple[int, Path, Path]:
    """The README's sbatch script as a 2-task tiny job; returns (job id, its run folder, its output file)."""
    out = logs / "job.out"
    job = cluster.sbatch(
        TRAIN_SBATCH, *TINY_TRAIN, f"paths.log_dir={logs}", *extra, options=TINY_SBATCH, output=out
    )
    return job, logs / "smoke" / "runs" / f"slurm-{job}", out


def _finished_ok(state: dict[str, str], out: Path) -> None:
    text = out.read_text() if out.is_file() else "(no output)"
    assert state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", (
        f"job ended {state.get('JobState')} {state.get('ExitCode')}:\n{text[-3000:]}"
    )


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny 2-task job run to its end: its run folder."""
    logs = tmp_path_factory.mktemp("uninterrupted")
    job, run_dir, out = _submit_tiny(slurm_cluster, logs)
    _finished_ok(slurm_cluster.wait(job, timeout=300), out)
    text = out.read_text()
    # logged once (rank zero), with the split of the global batch over the two SLURM tasks
    assert text.count("Batch: global batch 4 = 2 device(s) x 2 per device") == 1, text[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in text
    return run_dir


def test_sbatch_job_matches_a_local_two_process_run(uninterrupted: Path, tmp_path: Path) -> None:
    local = tmp_path / "local"
    # the same command on this machine, 2 processes started by Lightning instead of srun
    cmd = [sys.executable, "train.py", *TINY_TRAIN, "trainer.devices=2", f"paths.log_dir={tmp_path / 'logs'}",
           f"hydra.run.dir={local}"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the job's run folder is shared by both tasks: one set of checkpoints, one CSV log
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == [
        *(f"iter_{i:08d}.ckpt" for i in range(1, 9)),
        "last.ckpt",
    ]
    assert len(list(uninterrupted.rglob("metrics.csv"))) == 1
    _assert_same_training_state(
        local / "checkpoints" / "last.ckpt", uninterrupted / "checkpoints" / "last.ckpt"
    )


def test_requeue_resumes_to_the_uninterrupted_weights(
    slurm_cluster: Cluster, uninterrupted: Path, tmp_path: Path
) -> None:
    pause = ["+callbacks.pause._target_=job_callbacks.Pause", "+callbacks.pause.seconds=1.0"]
    job, run_dir, out = _submit_tiny(slurm_cluster, tmp_path, *pause)
    _wait_for(lambda: (run_dir / "checkpoints" / "iter_00000002.ckpt").is_file(), 240, "iteration 2")
    slurm_cluster.run("scontrol", "requeue", str(job))

    # Slurm keeps a requeued job pending for about 2 minutes (its begin time); start it as soon as it is back
    def back_in_queue() -> bool:
        state = slurm_cluster.job(job)
        if state.get("JobState") == "PENDING" and int(state.get("Restarts", 0)) >= 1:
            slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            return True
        return state.get("JobState") in ("RUNNING", "COMPLETED") and int(state.get("Restarts", 0)) >= 1

    _wait_for(back_in_queue, 120, f"job {job} requeued")
    state = slurm_cluster.wait(job, timeout=300)
    _finished_ok(state, out)
    assert state["Restarts"] == "1"
    text = out.read_text()
    saved = [int(i) for i in re.findall(r"SIGTERM: saved \S+last\.ckpt at iteration (\d+)", text)]
    assert len(saved) == 1 and 2 <= saved[0] < 8, text[-3000:]  # preempted mid-run, saved once (rank zero)
    assert f"ckpt_path=last: resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in text
    _assert_same_training_state(
        uninterrupted / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt"
    )


def test_submitit_sweep_on_the_cluster(slurm_cluster: Cluster, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "train.py", "-m", "hydra/launcher=slurm", "experiment=smoke",
        "model.gan_weight=0,0.1", "logger=csv", f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.sweep.dir={sweep}",
        # the launcher config's GPU/memory requests do not exist on this CPU-only node
        "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=null", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
    ]  # fmt: skip
    done = slurm_cluster.run(*cmd, timeout=400, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2, rows
    assert all(row.get("val/psnr_1step") for row in rows), rows
    assert sorted(p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()), "no SLURM job folders"
