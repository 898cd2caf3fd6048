"""Helpers of the reliability suite: compose and run the real training entry points, make bad files."""

from __future__ import annotations

import importlib.util
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

from invsr_pl.models.tiny import tiny_noise_predictor

REPO_ROOT = Path(__file__).resolve().parents[2]


def _integration_conftest():
    """The integration suite's ``compose_train`` (one way to compose the real configs for tests)."""
    spec = importlib.util.spec_from_file_location(
        "_integration_conftest", REPO_ROOT / "tests" / "integration" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compose_train = _integration_conftest().compose_train


def run_train_py(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python train.py OVERRIDES`` from the repository root, offline, one CPU thread."""
    return subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=REPO_ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def smoke_overrides(tmp_path: Path, *extra: str) -> list[str]:
    """A seconds-long CPU run (experiment=smoke) with every output below ``tmp_path``; the run folder is
    ``tmp_path/logs/smoke/runs/r``, where ``ckpt_path=last`` looks."""
    return [
        "experiment=smoke",
        "logger=csv",
        "callbacks.image_logger=null",
        f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={tmp_path / 'logs' / 'smoke' / 'runs' / 'r'}",
        *extra,
    ]


class _Exploit:
    """Unpickling this would create the file named in ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def bad_weight_files(folder: Path) -> dict[str, Path]:
    """A random-bytes .pth, a truncated .safetensors and a pickle that would run code when loaded."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {"random": folder / "random.pth", "truncated": folder / "model.safetensors"}
    files["random"].write_bytes(rng.bytes(4096))
    tiny_noise_predictor(seed=0).save_pretrained(folder / "full")
    full = (folder / "full" / "diffusion_pytorch_model.safetensors").read_bytes()
    files["truncated"].write_bytes(full[: len(full) // 2])
    files["malicious"] = folder / "evil.pth"
    with open(files["malicious"], "wb") as f:
        pickle.dump({"encoder.x": _Exploit(str(folder / "PWNED"))}, f)
    return files


def forged_png(path: Path, width: int, height: int) -> Path:
    """A few-hundred-byte PNG whose header claims ``width x height`` 8-bit gray pixels: what a decompression
    bomb looks like to a reader that trusts the header (its pixels are never meant to be decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 256)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path
