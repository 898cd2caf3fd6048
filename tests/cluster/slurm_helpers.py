"""What the SLURM tests share: the scripts, the tiny job, and :class:`Cluster` (submit, poll, read back).
The session fixture that starts the cluster is in tests/cluster/conftest.py."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "slurm" / "cluster.sh"
TRAIN_SBATCH = REPO_ROOT / "scripts" / "slurm" / "train.sbatch"
# A job's terminal states (squeue/scontrol); REQUEUED and PENDING after a requeue are not among them.
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
# The 2-task training job of the tests: smoke-sized, the global batch split over 2 ranks, no validation,
# a checkpoint every iteration (the requeue test resumes from one), the CSV logger.
TINY_TRAIN = (
    "experiment=smoke",
    "trainer.accelerator=cpu",
    "data.global_batch_size=4",
    "model.max_iterations=8",
    "trainer.val_check_interval=100",
    "callbacks.image_logger=null",
    "callbacks.model_checkpoint.every_n_iterations=1",
    "logger=csv",
)
# sbatch options that shrink scripts/slurm/train.sbatch (2 nodes x 8 GPUs) to this one 2-CPU host
TINY_SBATCH = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10")


@dataclass
class Cluster:
    """A started cluster: ``env`` reaches it (SLURM_CONF) and runs this interpreter inside the jobs."""

    folder: Path
    env: dict[str, str]
    startup_s: float

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=self.env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=check
        )

    def sbatch(self, script: Path, *args: str, options: Sequence[str] = (), output: Path) -> int:
        """Submit ``script args`` from the repository root; returns the job id."""
        cmd = ["sbatch", "--parsable", f"--output={output}", *options, str(script), *args]
        return int(self.run(*cmd).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...); {} once Slurm forgot it."""
        done = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}

    def wait(
        self, job_id: int, timeout: float, until: Callable[[dict[str, str]], bool] | None = None
    ) -> dict[str, str]:
        """Poll until ``until(state)`` (default: a terminal state); fail the test after ``timeout``."""
        until = until or (lambda s: s.get("JobState") in FINISHED)
        deadline = time.monotonic() + timeout
        state: dict[str, str] = {}
        while time.monotonic() < deadline:
            state = self.job(job_id)
            if until(state):
                return state
            time.sleep(0.5)
        self.run("scancel", str(job_id), check=False)
        pytest.fail(
            f"job {job_id} not done after {timeout:.0f} s: {state.get('JobState')} {state.get('Reason')}"
        )


def search_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
