"""The pieces of running a multirun job as its own process: which trainers need it, the job's command, the
result file, and what a failed job's process tells the sweep (no training: small commands stand in)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from invsr_pl.launch import job_process
from invsr_pl.launch.job_process import (
    SweepJobError,
    job_command,
    run_job_process,
    starts_ranks_by_reexecution,
)
from invsr_pl.launch.startup_checks import SetupError, check_local_multirun

SLURM = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
BASIC = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        ({"accelerator": "cpu", "devices": 2, "strategy": "ddp_find_unused_parameters_true"}, True),
        ({"accelerator": "gpu", "devices": 8, "strategy": "ddp"}, True),
        ({"accelerator": "cpu", "devices": "0,1", "strategy": "auto"}, True),  # auto becomes DDP
        ({"accelerator": "cpu", "devices": 2, "strategy": {"_target_": "DDPStrategy"}}, True),  # popen
        ({"accelerator": "cpu", "devices": 1, "strategy": "ddp"}, False),
        ({"accelerator": "cpu", "devices": "auto", "strategy": "ddp"}, False),  # one CPU process
        ({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}, False),
        ({"accelerator": "cpu", "devices": 2, "strategy": {"start_method": "spawn"}}, False),  # ddp_sim
    ],
)
def test_which_trainers_are_re_executed(trainer: dict, expected: bool) -> None:
    assert starts_ranks_by_reexecution(trainer) is expected


def _hydra_cfg(tmp_path: Path, task: list[str], hydra: list[str]) -> object:
    return OmegaConf.create(
        {
            "overrides": {"task": task, "hydra": hydra},
            "runtime": {"output_dir": str(tmp_path / "sweep dir" / "0"), "cwd": str(tmp_path)},
            "job": {"num": 0},
        }
    )


def test_job_command_is_the_jobs_single_run(tmp_path: Path) -> None:
    """The job's overrides (not the sweep's `a=1,2`), the user's own hydra.* overrides, none of the sweep's,
    and the job folder pinned as the run folder (quoted: it has a space)."""
    task = ["experiment=smoke", "model.train_timesteps=[250]", "hparams_search=loss_weights_optuna"]
    hydra = ["hydra.sweep.dir=/x", "hydra.mode=MULTIRUN", "hydra/launcher=basic", "hydra.verbose=true"]
    hydra += ["hydra.sweeper.n_trials=2", "hydra.job_logging.root.level=DEBUG"]
    cmd = job_command(tmp_path / "train.py", _hydra_cfg(tmp_path, task, hydra))
    assert cmd[:2] == [sys.executable, str((tmp_path / "train.py").resolve())]
    assert cmd[2:] == [
        *task,
        "hydra.verbose=true",
        "hydra.job_logging.root.level=DEBUG",
        f'hydra.run.dir="{tmp_path / "sweep dir" / "0"}"',
        "hydra.output_subdir=null",
        "hydra.mode=RUN",  # after the task overrides: wins over a preset's `hydra.mode: MULTIRUN`
    ]


def test_num_nodes_needs_the_slurm_launcher() -> None:
    with pytest.raises(SetupError, match=r"trainer.num_nodes=2 in a local multirun.*hydra/launcher=slurm"):
        check_local_multirun({"num_nodes": 2}, BASIC)
    check_local_multirun({"num_nodes": 2}, SLURM)
    check_local_multirun({"num_nodes": 1}, BASIC)


def _fake_job(tmp_path: Path, script: str) -> tuple[object, list[str]]:
    """A hydra config for job 0 and a command that plays the job's process."""
    hydra_cfg = _hydra_cfg(tmp_path, [], [])
    Path(hydra_cfg.runtime.output_dir).mkdir(parents=True)
    code = "import os, sys; from invsr_pl.launch.job_process import *; path = os.environ[JOB_RESULT_ENV]\n"
    code += script
    return hydra_cfg, [sys.executable, "-c", code]


def test_rank_zero_metrics_come_back_once(tmp_path: Path) -> None:
    hydra_cfg, cmd = _fake_job(tmp_path, "write_job_result(path, metrics={'val/psnr_1step': 21.5})")
    assert run_job_process("train.py", hydra_cfg, 2, command=cmd) == {"val/psnr_1step": 21.5}
    assert not list(Path(hydra_cfg.runtime.output_dir).iterdir())  # the result file is gone


def test_a_failed_job_raises_with_its_error_line(tmp_path: Path) -> None:
    script = "write_job_result(path, error='model.dis_update_freq must be >= 1', exit_code=2); sys.exit(2)"
    hydra_cfg, cmd = _fake_job(tmp_path, script)
    with pytest.raises(
        SweepJobError, match=r"job 0's 2-process run exited with code 2: model.dis_update_freq"
    ):
        run_job_process("train.py", hydra_cfg, 2, command=cmd)
    hydra_cfg, cmd = _fake_job(tmp_path / "killed", "os.kill(os.getpid(), 9)")
    with pytest.raises(SweepJobError, match="was killed by SIGKILL: no error line"):
        run_job_process("train.py", hydra_cfg, 2, command=cmd)


def test_ranks_left_behind_are_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 fails while another rank of its process group hangs (e.g. in a collective): the sweep does not
    wait for it beyond the grace period, and it is killed."""
    monkeypatch.setattr(job_process, "GRACE_AFTER_FAILURE_S", 0.5)
    pid_file = tmp_path / "straggler.pid"
    script = (
        "import subprocess; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); sys.exit(1)"
    )
    hydra_cfg, cmd = _fake_job(tmp_path, script)
    with pytest.raises(SweepJobError, match="exited with code 1"):
        run_job_process("train.py", hydra_cfg, 2, command=cmd)
    straggler = Path(f"/proc/{int(pid_file.read_text())}/stat")
    # gone, or a zombie that nobody reaps: killed either way, not sleeping out its 120 s
    assert not straggler.exists() or straggler.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_sigterm_reaches_the_job_and_a_hung_job_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to the sweep goes to the job's ranks; one that ignores it (as a rank blocked in a collective
    does) is killed after the grace period, and the sweep stops with 143."""
    import os
    import signal
    import threading

    monkeypatch.setattr(job_process, "STOP_AFTER_SIGNAL_S", 0.5)
    ready = tmp_path / "ready"
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"open({str(ready)!r}, 'w').close(); time.sleep(120)"
    )
    hydra_cfg, cmd = _fake_job(tmp_path, script)

    def terminate_when_ready() -> None:
        for _ in range(600):
            if ready.exists():
                break
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_when_ready, daemon=True).start()
    with pytest.raises(SystemExit) as stop:
        run_job_process("train.py", hydra_cfg, 2, command=cmd)
    assert stop.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == before  # the sweep's own handler is back
