"""Two "nodes" on one machine: ``train.py`` as two ``torchrun`` invocations (``--nnodes=2``, one process each,
rendezvous on 127.0.0.1, gloo on CPU) trains like one process of the same global batch: the same images per
iteration, the same iteration count, and one noise predictor on both ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_CALLBACKS = REPO_ROOT / "tests" / "cluster"  # job_callbacks.RecordRank

TINY = (
    "experiment=smoke",
    "trainer.accelerator=cpu",
    "data.global_batch_size=4",
    "model.micro_batch_size=1",
    "model.max_iterations=2",
    "trainer.val_check_interval=100",
    "callbacks.image_logger=null",
    "logger=csv",
    "+callbacks.record._target_=job_callbacks.RecordRank",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(JOB_CALLBACKS), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.slow
def test_two_torchrun_nodes_train_like_one_process(tmp_path: Path) -> None:
    port = _free_port()
    two = tmp_path / "two"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "train.py",
                *TINY,
                "trainer.devices=1",
                "trainer.num_nodes=2",
                f"+callbacks.record.folder={two}",
                f"paths.log_dir={tmp_path / 'logs'}",
                f"hydra.run.dir={two / 'run'}",
            ],
            cwd=REPO_ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    one = tmp_path / "one"
    single = subprocess.run(
        [sys.executable, "train.py", *TINY, "trainer.devices=1", f"+callbacks.record.folder={one}",
         f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={one / 'run'}"],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.kill()
            pytest.fail("a torchrun node did not finish in 300 s")
    assert single.returncode == 0, single.stderr[-3000:]
    for node, out in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-3000:]

    ref = torch.load(one / "rank0.pt", weights_only=False)
    r0, r1 = (torch.load(two / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert ref["world"] == 1 and r0["world"] == r1["world"] == 2
    assert ref["iteration"] == r0["iteration"] == r1["iteration"] == 2
    per_iteration = [a + b for a, b in zip(r0["images"], r1["images"], strict=True)]
    assert ref["images"] == per_iteration == [4, 4]  # the global batch, split 2 + 2 over the nodes
    for k, v in r0["noise_predictor"].items():
        assert torch.equal(v, r1["noise_predictor"][k]), f"noise_predictor.{k} differs across the nodes"
    assert (two / "run" / "checkpoints" / "last.ckpt").is_file()
