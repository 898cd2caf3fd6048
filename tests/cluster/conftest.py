"""A one-host SLURM cluster for the session (``scripts/slurm/cluster.sh``); submitting: slurm_helpers.py.

The cluster starts on first use, in a folder of the session's temporary directory, and is stopped at the end
of the session. Where it cannot start (not root, slurm-wlm/munge not installed, a daemon that does not come
up) every test using it is skipped with the reason. Every wait has a timeout; docs/slurm.md describes the
cluster and what the tests check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_helpers import CLUSTER_SCRIPT, Cluster, search_path


def _cannot_start(why: str) -> None:
    pytest.skip(f"no SLURM test cluster: {why}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        _cannot_start("needs root on Linux (slurmd starts the jobs)")
    missing = [
        b for b in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(b, path=search_path())
    ]
    if missing:
        _cannot_start(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; .ci/run does)")
    folder = tmp_path_factory.mktemp("slurm")
    start = time.monotonic()
    started = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start", str(folder), "2"],
        env={**os.environ, "PATH": search_path()}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    startup_s = time.monotonic() - start
    if started.returncode != 0:
        _cannot_start(" ".join((started.stderr or started.stdout).split())[-400:])
    # jobs run this interpreter (the CI venv's), find this checkout's test helpers and use one thread
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "SLURM_CONF": str(folder / "slurm.conf"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{search_path()}",
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    print(f"SLURM test cluster up in {startup_s:.1f} s ({folder})")
    try:
        yield Cluster(folder=folder, env=env, startup_s=startup_s)
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(folder)], timeout=60, check=False)
