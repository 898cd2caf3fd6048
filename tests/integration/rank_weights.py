"""A callback for DDP tests: every rank saves its trainable weights, so a test can compare the ranks.

Importable by name (``rank_weights.DumpRankWeights``) from processes that a test starts, with this folder on
``PYTHONPATH``, as well as from the tests themselves.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch

from callbacks.ema import NoisePredictorEMA


class DumpRankWeights(L.Callback):
    """Each rank saves its noise predictor, discriminator and EMA weights after training, with its rank and
    the world size, as ``<folder>/rank<global rank>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = next(c for c in trainer.callbacks if isinstance(c, NoisePredictorEMA))
        state = {
            "np": pl_module.noise_predictor.state_dict(),
            "d": pl_module.discriminator.state_dict(),
            "ema": ema.ema,
            "iteration": pl_module.iteration,
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
        }
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")
