"""A progress bar in InvSR iterations: ``Iteration 1234/100000`` with rate and ETA (docs/training.md).

Lightning's bar counts batches per epoch (``Epoch 9/-2`` when ``max_epochs=-1`` and the run ends on
``model.max_iterations``). Training length is counted in iterations (one G step + its D step), so this bar
shows ``pl_module.iteration`` out of ``pl_module.hparams.max_iterations`` as one task for the whole run (its
rate and remaining time survive epoch boundaries), starting from the resumed iteration after ``ckpt_path``.
Without ``max_iterations`` it falls back to Lightning's per-epoch bar.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["IterationProgressBar"]


def _max_iterations(pl_module: L.LightningModule | None) -> int | None:
    hparams = getattr(pl_module, "hparams", None) or {}
    value = hparams.get("max_iterations") if hasattr(hparams, "get") else None
    return int(value) if value else None


class IterationProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training task is ``Iteration k/max_iterations`` (elapsed, ETA, it/s).

    Arguments are ``RichProgressBar``'s (``refresh_rate``, ``leave``, ``theme``, ``console_kwargs``).
    """

    @property
    def total_train_batches(self) -> int | float:
        total = _max_iterations(self._trainer.lightning_module if self._trainer is not None else None)
        return total if total is not None else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self._trainer is None or _max_iterations(self.trainer.lightning_module) is None:
            return super()._get_train_description(current_epoch)
        return f"{'Iteration':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = _max_iterations(pl_module)
        if total is None:
            super().on_train_epoch_start(trainer, pl_module)
            return
        if self.is_disabled:
            return
        if self.progress is not None and self.train_progress_bar_id is not None and not self._leave:
            self.refresh()  # one task for the whole run: keep its rate and ETA across epochs
            return
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:
            # a resumed run starts at its iteration, without counting the jump as speed
            self.progress.reset(self.train_progress_bar_id, total=total, completed=self._iteration(pl_module))
            self.refresh()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        total = _max_iterations(pl_module)
        if total is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.progress is not None and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch: start at the resumed iteration
            done = max(self._iteration(pl_module) - 1, 0)
            self.progress.reset(self.train_progress_bar_id, total=total, completed=done)
        self._update(self.train_progress_bar_id, self._iteration(pl_module))
        self._update_metrics(trainer, pl_module)
        self.refresh()

    @staticmethod
    def _iteration(pl_module: L.LightningModule) -> int:
        return int(getattr(pl_module, "iteration", pl_module.global_step))
