"""``train.py`` under preemption, torn checkpoint writes, wrong checkpoints and configs that cannot work."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from reliability_helpers import (
    REPO_ROOT,
    bad_weight_files,
    compose_train,
    run_train_py,
    smoke_overrides,
    train_env,
)

from callbacks.checkpoint import AtomicCheckpointIO
from invsr_pl.launch.instantiate import find_last_checkpoint
from invsr_pl.launch.startup_checks import SetupError, check_config
from invsr_pl.utils.checkpoint import CheckpointMismatchError, WeightFileError
from train import train

MakeCfg = Callable[..., DictConfig]
FAST = ["trainer.val_check_interval=1000", "callbacks.model_checkpoint.every_n_train_steps=null"]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a 2-iteration smoke run (checkpoint every iteration)."""
    root = tmp_path_factory.mktemp("smoke")
    cfg = compose_train(
        ["experiment=smoke", "logger=csv", "callbacks.image_logger=null", "model.max_iterations=2", *FAST]
        + ["callbacks.model_checkpoint.every_n_iterations=1"],
        root,
    )
    train(cfg)
    return root / "run" / "checkpoints" / "last.ckpt"


# ---------------------------------------------------------------------------------------------- SIGTERM
@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(train_cfg: MakeCfg, tmp_path: Path) -> None:
    run = tmp_path / "sig"
    overrides = smoke_overrides(run, "model.max_iterations=500", *FAST)
    overrides.append("callbacks.model_checkpoint.every_n_iterations=2")
    proc = subprocess.Popen(
        [sys.executable, "train.py", *overrides],
        cwd=REPO_ROOT,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = run / "logs" / "smoke" / "runs" / "r" / "checkpoints"
    first = checkpoints / "iter_00000002.ckpt"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.exists(), "the run never reached iteration 2"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err.strip().splitlines()[-1]
    last = _load(checkpoints / "last.ckpt")
    stopped_at = last["invsr_iteration"]
    assert 2 <= stopped_at < 500

    # ckpt_path=last continues from there, and ends where an uninterrupted run ends
    target = stopped_at + 2
    resume = [*FAST, "experiment=smoke", "logger=csv", "callbacks.image_logger=null", "ckpt_path=last"]
    resume += [f"paths.log_dir={run / 'logs'}", f"model.max_iterations={target}"]
    _, objects = train(train_cfg(*resume, f"paths.output_dir={run / 'resumed'}"))
    assert objects["ckpt_path"] == str(checkpoints / "last.ckpt")
    assert objects["model"].iteration == target
    plain = [*FAST, "experiment=smoke", "logger=csv", "callbacks.image_logger=null"]
    train(train_cfg(*plain, f"model.max_iterations={target}", subdir="plain"))
    resumed = _load(run / "resumed" / "checkpoints" / "last.ckpt")
    full = _load(tmp_path / "plain" / "run" / "checkpoints" / "last.ckpt")
    for part in ("state_dict", "ema_noise_predictor"):
        for k, v in full[part].items():
            torch.testing.assert_close(resumed[part][k], v, rtol=1e-5, atol=1e-6, msg=f"{part}.{k}")


# ---------------------------------------------------------------------------------------------- torn writes
def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer killed mid-file (simulated: torch.save dies after half the bytes) leaves the old file intact
    and no partial file that ``ckpt_path=last`` could pick."""
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"noise_predictor.w": torch.ones(3)}, "invsr_iteration": 1}, path)
    real_save = torch.save

    def killed(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt  # stands in for SIGKILL between the bytes and the rename

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"noise_predictor.w": torch.zeros(3)}, "invsr_iteration": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert _load(path)["invsr_iteration"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert path.stat().st_mode & 0o777 == 0o644 or path.stat().st_mode & 0o077 != 0  # not 0600


def test_last_skips_unreadable_checkpoints(
    smoke_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "logs" / "smoke" / "runs" / "r1" / "checkpoints"
    run.mkdir(parents=True)
    step = run / "iter_00000002.ckpt"
    step.write_bytes(smoke_checkpoint.read_bytes())
    time.sleep(0.05)
    (run / "last.ckpt").write_bytes(b"")  # what a kill during a non-atomic write left behind
    (run / ".last.ckpt.x1y2.tmp").write_bytes(b"partial")
    time.sleep(0.05)
    (run / "truncated.ckpt").write_bytes(smoke_checkpoint.read_bytes()[:5000])
    found = find_last_checkpoint(tmp_path / "logs" / "smoke")
    assert found == step
    warned = caplog.text
    assert "last.ckpt" in warned and "truncated.ckpt" in warned and "empty" in warned


def test_resume_from_last_falls_back_to_the_intact_step_checkpoint(
    smoke_checkpoint: Path, train_cfg: MakeCfg, tmp_path: Path
) -> None:
    run = tmp_path / "logs" / "smoke" / "runs" / "old" / "checkpoints"
    run.mkdir(parents=True)
    (run / "iter_00000002.ckpt").write_bytes(smoke_checkpoint.read_bytes())
    time.sleep(0.05)
    (run / "last.ckpt").write_bytes(smoke_checkpoint.read_bytes()[:100_000])  # torn
    cfg = train_cfg("experiment=smoke", "logger=csv", "callbacks.image_logger=null", *FAST)
    cfg.ckpt_path = "last"
    cfg.model.max_iterations = 3
    _, objects = train(cfg)
    assert objects["ckpt_path"].endswith("iter_00000002.ckpt") and objects["model"].iteration == 3


# ------------------------------------------------------------------------------------ wrong checkpoints
def test_checkpoint_without_noise_predictor_is_refused(
    smoke_checkpoint: Path, train_cfg: MakeCfg, tmp_path: Path
) -> None:
    ckpt = _load(smoke_checkpoint)
    no_np = {
        **ckpt,
        "state_dict": {k: v for k, v in ckpt["state_dict"].items() if "noise_predictor" not in k},
    }
    torch.save(no_np, tmp_path / "no_np.ckpt")
    partial = dict(ckpt["state_dict"])
    dropped = sorted(k for k in partial if k.startswith("noise_predictor."))[:2]
    for k in dropped:
        del partial[k]
    torch.save({**ckpt, "state_dict": partial}, tmp_path / "partial.ckpt")

    with pytest.raises(SetupError, match="no noise_predictor"):
        train(train_cfg("experiment=smoke", f"ckpt_path={tmp_path / 'no_np.ckpt'}"))
    with pytest.raises(CheckpointMismatchError, match="2 trainable weights missing") as err:
        train(train_cfg("experiment=smoke", f"ckpt_path={tmp_path / 'partial.ckpt'}"))
    assert dropped[0] in str(err.value)


def test_bad_checkpoint_files_are_refused_before_anything_is_built(
    train_cfg: MakeCfg, tmp_path: Path
) -> None:
    files = bad_weight_files(tmp_path / "w")
    torch_files = {"random": files["random"], "malicious": files["malicious"]}
    truncated = tmp_path / "w" / "torn.ckpt"
    torch.save({"state_dict": {"noise_predictor.w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:700])
    for kind, path in {**torch_files, "truncated": truncated}.items():
        with pytest.raises(SetupError) as err:
            check_config(train_cfg("experiment=smoke", f"ckpt_path={path}"))
        message = str(err.value)
        assert str(path) in message and "\n" not in message, kind
    assert not (tmp_path / "w" / "PWNED").exists()
    with pytest.raises(WeightFileError):  # the same files through the noise-predictor loader (evaluate.py)
        from invsr_pl.models.loading import load_noise_predictor

        load_noise_predictor(files["malicious"])


# ---------------------------------------------------------------------------------------------- configs
def test_scale_and_gt_size_mismatches_fail_at_start_up(train_cfg: MakeCfg) -> None:
    with pytest.raises(SetupError, match=r"data\.degradation\.scale=2.*model\.noise_predictor\.scale=4|"
                       r"model\.noise_predictor\.scale=4.*data\.degradation\.scale=2"):  # fmt: skip
        check_config(train_cfg("experiment=smoke", "data.degradation.scale=2"))
    with pytest.raises(SetupError, match=r"data\.train_dataset\.gt_size=50 must be a positive multiple of 8"):
        check_config(train_cfg("experiment=smoke", "data.train_dataset.gt_size=50"))
    assert check_config(train_cfg("experiment=smoke")) is None


def test_plain_ddp_with_a_discriminator_fails_at_start_up(train_cfg: MakeCfg) -> None:
    """`trainer.strategy=ddp` over 2 processes would stop at the first discriminator step with DDP's
    unused-parameter error (measured: 33 s and a long traceback); it is refused in one line instead."""
    two = ["experiment=smoke", "trainer.accelerator=cpu", "trainer.devices=2"]
    with pytest.raises(SetupError, match=r"trainer.strategy=ddp cannot train .* over 2 processes.*"
                       r"ddp_find_unused_parameters_true"):  # fmt: skip
        check_config(train_cfg(*two, "trainer.strategy=ddp"))
    for ok in ("ddp_find_unused_parameters_true", "auto"):
        assert check_config(train_cfg(*two, f"trainer.strategy={ok}")) is None
    assert check_config(train_cfg(*two[:2], "trainer.devices=1", "trainer.strategy=ddp")) is None
    assert check_config(train_cfg(*two, "trainer.strategy=ddp", "model.discriminator=null")) is None
    assert check_config(train_cfg("experiment=smoke", "trainer=ddp_sim")) is None  # spawn, tolerant


def test_paper_recipe_without_its_data_stops_at_start_up(train_cfg: MakeCfg, tmp_path: Path) -> None:
    """`python train.py` (the paper recipe) on a machine without the data: one message naming every folder."""
    with pytest.raises(SetupError) as err:
        check_config(train_cfg(f"paths.data_dir={tmp_path / 'nowhere'}"))
    message = str(err.value)
    assert "\n" not in message and "experiment=quickstart" in message
    for key in ("data.train_dataset.sources.0.root", "data.val_dataset.lq_dir", "data.val_dataset.gt_dir"):
        assert key in message


@pytest.mark.slow
def test_train_py_prints_one_line_and_exit_codes(tmp_path: Path) -> None:
    """Setup errors: exit 2, one line last, no traceback; a persistent non-finite loss: exit 3, one line."""
    (tmp_path / "random.ckpt").write_bytes(bytes(range(256)) * 16)
    bad = run_train_py(*smoke_overrides(tmp_path / "a", f"ckpt_path={tmp_path / 'random.ckpt'}"))
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: ckpt_path:") and "random.ckpt" in last

    nan = run_train_py(
        *smoke_overrides(tmp_path / "b", "model.l2_weight=nan", "model.max_consecutive_nonfinite=2", *FAST)
    )
    assert nan.returncode == 3, nan.stderr[-2000:]
    assert "Traceback" not in nan.stderr
    assert "non-finite" in nan.stderr.strip().splitlines()[-1]
