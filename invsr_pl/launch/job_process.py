"""A multirun job whose ranks Lightning would start by re-executing the command line, run as its own process.

Lightning's ``ddp`` launcher (the ``popen`` start method; FSDP and DeepSpeed use it too) starts ranks
1..N-1 by running ``sys.argv`` again. In a multirun that command line is the whole sweep, so every rank would
start a sweep of its own (docs/lightning.md#hydra-ddp-and-sweeps). Instead the sweep process (one Hydra job
at a time, any sweeper: grid, Optuna) runs such a job as a *single run* of the entry point:

    python train.py <job overrides> hydra.run.dir=<job folder> hydra.output_subdir=null hydra.mode=RUN

That process is rank 0 of a normal N-process DDP run: Lightning re-executes *its* command line, which holds
the job's overrides and folder only. The sweep process itself never imports CUDA state or joins a process
group, so one job cannot leave anything behind for the next; it

- passes the job's overrides as Hydra recorded them (``hydra.overrides.task``: the sweep's fixed overrides
  plus this job's values) and the user's ``hydra.*`` overrides except the sweep's own (sweeper, launcher,
  sweep folder, mode);
- writes nothing itself: Hydra wrote the job's ``.hydra/`` files, the summary callback writes
  ``sweep_job.json`` and the summary (sweep process only; the job's ranks run in RUN mode);
- returns rank 0's final ``optimized_metric`` once, read from a result file that only the started process
  writes (:func:`write_job_result`), and raises :class:`SweepJobError` with that process's one-line error
  when any rank failed, so the job fails and the sweep goes on;
- forwards Ctrl-C and SIGTERM to all the job's ranks (they run in their own process group), and stops ranks
  still running after rank 0 ended (e.g. stuck in a collective after rank 0 failed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from invsr_pl.launch.exit_codes import EXIT_SIGTERM
from invsr_pl.utils.atomic import atomic_write
from invsr_pl.utils.batching import resolve_world_size

__all__ = [
    "JOB_RESULT_ENV",
    "SweepJobError",
    "is_slurm_launcher",
    "job_command",
    "run_job_process",
    "starts_ranks_by_reexecution",
    "write_job_result",
]

log = logging.getLogger(__name__)

JOB_RESULT_ENV = "INVSR_JOB_RESULT"  # where the started process writes its outcome (rank 0 only)
RESULT_NAME = ".job_result.json"
# Lightning strategies whose ranks are started by multiprocessing, inside the calling process's job
_SPAWNING = ("spawn", "fork", "notebook")
# hydra.* overrides that belong to the sweep, not to the job's single run
_SWEEP_KEYS = ("hydra.sweep", "hydra/sweeper", "hydra.launcher", "hydra/launcher", "hydra.mode", "hydra.run",
               "hydra.output_subdir", "hydra.job.num", "hydra.job.id")  # fmt: skip
GRACE_AFTER_SUCCESS_S = 60.0  # other ranks finish their teardown after rank 0 returned
GRACE_AFTER_FAILURE_S = 10.0  # other ranks may wait in a collective for a rank 0 that is gone


class SweepJobError(RuntimeError):
    """A job's own process (one of its ranks) failed; the sweep records the job as failed and goes on."""


def is_slurm_launcher(launcher: Mapping[str, Any] | None) -> bool:
    """True for the submitit SLURM launcher (``hydra/launcher=slurm``), which starts every rank itself."""
    target = str((launcher or {}).get("_target_", ""))
    return "submitit" in target and target.endswith("SlurmLauncher")


def starts_ranks_by_reexecution(trainer: Mapping[str, Any]) -> bool:
    """Whether Lightning would start this ``trainer`` config's ranks by re-running the command line.

    True for more than one process per node with a re-executing strategy (``ddp``,
    ``ddp_find_unused_parameters_true``, ``fsdp``, ``deepspeed``, a ``DDPStrategy`` with the default
    ``start_method: popen``, or ``auto``, which becomes one of them); False for one device and for spawning
    strategies (``ddp_spawn``, ``start_method: spawn`` as in ``trainer=ddp_sim``).
    """
    strategy = trainer.get("strategy") or "auto"
    if isinstance(strategy, Mapping):
        if str(strategy.get("start_method") or "popen") != "popen":
            return False
    elif any(word in str(strategy) for word in _SPAWNING):
        return False
    return resolve_world_size(trainer.get("devices", 1), 1, trainer.get("accelerator", "auto")) > 1


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def job_command(script: str | Path, hydra_cfg: Any) -> list[str]:
    """The single-run command of the current multirun job (``hydra_cfg`` = ``HydraConfig.get()``)."""
    from hydra.core.override_parser.types import Quote, QuotedString

    task = [str(o) for o in hydra_cfg.overrides.task]
    own = [str(o) for o in hydra_cfg.overrides.hydra if not _override_key(str(o)).startswith(_SWEEP_KEYS)]
    run_dir = QuotedString(text=str(hydra_cfg.runtime.output_dir), quote=Quote.double).with_quotes()
    pinned = [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null", "hydra.mode=RUN"]
    return [sys.executable, str(Path(script).resolve()), *task, *own, *pinned]


def write_job_result(
    path: str | Path,
    *,
    metrics: Mapping[str, float] | None = None,
    error: str | None = None,
    exit_code: int = 0,
) -> None:
    """The started process's outcome for :func:`run_job_process`: its final metrics, or its error line."""
    record: dict[str, Any] = {"exit_code": int(exit_code)}
    if metrics is not None:
        record["metrics"] = {k: float(v) for k, v in metrics.items()}
    if error is not None:
        record["error"] = " ".join(str(error).split())
    with atomic_write(Path(path)) as f:
        f.write((json.dumps(record) + "\n").encode())


def _read_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies, which no init may reap here, do not)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                return True
    return False


def _stop_group(pgid: int, grace_s: float, what: str) -> None:
    """Wait up to ``grace_s`` for the job's other ranks, then kill what is left of its process group."""
    deadline = time.monotonic() + grace_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(pgid):
        log.warning("%s: ranks still running %.0f s after rank 0 ended; killing them", what, grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0  # until they are gone (and their GPU memory free for the next job)
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)


@contextlib.contextmanager
def _forward_signals(pgid: int) -> Iterator[list[int]]:
    """Send SIGINT/SIGTERM received by the sweep process to every rank of the job (their own group)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # handlers only work in the main thread
        yield received
        return

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


STOP_AFTER_SIGNAL_S = (
    120.0  # a job told to stop (SIGTERM, Ctrl-C) that hangs, e.g. in a collective, is killed
)


def _wait(proc: subprocess.Popen, received: list[int]) -> int:
    """``proc.wait()``; once a signal was forwarded, at most :data:`STOP_AFTER_SIGNAL_S` more, then SIGKILL
    for the job's whole group (Lightning saves ``last.ckpt`` on SIGTERM at the next step, which a rank
    blocked in a collective never reaches)."""
    deadline = None
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if received and deadline is None:
            deadline = time.monotonic() + STOP_AFTER_SIGNAL_S
        if deadline is not None and time.monotonic() > deadline:
            log.warning("The job did not stop %.0f s after the signal; killing it", STOP_AFTER_SIGNAL_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()


def _ended(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def run_job_process(
    script: str | Path, hydra_cfg: Any, world_size: int, command: Sequence[str] | None = None
) -> dict[str, float]:
    """Run the current multirun job as its own single-run process; return rank 0's final metrics.

    Args:
        script: the entry point (``train.py``).
        hydra_cfg: ``HydraConfig.get()`` of the job (its overrides, folder and launch directory).
        world_size: processes of the job (for the messages).
        command: the command to run; default :func:`job_command`.

    Raises:
        SweepJobError: the process (any rank) failed, with its one-line error when it wrote one.
        KeyboardInterrupt / SystemExit(143): Ctrl-C / SIGTERM reached the sweep; the job got it first.
    """
    job_dir = Path(str(hydra_cfg.runtime.output_dir))
    what = f"job {hydra_cfg.job.get('num', '?')}"
    result = job_dir / RESULT_NAME
    result.unlink(missing_ok=True)
    cmd = list(command) if command is not None else job_command(script, hydra_cfg)
    env = {**os.environ, JOB_RESULT_ENV: str(result)}
    log.info("%s: one %d-process run in %s: %s", what.capitalize(), world_size, job_dir, shlex.join(cmd))
    proc = subprocess.Popen(cmd, cwd=str(hydra_cfg.runtime.cwd), env=env, start_new_session=True)
    with _forward_signals(proc.pid) as received:
        code = _wait(proc, received)
    outcome = _read_result(result)
    result.unlink(missing_ok=True)
    _stop_group(proc.pid, GRACE_AFTER_SUCCESS_S if code == 0 else GRACE_AFTER_FAILURE_S, what)
    if signal.SIGINT in received:
        raise KeyboardInterrupt
    if signal.SIGTERM in received:
        print(f"{Path(script).name}: stopped by SIGTERM in {what} ({job_dir})", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_SIGTERM)
    if code != 0:
        why = outcome.get("error") or f"no error line; see the {what} log above"
        raise SweepJobError(f"{what}'s {world_size}-process run {_ended(code)}: {why}")
    metrics = outcome.get("metrics")
    if not isinstance(metrics, dict):
        log.warning("%s ended without reporting metrics (%s)", what, result)
        return {}
    return {str(k): float(v) for k, v in metrics.items()}
