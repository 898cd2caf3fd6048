"""The sweep summary as files: ``summary.csv``, ``summary.md``, ``summary.png`` (each written atomically)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from invsr_pl.sweeps.results import NOISE_VALIDATIONS, JobResult, SweepSummary, natural_key, override_key
from invsr_pl.utils.atomic import atomic_write

__all__ = [
    "SUMMARY_FILES",
    "lead_verdict",
    "summary_csv",
    "summary_markdown",
    "summary_plot",
    "write_summary",
]

SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")


def override_value(job: JobResult, key: str) -> str:
    for o in job.overrides:
        if override_key(o) == key:
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
                *(override_value(job, k) for k in summary.varying),
                value,
                *(job.metrics.get(m) for m in summary.other_metrics),
                _run_dir(summary, job),
            ]
        )
    return header, cells


def lead_verdict(summary: SweepSummary) -> str:
    """One sentence on whether the best job's lead over the runner-up exceeds the validation noise ("" with
    fewer than two jobs that reported the metric)."""
    lead = summary.lead()
    if lead is None:
        return ""
    ahead = f"Its lead over job {lead.runner_up.job} is {_fmt(lead.margin)}"
    if lead.noise is None:
        return (
            f"{ahead}; the validation noise is unknown (a job validated fewer than twice): compare with "
            "repeated validations, or state it with `--noise` (`hydra.callbacks.sweep_summary.noise`)."
        )
    if lead.source == "stated":
        what = f"the stated validation noise {_fmt(lead.noise)}"
    else:
        what = (
            f"the validation noise {_fmt(lead.noise)} (the spread of each job's last "
            f"{NOISE_VALIDATIONS} validations)"
        )
    if lead.within_noise:
        pair = f"jobs {lead.best.job} and {lead.runner_up.job}"
        return f"{ahead}, within {what}: the sweep does not separate {pair}."
    return f"{ahead}, above {what}."


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
            " ".join(o for o in best.overrides if override_key(o) in summary.varying)
            or "(no varying override)"
        )
        lines.append(
            f"Best: job {best.job} (`{swept}`), {summary.metric} = {_fmt(best.value(summary.metric))}, "
            f"run folder `{_run_dir(summary, best)}`."
        )
        verdict = lead_verdict(summary)
        if verdict:
            lines.append(verdict)
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

    jobs = sorted(summary.rows, key=lambda j: natural_key(j.job))
    values = [j.value(summary.metric) for j in jobs]
    labels = []
    for job in jobs:
        swept = "\n".join(f"{k}={override_value(job, k)}" for k in summary.varying)
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
