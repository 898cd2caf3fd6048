"""Exponential moving average of the noise predictor only (docs/training.md, EMA).

Lightning's ``EMAWeightAveraging`` deep-copies the whole LightningModule (frozen SD-Turbo and discriminator
included). InvSR averages only the trained generator, so this callback keeps a flat copy of
``pl_module.noise_predictor``'s state dict and nothing else.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor, nn

from invsr_pl.utils.checkpoint import EMA_KEY, load_checkpoint

EMA_CHECKPOINT_KEY = EMA_KEY  # top-level checkpoint key (the format lives in invsr_pl.utils.checkpoint)


class NoisePredictorEMA(L.Callback):
    """Keeps an EMA of the noise predictor, evaluates with it, and checkpoints it.

    * Update after every training batch (one batch = one InvSR iteration in manual optimisation) on *every*
      rank, so DDP ranks, whose weights are identical, keep identical EMAs. Floating-point parameters that
      require grad are averaged: ``ema <- ema - (1 - d_k) * (ema - theta)`` with
      ``d_k = min(decay, (1 + k) / (10 + k))`` for the k-th update, k = 1, 2, ... (docs/training.md).
      Frozen parameters and buffers are copied.
    * For validation and test the EMA weights are copied *in place* into the live module (so any sampler that
      references it sees them) and the training weights are put back afterwards.
    * Checkpoints hold ``checkpoint["ema_noise_predictor"]`` (the EMA state dict, keys as in
      ``NoisePredictor.state_dict()``) plus the update count in the callback state; resume restores both.

    Args:
        decay: upper bound of the decay (0.999 in the paper).
        use_warmup: apply the ``(1 + k) / (10 + k)`` warm-up; if False the decay is constant.
        attribute: name of the averaged sub-module on the LightningModule.
        evaluate_with_ema: swap the EMA weights in for validation and test.
    """

    def __init__(
        self,
        decay: float = 0.999,
        use_warmup: bool = True,
        attribute: str = "noise_predictor",
        evaluate_with_ema: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.use_warmup = use_warmup
        self.attribute = attribute
        self.evaluate_with_ema = evaluate_with_ema
        self.num_updates = 0
        self.ema: dict[str, Tensor] | None = None
        self._pending: dict[str, Tensor] | None = None  # loaded from a checkpoint before the module was ready
        self._backup: dict[str, Tensor] | None = None  # training weights while the EMA is swapped in

    # ------------------------------------------------------------------ maths
    def decay_at(self, k: int) -> float:
        """Decay used for the k-th update (k >= 1)."""
        if not self.use_warmup:
            return self.decay
        return min(self.decay, (1.0 + k) / (10.0 + k))

    def _module(self, pl_module: L.LightningModule) -> nn.Module:
        module = getattr(pl_module, self.attribute, None)
        if not isinstance(module, nn.Module):
            raise AttributeError(f"NoisePredictorEMA needs an nn.Module at pl_module.{self.attribute}")
        return module

    def _ensure_initialised(self, pl_module: L.LightningModule) -> None:
        module = self._module(pl_module)
        current = module.state_dict()
        if self.ema is None:
            source = self._pending if self._pending is not None else current
            self.ema = {k: source[k].detach().clone().to(current[k].device) for k in current}
        elif self._pending is not None:
            for k, v in self.ema.items():
                v.copy_(self._pending[k])
        else:
            # follow the module across devices (strategy.setup moves it after on_load_checkpoint)
            for k, v in self.ema.items():
                if v.device != current[k].device:
                    self.ema[k] = v.to(current[k].device)
        self._pending = None

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step towards ``module``'s current weights."""
        assert self.ema is not None
        self.num_updates += 1
        decay = self.decay_at(self.num_updates)
        for name, param in module.named_parameters():
            if param.requires_grad and param.is_floating_point():
                self.ema[name].lerp_(param.detach().to(self.ema[name].dtype), 1.0 - decay)
            else:
                self.ema[name].copy_(param.detach())
        for name, buf in module.named_buffers():
            if name in self.ema:
                self.ema[name].copy_(buf)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure_initialised(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._ensure_initialised(pl_module)
        self.update(self._module(pl_module))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._load_for_evaluation(trainer)
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._load_for_evaluation(trainer)
        self._swap_in(pl_module)

    def _load_for_evaluation(self, trainer: L.Trainer | None) -> None:
        """``trainer.validate/test(ckpt_path=...)`` restores no callback state: read the EMA from the file."""
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        if self.ema is not None or self._pending is not None or not path or trainer.state.fn == "fit":
            return
        checkpoint = load_checkpoint(path)  # tensors-only unpickling; unreadable files: one-line error
        if EMA_CHECKPOINT_KEY in checkpoint:
            self._pending = dict(checkpoint[EMA_CHECKPOINT_KEY])

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # e.g. SIGTERM during validation: put the training weights back before any checkpoint callback
        # (Lightning runs checkpoint callbacks last) saves the module
        self._swap_out(pl_module)

    @torch.no_grad()
    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if not self.evaluate_with_ema or self._backup is not None:
            return
        if self.ema is None and self._pending is None:
            return  # nothing averaged yet (e.g. trainer.validate on a fresh module)
        self._ensure_initialised(pl_module)
        assert self.ema is not None
        module = self._module(pl_module)
        state = module.state_dict()
        self._backup = {k: v.detach().clone() for k, v in state.items()}
        for k, v in state.items():
            v.copy_(self.ema[k])

    @torch.no_grad()
    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._backup is None:
            return
        for k, v in self._module(pl_module).state_dict().items():
            v.copy_(self._backup[k])
        self._backup = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        # the (large) EMA tensors go to checkpoint["ema_noise_predictor"] in on_save_checkpoint, not here
        return {"num_updates": self.num_updates, "decay": self.decay, "use_warmup": self.use_warmup}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict["num_updates"])

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        ema = self.ema if self.ema is not None else self._pending
        if ema is not None:
            checkpoint[EMA_CHECKPOINT_KEY] = {k: v.detach().cpu().clone() for k, v in ema.items()}

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        ema = checkpoint.get(EMA_CHECKPOINT_KEY)
        if ema is None:
            return  # e.g. fine-tuning from a checkpoint written without this callback: start a fresh EMA
        self._pending = {k: v.detach().clone() for k, v in ema.items()}
        if self.ema is not None:
            self._ensure_initialised(pl_module)
