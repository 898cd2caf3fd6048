"""Hydra callback: record each job's outcome and keep the multirun folder's summary up to date."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from invsr_pl.sweeps.report import lead_verdict, write_summary
from invsr_pl.sweeps.results import JOB_RECORD, SweepSummaryError, build_summary, resolve_mode
from invsr_pl.utils.atomic import atomic_write

__all__ = ["SweepSummaryCallback"]

log = logging.getLogger(__name__)


class SweepSummaryCallback(Callback):
    """Hydra callback: records each job's outcome and keeps the multirun folder's summary up to date.

    Args:
        metric: the metric to sort by; None = the jobs' ``optimized_metric``.
        mode: ``"max"`` or ``"min"`` (or Optuna's ``"maximize"`` / ``"minimize"``).
        after_each_job: also rewrite the summary at the end of every job, so a sweep that stops halfway
            (Hydra's basic sweeper raises at the first failed job, before ``on_multirun_end``) still leaves a
            table with the failed job in it.
        enabled: False turns the callback off.
        noise: the validation noise of the metric (e.g. 0.05 dB of PSNR): the summary says whether the best
            job's lead over the runner-up exceeds it; None = estimated from each job's repeated validations.

    A summary that cannot be written is logged with the command that rebuilds it; it never fails a job or a
    sweep. Multiruns whose jobs name no ``optimized_metric`` (e.g. ``evaluate.py -m``) get no summary.
    """

    def __init__(
        self,
        metric: str | None = None,
        mode: str = "max",
        after_each_job: bool = True,
        enabled: bool = True,
        noise: float | None = None,
    ) -> None:
        self.metric = metric or None
        self.noise = None if noise is None else float(noise)
        self.mode = resolve_mode(mode)
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
            summary = build_summary(sweep_dir, self.metric, self.mode, self.noise)
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
                verdict = lead_verdict(summary)
                if verdict:
                    log.info("%s", verdict)
