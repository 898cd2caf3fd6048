"""``invsr-sweep-summary DIR [--metric NAME] [--mode max|min] [--noise X] [--output DIR]``.

Also ``python -m invsr_pl.cli.sweep_summary``.

Rebuilds the summary of a finished (or interrupted) multirun folder, e.g. one copied back from a cluster.
Exit codes: 0 every job reported the metric, 1 some did not (the summary is still written, those rows last),
2 setup error (no such folder, no jobs, no metric name).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from invsr_pl.sweeps.report import summary_markdown, write_summary
from invsr_pl.sweeps.results import MODES, SweepSummaryError, build_summary

__all__ = ["main"]


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
    p.add_argument(
        "--noise",
        type=float,
        default=None,
        help="validation noise of the metric (e.g. 0.05 dB): say whether the best job's lead exceeds it "
        "(default: the spread of each job's last validations)",
    )
    p.add_argument("--output", default=None, help="folder for the three files (default: the multirun folder)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``invsr-sweep-summary DIR [--metric NAME] [--mode max|min] [--noise X] [--output DIR]``; returns the
    exit code."""
    args = _parse_args(argv)
    try:
        summary = build_summary(args.sweep_dir, args.metric, args.mode, args.noise)
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
