"""Sweep result tables: one row per job of a Hydra multirun, sorted by the optimised metric.

After each job of ``python train.py -m ...`` and at its end (any sweeper: basic grid, Optuna), the Hydra
callback :class:`SweepSummaryCallback` (configured in ``conf/hydra/default.yaml``) writes into the multirun
folder:

- ``summary.csv``: one row per job: rank, job number, status, one column per override that varies across
  jobs, the full override string, the optimised metric, the other final validation metrics (``val/*``) and
  the job's run folder (relative to the multirun folder);
- ``summary.md``: the same table for reading, with the overrides common to all jobs and the best job above it;
- ``summary.png``: a bar chart of the optimised metric per job, the best job highlighted.

Everything is read from what the jobs left on disk, so the same summary can be rebuilt later from a folder
copied back from a cluster (``invsr-sweep-summary DIR`` or ``python -m invsr_pl.sweeps DIR``):

- job folders are the parents of ``.hydra/overrides.yaml`` below the multirun folder; the job number comes
  from ``.hydra/hydra.yaml``, the optimised metric's name from ``optimized_metric`` in ``.hydra/config.yaml``;
- final metrics are the last logged value of each scalar in the job's Lightning CSV logs (``metrics.csv``) and
  TensorBoard event files, whichever logger the job used;
- ``sweep_job.json``, written by the callback at the end of each job, adds the job's status, its return value
  (the sweeper's objective) and, for a failed job, the error.

Exit codes of the command: 0 every job reported the metric, 1 some did not (the summary is still written,
those rows last), 2 setup error (no such folder, no jobs, no metric name).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from invsr_pl.utils.atomic import atomic_write

__all__ = [
    "JOB_RECORD",
    "JobResult",
    "SweepSummary",
    "SweepSummaryCallback",
    "build_summary",
    "find_jobs",
    "main",
    "read_job",
    "read_logged_metrics",
    "write_summary",
]

log = logging.getLogger(__name__)

JOB_RECORD = "sweep_job.json"  # written into each job's folder by SweepSummaryCallback.on_job_end
SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")
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
    """

    job: str
    run_dir: Path
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "unknown"
    optimized_metric: str | None = None
    return_value: float | None = None
    error: str | None = None

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

    @property
    def missing(self) -> list[JobResult]:
        """Jobs that did not report the optimised metric."""
        return [r for r in self.rows if r.value(self.metric) is None]

    @property
    def best(self) -> JobResult | None:
        return self.rows[0] if self.rows and self.rows[0].value(self.metric) is not None else None


# ---------------------------------------------------------------------------------------------- reading
def _job_number(job_dir: Path, sweep_dir: Path) -> str:
    hydra_yaml = job_dir / ".hydra" / "hydra.yaml"
    if hydra_yaml.is_file():
        num = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.num", default=None)
        if num is not None:
            return str(num)
    return job_dir.relative_to(sweep_dir).as_posix()


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def find_jobs(sweep_dir: str | Path) -> list[Path]:
    """Job folders below a multirun folder (parents of ``.hydra/overrides.yaml``), in natural path order."""
    sweep_dir = Path(sweep_dir)
    found = [p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")]
    jobs = [p for p in found if p != sweep_dir]
    return sorted(jobs, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def _read_csv_metrics(path: Path) -> dict[str, tuple[int, float]]:
    """Last non-empty value per column of a Lightning ``metrics.csv``, with its row order as the step."""
    out: dict[str, tuple[int, float]] = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            step = int(float(row["step"])) if row.get("step") not in (None, "") else i
            for key, text in row.items():
                if key in ("step", "epoch") or text in (None, ""):
                    continue
                try:
                    out[key] = (step, float(text))
                except ValueError:
                    continue
    return out


def _read_tensorboard_metrics(folder: Path) -> dict[str, tuple[int, float]]:
    """Last value per scalar tag of the event files in ``folder`` (all files, so resumed runs count)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})  # 0 = keep every point
    tb_log = logging.getLogger("tensorboard")
    level = tb_log.level
    tb_log.setLevel(max(level, logging.WARNING))  # its directory watcher logs every file it finishes at INFO
    try:
        acc.Reload()
    finally:
        tb_log.setLevel(level)
    out: dict[str, tuple[int, float]] = {}
    for tag in acc.Tags().get(SCALARS, []):
        events = acc.Scalars(tag)
        if events:
            last = max(events, key=lambda e: (e.step, e.wall_time))
            out[tag] = (int(last.step), float(last.value))
    return out


def read_logged_metrics(job_dir: str | Path) -> dict[str, float]:
    """Final value of every scalar a job logged, from its CSV logs and TensorBoard event files.

    Args:
        job_dir: a run folder of ``train.py``.

    Returns:
        ``{name: value}``; where both loggers have a name, the value with the later step wins.
    """
    job_dir = Path(job_dir)
    found: dict[str, tuple[int, float]] = {}
    sources = [_read_csv_metrics(p) for p in sorted(job_dir.rglob("metrics.csv"))]
    event_dirs = sorted({p.parent for p in job_dir.rglob("events.out.tfevents.*")})
    sources += [_read_tensorboard_metrics(d) for d in event_dirs]
    for source in sources:
        for key, (step, value) in source.items():
            if key not in found or step >= found[key][0]:
                found[key] = (step, value)
    return {k: v for k, (_, v) in found.items()}


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
    result.metrics = read_logged_metrics(job_dir)
    return result


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _mode(mode: Any) -> str:
    """``max``/``min`` from ``max``, ``min``, ``maximize``, ``minimize`` (or Optuna's Direction enum)."""
    name = str(getattr(mode, "name", mode)).lower()
    if name not in _MODE_ALIASES:
        raise SweepSummaryError(f"mode must be one of {', '.join(_MODE_ALIASES)}, got {mode!r}")
    return _MODE_ALIASES[name]


def build_summary(sweep_dir: str | Path, metric: str | None = None, mode: str = "max") -> SweepSummary:
    """Read every job of a multirun folder and sort them by ``metric``.

    Args:
        sweep_dir: the multirun folder (``hydra.sweep.dir``).
        metric: the metric to sort by; None = the jobs' ``optimized_metric`` (they must agree).
        mode: ``"max"`` (higher is better, e.g. PSNR) or ``"min"`` (e.g. LPIPS); also ``"maximize"`` /
            ``"minimize"``.

    Raises:
        SweepSummaryError: not a folder, no job folders, unknown mode, or no metric name.
    """
    sweep_dir = Path(sweep_dir)
    mode = _mode(mode)
    if not sweep_dir.is_dir():
        raise SweepSummaryError(f"{sweep_dir} is not a folder")
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
        return (v is None, sign * v if v is not None else 0.0, _natural_key(job.job))

    rows = sorted(jobs, key=order)
    keys: dict[str, set[str]] = {}
    for job in jobs:
        for o in job.overrides:
            keys.setdefault(_override_key(o), set())
    per_job = [{_override_key(o): o.split("=", 1)[-1] for o in job.overrides} for job in jobs]
    for key in keys:
        keys[key] = {values.get(key, "") for values in per_job}
    varying = [k for k, values in keys.items() if len(values) > 1]
    common = [o for o in jobs[0].overrides if _override_key(o) not in varying]
    others = sorted({k for j in jobs for k in j.metrics if k.startswith("val/") and k != metric})
    return SweepSummary(sweep_dir, metric, mode, rows, varying, common, others)


# ---------------------------------------------------------------------------------------------- writing
def _override_value(job: JobResult, key: str) -> str:
    for o in job.overrides:
        if _override_key(o) == key:
            return o.split("=", 1)[1] if "=" in o else o
    return ""


def _fmt(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _run_dir(summary: SweepSummary, job: JobResult) -> str:
    try:
        return job.run_dir.relative_to(summary.sweep_dir).as_posix()
    except ValueError:
        return str(job.run_dir)


def _rows(summary: SweepSummary) -> tuple[list[str], list[list[Any]]]:
    """Header and cells shared by the CSV and Markdown tables (raw floats; None = absent)."""
    header = ["rank", "job", "status", *summary.varying, summary.metric, *summary.other_metrics, "run_dir"]
    cells = []
    for rank, job in enumerate(summary.rows, start=1):
        value = job.value(summary.metric)
        cells.append(
            [
                rank if value is not None else "",
                job.job,
                job.status,
                *(_override_value(job, k) for k in summary.varying),
                value,
                *(job.metrics.get(m) for m in summary.other_metrics),
                _run_dir(summary, job),
            ]
        )
    return header, cells


def summary_csv(summary: SweepSummary) -> str:
    """CSV text: the table plus the full override string per job; full-precision numbers, empty = absent."""
    header, cells = _rows(summary)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*header[:-1], "overrides", header[-1]])
    for job, row in zip(summary.rows, cells, strict=True):
        row = ["" if c is None else c for c in row]
        writer.writerow([*row[:-1], " ".join(job.overrides), row[-1]])
    return buf.getvalue()


def summary_markdown(summary: SweepSummary) -> str:
    """Markdown report: what was swept, the best job, the table, and any job without a value."""
    header, cells = _rows(summary)
    direction = "higher is better" if summary.mode == "max" else "lower is better"
    lines = [f"# Sweep summary: {summary.sweep_dir}", ""]
    lines.append(f"Sorted by `{summary.metric}` ({direction}); {len(summary.rows)} jobs.")
    if summary.common:
        lines.append(f"Common overrides: `{' '.join(summary.common)}`.")
    best = summary.best
    if best is not None:
        swept = (
            " ".join(o for o in best.overrides if _override_key(o) in summary.varying)
            or "(no varying override)"
        )
        lines.append(
            f"Best: job {best.job} (`{swept}`), {summary.metric} = {_fmt(best.value(summary.metric))}, "
            f"run folder `{_run_dir(summary, best)}`."
        )
    lines += ["", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in cells:
        text = [_fmt(c) if isinstance(c, float) or c is None else str(c) for c in row]
        lines.append("| " + " | ".join(t.replace("|", "\\|") for t in text) + " |")
    missing = summary.missing
    if missing:
        lines += ["", f"Jobs without a value for `{summary.metric}`:", ""]
        for job in missing:
            why = " ".join(job.error.split()) if job.error else f"status {job.status}, metric not logged"
            why = why if len(why) <= 300 else why[:297] + "..."
            lines.append(f"- job {job.job} (`{_run_dir(summary, job)}`): {why}")
    return "\n".join(lines) + "\n"


def summary_plot(summary: SweepSummary, path: Path) -> None:
    """The metric per job (job order) as points, the best job highlighted, written as PNG to ``path``.

    Points rather than bars (jobs are categories, and bars cut off at a zoomed baseline would exaggerate the
    differences); the axis is zoomed on the spread of the values, since sweeps often differ in the first or
    second decimal of a PSNR.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    jobs = sorted(summary.rows, key=lambda j: _natural_key(j.job))
    values = [j.value(summary.metric) for j in jobs]
    labels = []
    for job in jobs:
        swept = "\n".join(f"{k}={_override_value(job, k)}" for k in summary.varying)
        labels.append(f"{job.job}\n{swept}" if swept else job.job)
    fig = Figure(figsize=(max(4.0, 1.3 * len(jobs) + 1.5), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    best = summary.best
    x = list(range(len(jobs)))
    done = [(xi, v, j is best) for xi, v, j in zip(x, values, jobs, strict=True) if v is not None]
    if done:
        for xi, v, is_best in done:
            ax.scatter(
                [xi], [v], color="tab:orange" if is_best else "tab:blue", s=60 if is_best else 36, zorder=2
            )
            ax.annotate(
                f"{v:.4f}", (xi, v), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8
            )
        lo, hi = min(d[1] for d in done), max(d[1] for d in done)
        pad = max((hi - lo) * 0.2, abs(hi) * 0.002, 1e-6)  # differences below ~0.2 % look flat
        ax.set_ylim(lo - pad, hi + pad)
    for xi, v in zip(x, values, strict=True):
        if v is None:  # a failed job, or one that never validated
            ax.annotate("n/a", (xi, 0.5), xycoords=("data", "axes fraction"), ha="center", color="tab:red")
    ax.set_xlim(-0.5, len(jobs) - 0.5)
    ax.set_xticks(x, labels, fontsize=7)
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlabel("job")
    direction = "higher is better" if summary.mode == "max" else "lower is better"
    ax.set_ylabel(f"{summary.metric} ({direction})")
    ax.set_title(f"{summary.sweep_dir.name}: {len(done)} of {len(jobs)} jobs", fontsize=9)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)


def write_summary(summary: SweepSummary, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png`` (each atomically) into ``out_dir``
    (default: the multirun folder). Returns the three paths."""
    out = Path(out_dir) if out_dir is not None else summary.sweep_dir
    paths = [out / name for name in SUMMARY_FILES]
    for path, text in zip(paths[:2], (summary_csv(summary), summary_markdown(summary)), strict=True):
        with atomic_write(path) as f:
            f.write(text.encode())
    summary_plot(summary, paths[2])
    return paths


# ---------------------------------------------------------------------------------------------- Hydra
class SweepSummaryCallback(Callback):
    """Hydra callback: records each job's outcome and keeps the multirun folder's summary up to date.

    Args:
        metric: the metric to sort by; None = the jobs' ``optimized_metric``.
        mode: ``"max"`` or ``"min"`` (or Optuna's ``"maximize"`` / ``"minimize"``).
        after_each_job: also rewrite the summary at the end of every job, so a sweep that stops halfway
            (Hydra's basic sweeper raises at the first failed job, before ``on_multirun_end``) still leaves a
            table with the failed job in it.
        enabled: False turns the callback off.

    A summary that cannot be written is logged with the command that rebuilds it; it never fails a job or a
    sweep. Multiruns whose jobs name no ``optimized_metric`` (e.g. ``evaluate.py -m``) get no summary.
    """

    def __init__(
        self, metric: str | None = None, mode: str = "max", after_each_job: bool = True, enabled: bool = True
    ) -> None:
        self.metric = metric or None
        self.mode = _mode(mode)
        self.after_each_job = bool(after_each_job)
        self.enabled = bool(enabled)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """In MULTIRUN mode, write ``sweep_job.json`` (status, return value, error) into the job's folder."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not self.enabled or not HydraConfig.initialized():
            return
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        status = getattr(job_return.status, "name", str(job_return.status)).lower()
        value = job_return._return_value  # .return_value would re-raise a failed job's exception
        record: dict[str, Any] = {
            "status": status,
            "job": hydra_cfg.job.num,
            "overrides": list(job_return.overrides or []),
        }
        if isinstance(value, BaseException):
            record["error"] = f"{type(value).__name__}: {value}"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            record["return_value"] = float(value)
        with atomic_write(Path(hydra_cfg.runtime.output_dir) / JOB_RECORD) as f:
            f.write((json.dumps(record, indent=2) + "\n").encode())
        if self.after_each_job:
            self._summarise(Path(str(hydra_cfg.sweep.dir)), final=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.enabled:
            self._summarise(Path(str(config.hydra.sweep.dir)), final=True)

    def _summarise(self, sweep_dir: Path, final: bool) -> None:
        try:
            summary = build_summary(sweep_dir, self.metric, self.mode)
            paths = write_summary(summary)
        except SweepSummaryError as err:  # e.g. jobs without optimized_metric: nothing to rank
            log.info("No sweep summary: %s", err)
            return
        except Exception as err:  # the jobs ran; say how to get the table rather than fail anything
            log.error(
                "Could not write the sweep summary (%s: %s); rebuild it with: invsr-sweep-summary %s",
                type(err).__name__,
                err,
                sweep_dir,
            )
            return
        if final:
            log.info("Sweep summary: %s", ", ".join(str(p) for p in paths))
            best = summary.best
            if best is not None:
                log.info("Best job %s: %s = %.4f", best.job, summary.metric, best.value(summary.metric))


# ---------------------------------------------------------------------------------------------- command
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="invsr-sweep-summary",
        description="Write summary.csv / summary.md / summary.png for a finished Hydra multirun folder.",
    )
    p.add_argument(
        "sweep_dir", help="the multirun folder (hydra.sweep.dir), e.g. logs/<task>/multiruns/<time>"
    )
    p.add_argument("--metric", default=None, help="metric to sort by (default: the jobs' optimized_metric)")
    p.add_argument("--mode", choices=MODES, default="max", help="max: higher is better (PSNR); min: lower")
    p.add_argument("--output", default=None, help="folder for the three files (default: the multirun folder)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``invsr-sweep-summary DIR [--metric NAME] [--mode max|min] [--output DIR]``; returns the exit code."""
    args = _parse_args(argv)
    try:
        summary = build_summary(args.sweep_dir, args.metric, args.mode)
        paths = write_summary(summary, args.output)
    except (SweepSummaryError, OSError) as err:
        print(f"invsr-sweep-summary: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(summary_markdown(summary))
    print("wrote " + ", ".join(str(p) for p in paths))
    missing = summary.missing
    if missing:
        print(
            f"invsr-sweep-summary: {len(missing)} of {len(summary.rows)} jobs have no {summary.metric}: "
            + ", ".join(j.job for j in missing),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
