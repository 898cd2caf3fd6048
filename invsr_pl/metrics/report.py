"""Evaluation results: the per-image SR seed, merging rows gathered from ranks, latency statistics, tables
in the paper's format (Markdown, CSV, terminal), per-image CSV, metadata and the fidelity-realism plot. No
Lightning, no models: apart from :func:`sr_generator`, everything here takes plain Python values.

Row dictionaries used throughout:

* per-image row: ``{"benchmark", "method", "timesteps", "order", "index", "name", "seconds",
  <metric key>: float | None, ...}``
* summary row: ``{"benchmark", "method", "timesteps", "num_images", <metric key>: float | None,
  "latency_mean_s", "latency_p95_s", "images_per_s"}`` (``None`` = not computed / not applicable).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from invsr_pl.utils.seeding import stable_seed

#: Decimal places per metric as the official log prints them (docs/evaluation.md): PSNR, FID 2; others 4.
DECIMALS = {"psnr": 2, "fid": 2}
DEFAULT_DECIMALS = 4
#: Fidelity (x) and realism (y) preference for the study plot; the first available of each is used.
FIDELITY_KEYS = ("psnr", "lpips_vgg", "lpips_alex", "dists", "ssim")
REALISM_KEYS = ("clipiqa", "musiq", "maniqa", "niqe", "pi")


# ------------------------------------------------------------------------------------------------ seeding
def sr_generator(seed: int, names: Sequence[str], device: torch.device | str) -> torch.Generator:
    """The generator of one SR call on the images ``names`` (one batch): fresh for every method and seeded
    from (seed, names) only, so a result depends neither on the batch index, the rank, the number of GPUs nor
    on which other methods ran before; validation and evaluation seed alike (docs/evaluation.md)."""
    return torch.Generator(device=device).manual_seed(stable_seed(seed, "sr", *names))


# ------------------------------------------------------------------------------------------------ multi-GPU
def batch_positions(loader: Any, batch_idx: int, size: int) -> tuple[list[int], list[bool]]:
    """Dataset indices of the ``size`` items of batch ``batch_idx`` of ``loader`` on this rank, and whether
    each one counts.

    Under DDP, Lightning gives evaluation loaders a ``DistributedSampler`` (no shuffle) that pads the last
    round by repeating the first images so every rank gets as many: item ``j`` of rank ``r`` is global
    position ``r + j * world``, and positions ``>= len(dataset)`` are those repeats, which must not be scored
    twice. Any other sampler yields each image once.
    """
    sampler, start = loader.sampler, batch_idx * (loader.batch_size or 1)
    local = range(start, start + size)
    if isinstance(sampler, torch.utils.data.DistributedSampler) and not sampler.shuffle:
        total = len(loader.dataset)
        positions = [sampler.rank + j * sampler.num_replicas for j in local]
        return [p % total for p in positions], [p < total for p in positions]
    if isinstance(sampler, torch.utils.data.SequentialSampler):
        return list(local), [True] * size
    order = list(iter(sampler))
    return [order[j] for j in local], [True] * size


def merge_gathered(per_rank: Iterable[Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Merge the per-image rows gathered from every rank (``all_gather_object``) back into dataset order.

    Rows are ordered by their position in the run (``order``: benchmark, then method) and by ``index`` (the
    dataset index). Raises ``ValueError`` if two ranks report the same image of the same method.
    """
    rows = [dict(r) for part in per_rank for r in part]
    keys = [(r["benchmark"], r["method"], r["index"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate per-image rows after gather: the shards overlap")
    return sorted(rows, key=lambda r: (r.get("order", 0), r["index"]))


# ------------------------------------------------------------------------------------------------ latency
def latency_summary(seconds: Sequence[float], wall_seconds: float | None = None) -> dict[str, float]:
    """Mean and 95th percentile (linear interpolation) seconds per image and images per second.

    Args:
        seconds: wall-clock SR time per image (device-synchronised, metrics excluded), all ranks.
        wall_seconds: time the slowest rank spent on SR (multi-GPU throughput = images / that);
            ``None`` = ``sum(seconds)`` (one device).
    """
    if not seconds:
        return {"latency_mean_s": math.nan, "latency_p95_s": math.nan, "images_per_s": math.nan}
    arr = np.asarray(seconds, dtype=np.float64)
    total = float(arr.sum()) if wall_seconds is None else float(wall_seconds)
    return {
        "latency_mean_s": float(arr.mean()),
        "latency_p95_s": float(np.percentile(arr, 95)),
        "images_per_s": len(arr) / total if total > 0 else math.inf,
    }


# ------------------------------------------------------------------------------------------------ checks
def check_pair(sr_name: str, sr_shape: Sequence[int], gt_name: str, gt_shape: Sequence[int]) -> None:
    """Refuse mismatched SR/GT pairs, naming both files (the official script silently crops instead)."""
    if Path(sr_name).stem != Path(gt_name).stem:
        raise ValueError(f"SR/GT name mismatch: SR {sr_name!r} is paired with GT {gt_name!r}")
    if tuple(sr_shape) != tuple(gt_shape):
        raise ValueError(
            f"SR/GT size mismatch for {sr_name!r}: SR {tuple(sr_shape)} vs GT {gt_name!r} {tuple(gt_shape)}; "
            "crop or resize the GT to scale x LQ size (no silent crop is done here)"
        )


# ------------------------------------------------------------------------------------------------ tables
def format_value(key: str, value: float | None) -> str:
    """Table text of one value: ``"—"`` when missing, ``"inf"``/``"nan"`` spelled out, else fixed decimals."""
    if value is None:
        return "—"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{DECIMALS.get(key, DEFAULT_DECIMALS)}f}"


def table_columns(metric_headers: Mapping[str, str], with_latency: bool = True) -> list[tuple[str, str]]:
    """``[(key, header)]`` for the table: benchmark, method, timesteps, metrics (with ↑/↓), latency."""
    cols = [("benchmark", "Benchmark"), ("method", "Method"), ("timesteps", "Timesteps")]
    cols += list(metric_headers.items())
    if with_latency:
        cols += [("latency_mean_s", "s/img↓"), ("latency_p95_s", "p95 s/img↓"), ("images_per_s", "img/s↑")]
    return cols


def _cell(key: str, row: Mapping[str, Any]) -> str:
    value = row.get(key)
    if key in ("benchmark", "method"):
        return str(value)
    if key == "timesteps":
        return ",".join(str(t) for t in value) if value is not None else "—"
    if key.startswith("latency") or key == "images_per_s":
        return format_value("latency", value)
    return format_value(key, value)


def to_markdown(rows: Sequence[Mapping[str, Any]], metric_headers: Mapping[str, str]) -> str:
    """Markdown table, one line per (benchmark, method) summary row."""
    cols = table_columns(metric_headers)
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(k, r) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Mapping[str, Any]], metric_headers: Mapping[str, str]) -> str:
    """CSV of the summary with full-precision numbers; empty cell = not computed."""
    cols = table_columns(metric_headers)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([h for _, h in cols])
    for r in rows:
        out = []
        for k, _ in cols:
            v = r.get(k)
            out.append(
                ",".join(map(str, v)) if k == "timesteps" and v is not None else ("" if v is None else v)
            )
        writer.writerow(out)
    return buf.getvalue()


def per_image_csv(rows: Sequence[Mapping[str, Any]], metric_keys: Sequence[str]) -> str:
    """CSV with one line per (benchmark, method, image): name, timesteps, seconds and each metric."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["benchmark", "method", "timesteps", "index", "name", "seconds", *metric_keys])
    for r in rows:
        writer.writerow(
            [r["benchmark"], r["method"], ",".join(map(str, r["timesteps"] or ())), r["index"], r["name"],
             r["seconds"], *("" if r.get(k) is None else r[k] for k in metric_keys)]
        )  # fmt: skip
    return buf.getvalue()


def report_text(
    rows: Sequence[Mapping[str, Any]],
    metric_headers: Mapping[str, str],
    protocol: str,
    protocol_description: str,
    unavailable: Mapping[str, str],
    checkpoint: str | None,
    backbone: str | None = None,
) -> str:
    """What is printed to the terminal: protocol, checkpoint, backbone, the table and why any metric is
    missing."""
    out = [f"Protocol: {protocol} — {protocol_description}", f"Checkpoint: {checkpoint or '(random init)'}"]
    out += [f"Backbone: {backbone}"] if backbone else []
    out.append("")
    out.append(to_markdown(rows, metric_headers))
    for key, reason in unavailable.items():
        out.append(f"unavailable: {key}: {reason}")
    return "\n".join(out).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ plot
def choose_plot_axes(available: Iterable[str]) -> tuple[str, str]:
    """``(fidelity key, realism key)``: e.g. PSNR vs CLIPIQA; offline (no realism metric) PSNR vs SSIM."""
    have = set(available)
    fidelity = next((k for k in FIDELITY_KEYS if k in have), None)
    realism = next((k for k in REALISM_KEYS if k in have), None)
    if fidelity is None:
        raise ValueError(f"no fidelity metric to plot among {sorted(have)}")
    if realism is None:  # offline fallback: both axes are weight-free
        realism = "ssim" if fidelity != "ssim" and "ssim" in have else None
        if realism is None:
            raise ValueError(f"need two metrics to plot, have {sorted(have)}")
    return fidelity, realism


def fidelity_realism_plot(
    rows: Sequence[Mapping[str, Any]],
    x_key: str,
    y_key: str,
    headers: Mapping[str, str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Scatter one labelled point per summary row (a timestep set) and save a PNG (matplotlib Agg backend).

    Rows of different benchmarks get different markers; rows with a missing value are skipped.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    for marker, bench in zip("os^Dv<>p*h", benchmarks, strict=False):
        pts = [r for r in rows if r["benchmark"] == bench and _finite(r.get(x_key)) and _finite(r.get(y_key))]
        if not pts:
            continue
        ax.scatter([r[x_key] for r in pts], [r[y_key] for r in pts], marker=marker, label=bench)
        for r in pts:
            ax.annotate(
                r["method"], (r[x_key], r[y_key]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    ax.set_xlabel(headers.get(x_key, x_key))
    ax.set_ylabel(headers.get(y_key, y_key))
    ax.set_title(title or "fidelity vs realism")
    ax.grid(True, alpha=0.3)
    if benchmarks:
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()  # keeps the axis labels inside the fixed 640x480 canvas
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ------------------------------------------------------------------------------------------------ files
def write_outputs(
    out_dir: str | Path,
    summary: Sequence[Mapping[str, Any]],
    per_image: Sequence[Mapping[str, Any]],
    metric_headers: Mapping[str, str],
    report: str,
    metadata: Mapping[str, Any],
) -> dict[str, Path]:
    """Write ``metrics.md``, ``metrics.csv``, ``per_image.csv``, ``report.txt`` and ``metadata.json``.

    Returns:
        ``{kind: path}`` of the written files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out / "metrics.md",
        "csv": out / "metrics.csv",
        "per_image": out / "per_image.csv",
        "report": out / "report.txt",
        "metadata": out / "metadata.json",
    }
    files["markdown"].write_text(report_header(metadata) + to_markdown(summary, metric_headers))
    files["csv"].write_text(to_csv(summary, metric_headers))
    files["per_image"].write_text(per_image_csv(per_image, list(metric_headers)))
    files["report"].write_text(report)
    files["metadata"].write_text(json.dumps(metadata, indent=2, default=str, allow_nan=True) + "\n")
    return files


def report_header(metadata: Mapping[str, Any]) -> str:
    """Provenance lines put above the Markdown table."""
    keys = ("protocol", "checkpoint", "backbone", "seed", "config_name")
    return "".join(f"- {k}: {metadata.get(k)}\n" for k in keys if k in metadata) + "\n"
