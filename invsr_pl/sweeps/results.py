"""What the jobs of a Hydra multirun left on disk, read into rows sorted by the optimised metric.

- Job folders are the parents of ``.hydra/overrides.yaml`` below the multirun folder; the job number comes
  from ``.hydra/hydra.yaml``, the optimised metric's name from ``optimized_metric`` in ``.hydra/config.yaml``.
- Final metrics are the last logged value of each scalar in the job's Lightning CSV logs (``metrics.csv``) and
  TensorBoard event files, whichever logger the job used.
- ``sweep_job.json``, written by :class:`~invsr_pl.sweeps.callback.SweepSummaryCallback` at the end of each
  job, adds the job's status, its return value (the sweeper's objective) and, for a failed job, the error.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = [
    "JOB_RECORD",
    "MODES",
    "JobResult",
    "Lead",
    "SweepSummary",
    "SweepSummaryError",
    "build_summary",
    "find_jobs",
    "natural_key",
    "override_key",
    "read_job",
    "read_logged_history",
    "read_logged_metrics",
    "resolve_mode",
]

JOB_RECORD = "sweep_job.json"  # written into each job's folder by SweepSummaryCallback.on_job_end
MODES = ("max", "min")
# Optuna's direction names, so an Optuna config can pass ``mode: ${hydra.sweeper.direction}``
_MODE_ALIASES = {"max": "max", "min": "min", "maximize": "max", "minimize": "min"}


class SweepSummaryError(ValueError):
    """The folder cannot be summarised (not a multirun folder, no jobs, no metric name); exit code 2."""


@dataclass
class JobResult:
    """What one job left on disk.

    Attributes:
        job: the job's number (``hydra.job.num``) as text, or its folder relative to the multirun folder.
        run_dir: the job's output folder.
        overrides: the job's command-line overrides, as Hydra recorded them (``key=value``).
        metrics: last logged value of every scalar, e.g. ``{"val/psnr_1step": 21.3, ...}``.
        status: ``completed``, ``failed`` or ``unknown`` (no ``sweep_job.json``: a folder from before the
            callback existed, or a job that was killed).
        optimized_metric: the job's ``optimized_metric`` config value, if any.
        return_value: the value the job returned to the sweeper, if recorded.
        error: the exception text of a failed job.
        history: every logged value of every scalar, in step order (``val/*`` once per validation).
    """

    job: str
    run_dir: Path
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "unknown"
    optimized_metric: str | None = None
    return_value: float | None = None
    error: str | None = None
    history: dict[str, list[float]] = field(default_factory=dict)

    def value(self, metric: str) -> float | None:
        """The job's final ``metric``: logged value, else its recorded return value; None if absent/NaN."""
        v = self.metrics.get(metric)
        if v is None and self.return_value is not None and metric == self.optimized_metric:
            v = self.return_value
        return v if v is not None and math.isfinite(v) else None


@dataclass
class SweepSummary:
    """Rows sorted best first (jobs without a value last), and the columns they are shown with."""

    sweep_dir: Path
    metric: str
    mode: str
    rows: list[JobResult]
    varying: list[str]  # override keys whose values differ between jobs (one column each)
    common: list[str]  # overrides shared by every job
    other_metrics: list[str]  # final validation metrics besides `metric`
    noise: float | None = None  # a stated validation noise of `metric`; None: from repeated validations

    @property
    def missing(self) -> list[JobResult]:
        """Jobs that did not report the optimised metric."""
        return [r for r in self.rows if r.value(self.metric) is None]

    @property
    def best(self) -> JobResult | None:
        return self.rows[0] if self.rows and self.rows[0].value(self.metric) is not None else None

    def lead(self) -> Lead | None:
        """How far the best job is ahead of the runner-up, against the validation noise; None with fewer
        than two jobs that reported the metric."""
        done = [r for r in self.rows if r.value(self.metric) is not None]
        if len(done) < 2:
            return None
        best, runner_up = done[0], done[1]
        margin = abs(best.value(self.metric) - runner_up.value(self.metric))  # type: ignore[operator]
        if self.noise is not None:
            return Lead(best, runner_up, margin, float(self.noise), "stated")
        spreads = [_spread(j.history.get(self.metric, [])) for j in (best, runner_up)]
        if any(sp is None for sp in spreads):
            return Lead(best, runner_up, margin, None, "none")
        # the spread of the difference of two single validations, one per job
        noise = math.sqrt(sum(sp * sp for sp in spreads))  # type: ignore[operator]
        return Lead(best, runner_up, margin, noise, "repeated")


NOISE_VALIDATIONS = 3  # the last validations of a job whose spread estimates the noise of one validation


def _spread(values: list[float]) -> float | None:
    """Sample standard deviation of the last :data:`NOISE_VALIDATIONS` finite values; None below two."""
    last = [v for v in values if math.isfinite(v)][-NOISE_VALIDATIONS:]
    if len(last) < 2:
        return None
    mean = sum(last) / len(last)
    return math.sqrt(sum((v - mean) ** 2 for v in last) / (len(last) - 1))


@dataclass
class Lead:
    """The best job's lead over the runner-up.

    Attributes:
        best, runner_up: the two best jobs that reported the metric.
        margin: ``|best - runner_up|`` of the metric.
        noise: the validation noise the margin is compared with; None when it cannot be told.
        source: ``"stated"`` (the ``noise`` option), ``"repeated"`` (the spread of each job's last
            :data:`NOISE_VALIDATIONS` validations, combined for a difference of two) or ``"none"``
            (a job validated only once and no noise was stated).
    """

    best: JobResult
    runner_up: JobResult
    margin: float
    noise: float | None
    source: str

    @property
    def within_noise(self) -> bool | None:
        """Whether the margin does not exceed the noise (the sweep does not separate the two); None when
        the noise is unknown."""
        return None if self.noise is None else self.margin <= self.noise


def _job_number(job_dir: Path, sweep_dir: Path) -> str:
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        num = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.num", default=None)
        if num is not None:
            return str(num)
    return job_dir.relative_to(sweep_dir).as_posix()


def natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def find_jobs(sweep_dir: str | Path) -> list[Path]:
    """Job folders below a multirun folder (parents of ``.hydra/overrides.yaml``), in natural path order."""
    sweep_dir = Path(sweep_dir)
    found = [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")]
    jobs = [p for p in found if p != sweep_dir]
    return sorted(jobs, key=lambda p: natural_key(p.relative_to(sweep_dir).as_posix()))


History = dict[str, dict[int, float]]  # metric -> {step: value}


def _read_csv_metrics(path: Path) -> History:
    """Every non-empty value per column of a Lightning ``metrics.csv`` by step (row order when no step)."""
    out: History = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = int(float(row["step"])) if row.get("step") not in (None, "") else i
            for key, text in row.items():
                if key in ("step", "epoch") or text in (None, ""):
                    continue
                try:
                    out.setdefault(key, {})[step] = float(text)
                except ValueError:
                    continue
    return out


def _read_tensorboard_metrics(folder: Path) -> History:
    """Every value per scalar tag of the event files in ``folder`` by step (all files, so resumed runs
    count; at a step logged twice, the later write wins)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0 = keep every point
    tb_log = logging.getLogger("tensorboard")
    level = tb_log.level
    tb_log.setLevel(max(level, logging.WARNING))  # its directory watcher logs every file it finishes at INFO
    try:
        acc.Reload()
    finally:
        tb_log.setLevel(level)
    out: History = {}
    for tag in acc.Tags().get(SCALARS, []):
        for event in sorted(acc.Scalars(tag), key=lambda e: (e.step, e.wall_time)):
            out.setdefault(tag, {})[int(event.step)] = float(event.value)
    return out


def read_logged_history(job_dir: str | Path) -> dict[str, list[float]]:
    """Every value of every scalar a job logged, in step order, from its CSV logs and TensorBoard files.

    Where both loggers logged a name at one step, the value read last (TensorBoard) wins; a metric logged
    at several steps (e.g. ``val/psnr_1step`` at every validation) gives several values.
    """
    job_dir = Path(job_dir)
    merged: History = {}
    sources = [_read_csv_metrics(p) for p in sorted(job_dir.rglob("metrics.csv"))]
    event_dirs = sorted({p.parent for p in job_dir.rglob("events.out.tfevents.*")})
    sources += [_read_tensorboard_metrics(d) for d in event_dirs]
    for source in sources:
        for key, by_step in source.items():
            merged.setdefault(key, {}).update(by_step)
    return {k: [v for _, v in sorted(by_step.items())] for k, by_step in merged.items()}


def read_logged_metrics(job_dir: str | Path) -> dict[str, float]:
    """Final value of every scalar a job logged, from its CSV logs and TensorBoard event files.

    Args:
        job_dir: a run folder of ``train.py``.

    Returns:
        ``{name: value}``: the value at the latest step, whichever logger wrote it.
    """
    return {k: values[-1] for k, values in read_logged_history(job_dir).items() if values}


def read_job(job_dir: str | Path, sweep_dir: str | Path) -> JobResult:
    """Overrides, final metrics, status and optimised metric of one job folder."""
    job_dir, sweep_dir = Path(job_dir), Path(sweep_dir)
    overrides = [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml") or []]
    result = JobResult(job=_job_number(job_dir, sweep_dir), run_dir=job_dir, overrides=overrides)
    config_yaml = job_dir / ".hydra" / "config.yaml"
    if config_yaml.is_file():
        name = OmegaConf.select(OmegaConf.load(config_yaml), "optimized_metric", default=None)
        result.optimized_metric = str(name) if name else None
    record = job_dir / JOB_RECORD
    if record.is_file():
        data = json.loads(record.read_text())
        result.status = str(data.get("status", "unknown"))
        result.error = data.get("error")
        rv = data.get("return_value")
        result.return_value = float(rv) if isinstance(rv, (int, float)) else None
    result.history = read_logged_history(job_dir)
    result.metrics = {k: values[-1] for k, values in result.history.items() if values}
    return result


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resolve_mode(mode: Any) -> str:
    """``max``/``min`` from ``max``, ``min``, ``maximize``, ``minimize`` (or Optuna's Direction enum)."""
    name = str(getattr(mode, "name", mode)).lower()
    if name not in _MODE_ALIASES:
        raise SweepSummaryError(f"mode must be one of {', '.join(_MODE_ALIASES)}, got {mode!r}")
    return _MODE_ALIASES[name]


def build_summary(
    sweep_dir: str | Path, metric: str | None = None, mode: str = "max", noise: float | None = None
) -> SweepSummary:
    """Read every job of a multirun folder and sort them by ``metric``.

    Args:
        sweep_dir: the multirun folder (``hydra.sweep.dir``).
        metric: the metric to sort by; None = the jobs' ``optimized_metric`` (they must agree).
        mode: ``"max"`` (higher is better, e.g. PSNR) or ``"min"`` (e.g. LPIPS); also ``"maximize"`` /
            ``"minimize"``.
        noise: the validation noise of ``metric`` (e.g. 0.05 for a PSNR in dB): a best job that leads by
            no more is reported as not separated; None = estimated from repeated validations
            (:meth:`SweepSummary.lead`).

    Raises:
        SweepSummaryError: not a folder, no job folders, unknown mode, or no metric name.
    """
    sweep_dir = Path(sweep_dir)
    mode = resolve_mode(mode)
    if not sweep_dir.is_dir():
        raise SweepSummaryError(f"{sweep_dir} is not a folder")
    if noise is not None and not (math.isfinite(noise) and noise >= 0):
        raise SweepSummaryError(f"noise must be a finite number >= 0, got {noise!r}")
    job_dirs = find_jobs(sweep_dir)
    if not job_dirs:
        raise SweepSummaryError(f"no job folders (with .hydra/overrides.yaml) below {sweep_dir}")
    jobs = [read_job(d, sweep_dir) for d in job_dirs]
    if metric is None:
        names = sorted({j.optimized_metric for j in jobs if j.optimized_metric})
        if len(names) != 1:
            found = ", ".join(names) if names else "none"
            raise SweepSummaryError(
                f"cannot tell which metric to sort by (optimized_metric of the jobs: {found}); pass --metric"
            )
        metric = names[0]

    sign = -1.0 if mode == "max" else 1.0

    def order(job: JobResult) -> tuple[int, float, list[Any]]:
        v = job.value(metric)
        return (v is None, sign * v if v is not None else 0.0, natural_key(job.job))

    rows = sorted(jobs, key=order)
    keys: dict[str, set[str]] = {}
    for job in jobs:
        for o in job.overrides:
            keys.setdefault(override_key(o), set())
    per_job = [{override_key(o): o.split("=", 1)[-1] for o in job.overrides} for job in jobs]
    for key in keys:
        keys[key] = {values.get(key, "") for values in per_job}
    varying = [k for k, values in keys.items() if len(values) > 1]
    common = [o for o in jobs[0].overrides if override_key(o) not in varying]
    others = sorted({k for j in jobs for k in j.metrics if k.startswith("val/") and k != metric})
    return SweepSummary(sweep_dir, metric, mode, rows, varying, common, others, noise)
