"""Callbacks the SLURM and multi-node test jobs load by ``_target_`` (tests/cluster on their PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as L
import torch


class Pause(L.Callback):
    """Sleep after every training batch: a tiny run lasts long enough to be preempted between its checkpoints.
    Wall time only; the weights, the data order and the checkpoints are those of a run without it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class RecordRank(L.Callback):
    """Per rank, after training: ``rank<k>.pt`` in ``folder`` with the images of each training batch, the
    iteration count, the world size and the noise predictor's weights."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.images: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.images.append(int(batch["lq"].shape[0]))

    def on_train_end(self, trainer, pl_module) -> None:
        record = {
            "images": self.images,
            "iteration": int(pl_module.iteration),
            "world": int(trainer.world_size),
            "noise_predictor": {
                k: v.detach().cpu() for k, v in pl_module.noise_predictor.state_dict().items()
            },
        }
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        torch.save(record, Path(self.folder, f"rank{trainer.global_rank}.pt"))


class SigtermRank(L.Callback):
    """Send SIGTERM to this process on global rank ``rank`` after iteration ``at``: a preemption that reaches
    one rank only, or reaches it first."""

    def __init__(self, rank: int, at: int) -> None:
        self.rank, self.at = int(rank), int(at)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and pl_module.iteration == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
