"""The SLURM scripts without a cluster: the README shows the sbatch script the cluster tests run."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from slurm_helpers import CLUSTER_SCRIPT, REPO_ROOT, TRAIN_SBATCH


def test_readme_shows_the_tested_sbatch_script() -> None:
    lines = TRAIN_SBATCH.read_text().splitlines()
    # the script without its comment-only lines (the README's text explains them)
    shown = "\n".join([lines[0], *(ln for ln in lines[1:] if not ln.startswith("# ") and ln != "#")])
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"```bash\n{shown}\n```" in readme, "README's SLURM script differs from scripts/slurm/train.sbatch"
    assert "--ntasks-per-node=8" in shown and "--nodes=2" in shown and "--gpus-per-node=8" in shown


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_scripts_parse_and_refuse_bad_use() -> None:
    for script in (TRAIN_SBATCH, CLUSTER_SCRIPT):
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    usage = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "restart"], capture_output=True, text=True, timeout=30
    )
    assert usage.returncode == 2 and "usage:" in usage.stderr
