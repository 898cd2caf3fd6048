"""Callbacks the SLURM test jobs load by ``_target_`` (tests/cluster is on the jobs' PYTHONPATH)."""

from __future__ import annotations

import time

import lightning.pytorch as L


class Pause(L.Callback):
    """Sleep after every training batch: a tiny run lasts long enough to be preempted between its checkpoints.
    Wall time only; the weights, the data order and the checkpoints are those of a run without it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
