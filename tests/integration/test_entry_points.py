"""train.py and evaluate.py as commands: exit 2 for a command line Hydra cannot compose, a light
``--cfg job``, and the multirun start-up refusal of ``trainer.num_nodes > 1``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
@pytest.mark.parametrize(
    ("override", "hydra_says"),
    [
        ("model.gan_weigth=0.1", "Could not override 'model.gan_weigth'"),  # a typo of a key
        ("model.gan_weight=[1", "[1"),  # bad syntax (Hydra 1.3: "no viable alternative at input '[1'")
        (
            "model/backbone=no_such",
            "Could not find 'model/backbone/no_such'",
        ),  # a group option that is not there
    ],
)
def test_composition_errors_exit_2_with_hydras_message(script: str, override: str, hydra_says: str) -> None:
    proc = _run(script, override)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert hydra_says in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cfg_job_composes_without_the_heavy_libraries() -> None:
    """``--cfg job`` (and ``--help``) never import torch, Lightning, diffusers or the system: they print in
    about a second instead of 10+ s (README.md#speed)."""
    heavy = ["torch", "lightning", "diffusers", "invsr_pl.systems.invsr"]
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', '--cfg', 'job']\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
        "except SystemExit as stop:\n    assert stop.code in (None, 0), stop.code\n"
        f"print('LOADED', [m for m in {heavy!r} if m in sys.modules])\n"
    )
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model:" in proc.stdout and "trainer:" in proc.stdout  # the composed config was printed
    assert proc.stdout.strip().splitlines()[-1] == "LOADED []"


def test_num_nodes_in_a_local_multirun_is_refused(tmp_path: Path) -> None:
    proc = _run(
        "train.py", "-m", "experiment=smoke", "trainer.num_nodes=2", "model.gan_weight=0,0.1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.log_dir={tmp_path / 'logs'}",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: trainer.num_nodes=2 in a local multirun")
    assert "hydra/launcher=slurm" in last
    assert not list((tmp_path / "sweep").rglob("*.ckpt"))  # refused before any training
    assert not (tmp_path / "sweep" / "1").exists()  # nor did the sweep go on to the next job
