"""Sweep result tables: one row per job of a Hydra multirun, sorted by the optimised metric.

After each job of ``python train.py -m ...`` and at its end (any sweeper: basic grid, Optuna), the Hydra
callback :class:`SweepSummaryCallback` (configured in ``conf/hydra/default.yaml``) writes into the multirun
folder:

- ``summary.csv``: one row per job: rank, job number, status, one column per override that varies across
  jobs, the full override string, the optimised metric, the other final validation metrics (``val/*``) and
  the job's run folder (relative to the multirun folder);
- ``summary.md``: the same table for reading, with the overrides common to all jobs and the best job above it,
  and whether its lead over the runner-up exceeds the validation noise (a stated ``noise``, or the spread of
  each job's last validations);
- ``summary.png``: the optimised metric per job as a point plot, the best job highlighted.

Everything is read from what the jobs left on disk, so the same summary can be rebuilt later from a folder
copied back from a cluster (``invsr-sweep-summary DIR``, i.e. ``python -m invsr_pl.cli.sweep_summary DIR``):

- job folders are the parents of ``.hydra/overrides.yaml`` below the multirun folder; the job number comes
  from ``.hydra/hydra.yaml``, the optimised metric's name from ``optimized_metric`` in ``.hydra/config.yaml``;
- final metrics are the last logged value of each scalar in the job's Lightning CSV logs (``metrics.csv``) and
  TensorBoard event files, whichever logger the job used;
- ``sweep_job.json``, written by the callback at the end of each job, adds the job's status, its return value
  (the sweeper's objective) and, for a failed job, the error.

Modules: :mod:`~invsr_pl.sweeps.results` (reading jobs, sorting), :mod:`~invsr_pl.sweeps.report` (the three
files), :mod:`~invsr_pl.sweeps.callback` (the Hydra callback); the command is
:mod:`~invsr_pl.cli.sweep_summary`.
"""

from invsr_pl.sweeps.callback import SweepSummaryCallback
from invsr_pl.sweeps.report import (
    SUMMARY_FILES,
    lead_verdict,
    summary_csv,
    summary_markdown,
    summary_plot,
    write_summary,
)
from invsr_pl.sweeps.results import (
    JOB_RECORD,
    MODES,
    JobResult,
    Lead,
    SweepSummary,
    SweepSummaryError,
    build_summary,
    find_jobs,
    read_job,
    read_logged_history,
    read_logged_metrics,
)

__all__ = [
    "JOB_RECORD",
    "MODES",
    "SUMMARY_FILES",
    "JobResult",
    "Lead",
    "SweepSummary",
    "SweepSummaryCallback",
    "SweepSummaryError",
    "build_summary",
    "find_jobs",
    "lead_verdict",
    "read_job",
    "read_logged_history",
    "read_logged_metrics",
    "summary_csv",
    "summary_markdown",
    "summary_plot",
    "write_summary",
]
