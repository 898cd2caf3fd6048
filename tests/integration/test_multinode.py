"""Two "nodes" on one machine: ``torchrun`` invoked twice (``--nnodes=2``, one process each, rendezvous on
127.0.0.1, gloo on CPU). ``train.py`` trains like one process of the same global batch (the same images per
iteration, the same iteration count, one noise predictor on both ranks); ``evaluate.py`` writes one gathered
table in which every image is scored once."""

from __future__ import annotations

import csv
import json
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


def _start_two_nodes(*args: str) -> list[subprocess.Popen]:
    """``torchrun --nnodes=2 --node_rank={0,1} --nproc_per_node=1 args`` from the repository root."""
    port = _free_port()
    return [
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
                *args,
            ],
            cwd=REPO_ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]


def _wait_two_nodes(nodes: list[subprocess.Popen], timeout: float = 300) -> None:
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.kill()
            pytest.fail(f"a torchrun node did not finish in {timeout:.0f} s")
    for node, out in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-3000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_torchrun_nodes_train_like_one_process(tmp_path: Path) -> None:
    two = tmp_path / "two"
    nodes = _start_two_nodes(
        "train.py", *TINY, "trainer.devices=1", "trainer.num_nodes=2", f"+callbacks.record.folder={two}",
        f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={two / 'run'}",
    )  # fmt: skip
    one = tmp_path / "one"
    single = subprocess.run(
        [sys.executable, "train.py", *TINY, "trainer.devices=1", f"+callbacks.record.folder={one}",
         f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={one / 'run'}"],
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    _wait_two_nodes(nodes)
    assert single.returncode == 0, single.stderr[-3000:]

    ref = torch.load(one / "rank0.pt", weights_only=False)
    r0, r1 = (torch.load(two / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert ref["world"] == 1 and r0["world"] == r1["world"] == 2
    assert ref["iteration"] == r0["iteration"] == r1["iteration"] == 2
    per_iteration = [a + b for a, b in zip(r0["images"], r1["images"], strict=True)]
    assert ref["images"] == per_iteration == [4, 4]  # the global batch, split 2 + 2 over the nodes
    for k, v in r0["noise_predictor"].items():
        assert torch.equal(v, r1["noise_predictor"][k]), f"noise_predictor.{k} differs across the nodes"
    assert (two / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_torchrun_nodes_evaluate_into_one_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    nodes = _start_two_nodes(
        "evaluate.py", "trainer=cpu", "trainer.num_nodes=2", "trainer.enable_progress_bar=false",
        "data.test_datasets.samples.num_images=3", "data.test_datasets.samples.gt_size=64",
        "data.test_datasets.samples.lq_mode=bicubic", "sampler.chopping_size=null", "warmup=0",
        "metrics=fidelity", "model.bicubic=false", "output.plot=false", "torch_threads=1",
        f"paths.root_dir={tmp_path}", f"hydra.run.dir={out}",
    )  # fmt: skip
    _wait_two_nodes(nodes)
    per_image = list(csv.DictReader((out / "per_image.csv").open()))
    # node 0 scored images 0 and 2, node 1 image 1 and the sampler's padding repeat of 0 (not scored twice)
    assert [r["index"] for r in per_image] == ["0", "1", "2"]
    table = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(table) == 1
    mean = sum(float(r["psnr"]) for r in per_image) / 3
    assert float(table[0]["PSNR↑"]) == pytest.approx(mean, rel=1e-9)
    assert json.loads((out / "metadata.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_sigterm_on_one_node_stops_both_after_the_same_iteration(tmp_path: Path) -> None:
    """Only node 1 gets SIGTERM (after iteration 2): both nodes save one last.ckpt at the same iteration and
    exit 143, instead of node 1 waiting in the checkpoint's barrier for a peer that trains on (docs/slurm.md).
    """
    run = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith(("model.max_iterations", "+callbacks.record"))]
    nodes = _start_two_nodes(
        "train.py", *tiny, "model.max_iterations=50", "callbacks.model_checkpoint.every_n_iterations=100",
        "trainer.devices=1", "trainer.num_nodes=2", "+callbacks.sig._target_=job_callbacks.SigtermRank",
        "+callbacks.sig.rank=1", "+callbacks.sig.at=2", f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={run}",
    )  # fmt: skip
    outputs = []
    for node in nodes:
        try:
            outputs.append(node.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for n in nodes:
                n.kill()
            pytest.fail("the nodes did not stop within 300 s of one node's SIGTERM")
    for node, out in zip(nodes, outputs, strict=True):
        assert node.returncode != 0, out[-3000:]  # stopped early, not after 50 iterations
    assert any("stopped by SIGTERM" in out for out in outputs), outputs[1][-3000:]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["invsr_iteration"] in (2, 3)  # the iteration that ran when the ranks agreed
