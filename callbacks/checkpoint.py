"""Writing training checkpoints: when (every N InvSR iterations, and on SIGTERM) and how (atomically).

- :class:`IterationCheckpoint`: Lightning's ``ModelCheckpoint`` with the cadence in InvSR *iterations*
  (``pl_module.iteration``): ``trainer.global_step`` counts generator and discriminator steps, so
  ``every_n_train_steps`` would mean "every N/2 iterations" while D trains and "every N" when it does not
  (docs/lightning.md). On SIGTERM (preemption; outside SLURM, or with SLURM's requeue as well) it saves a
  resumable ``last.ckpt`` before Lightning stops the run; ``train.py`` then exits with code 143. The ranks
  agree on the stop at the end of an iteration, whichever of them got the signal (docs/slurm.md).
- :class:`AtomicCheckpointIO`: every ``trainer.save_checkpoint`` writes a temporary file in the target folder,
  fsyncs it and renames it into place (:mod:`invsr_pl.utils.atomic`). Lightning's own writer stages the file
  in ``TMPDIR`` and *copies* it across when that is another file system (e.g. tmpfs), so a kill during the
  copy left a truncated ``last.ckpt`` that ``ckpt_path=last`` then picked (docs/checkpoints.md).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from invsr_pl.utils.atomic import atomic_write

__all__ = ["AtomicCheckpointIO", "IterationCheckpoint"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic on the target file system (remote URLs: Lightning's
    own writer)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path) as f:
            torch.save(checkpoint, f)


class IterationCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` counting InvSR iterations, saving ``last.ckpt`` on SIGTERM.

    Args:
        every_n_iterations: save after every N-th iteration (``pl_module.iteration``, one G step plus its D
            step); None disables the iteration cadence.
        **kwargs: ``ModelCheckpoint`` arguments. ``every_n_train_steps`` (global steps, G + D) is still
            honoured for old configs: when given, it replaces ``every_n_iterations`` (with a warning).
            The filename may use ``{iteration}``, e.g. ``iter_{iteration:08d}``.
    """

    def __init__(self, every_n_iterations: int | None = None, **kwargs: Any) -> None:
        if every_n_iterations is not None and every_n_iterations < 1:
            raise ValueError(f"every_n_iterations must be >= 1 or null, got {every_n_iterations}")
        if kwargs.get("every_n_train_steps") and every_n_iterations is not None:
            rank_zero_warn(
                f"model_checkpoint.every_n_train_steps={kwargs['every_n_train_steps']} counts generator and "
                f"discriminator steps; it replaces every_n_iterations={every_n_iterations}. Set "
                "callbacks.model_checkpoint.every_n_iterations instead (and every_n_train_steps=null)."
            )
            every_n_iterations = None
        if every_n_iterations is not None:
            # without an explicit trigger ModelCheckpoint would also save after every validation epoch
            kwargs.setdefault("every_n_epochs", 0)
            kwargs["every_n_train_steps"] = 0
        super().__init__(**kwargs)
        self.every_n_iterations = every_n_iterations
        self._last_iteration_saved = -1
        self.sigterm_checkpoint: str | None = None  # path written on SIGTERM, for train.py's message
        self._sigterm_pending = False  # this rank got SIGTERM; the ranks agree at the end of the iteration

    @staticmethod
    def _iteration(trainer: L.Trainer) -> int:
        module = trainer.lightning_module
        return int(getattr(module, "iteration", trainer.global_step))

    def _monitor_candidates(self, trainer: L.Trainer) -> dict[str, Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["iteration"] = torch.tensor(self._iteration(trainer))
        return candidates

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Replace Lightning's SIGTERM handler (installed at fit start, restored by Lightning at its end).

        Lightning's handler sets the stop flag of its own rank and broadcasts from inside the handler, i.e.
        wherever the main thread is, possibly inside another collective; a rank that stops at the end of an
        iteration its peers do not stop at leaves them waiting forever. Under SLURM or torchrun every rank
        gets the signal, but not at the same point of the step. This handler only notes the signal; the
        ranks agree in :meth:`on_train_batch_end`.
        """
        self._sigterm_pending = False
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; Lightning's stays

        def note_sigterm(signum: int, frame: FrameType | None) -> None:
            launcher = trainer.strategy.launcher
            if not self._sigterm_pending and launcher is not None:
                launcher.kill(signum)  # ranks this process started (Lightning's DDP launcher) get it too
            self._sigterm_pending = True

        signal.signal(signal.SIGTERM, note_sigterm)

    def _stop_agreed(self, trainer: L.Trainer) -> bool:
        """True on every rank when any rank got SIGTERM (one boolean all-reduce per iteration)."""
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(self._sigterm_pending, all=False))
        return self._sigterm_pending

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stop_agreed(trainer):
            # Lightning raises SIGTERMException at the end of this batch on every rank (on_exception saves)
            trainer._signal_connector.received_sigterm = True
        if self.every_n_iterations is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        iteration = self._iteration(trainer)
        if iteration < 1 or iteration % self.every_n_iterations or iteration == self._last_iteration_saved:
            return
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_iteration_saved = iteration

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """SIGTERM (preemption, ``kill``, ``scancel``): save ``last.ckpt`` so ``ckpt_path=last`` resumes here.

        Lightning raises ``SIGTERMException`` at the end of the training batch (or validation batch) after
        the signal, so the state is that of a finished iteration; the EMA callback has already put the
        training weights back (checkpoint callbacks run last).
        """
        if not isinstance(exception, SIGTERMException) or self.dirpath is None:
            return
        path = self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(path, weights_only=False)  # resumable: optimisers, loops, callbacks
        self.sigterm_checkpoint = str(path)
        self.last_model_path = str(path)
        rank_zero_info(f"SIGTERM: saved {path} at iteration {self._iteration(trainer)}")

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key, so runs checkpointed by a plain ModelCheckpoint resume into this class
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_iteration_saved": self._last_iteration_saved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._last_iteration_saved = int(state_dict.get("last_iteration_saved", -1))
