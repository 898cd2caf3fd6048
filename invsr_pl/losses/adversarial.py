"""Hinge GAN losses for InvSR's multi-head latent discriminator (docs/training.md#losses).

Sign convention: the discriminator outputs *logits*, larger meaning "more real". The discriminator minimises
``hinge_d_loss`` (pushes real logits above +1 and fake logits below -1); the generator minimises
``generator_adv_loss`` = -mean(fake logits), i.e. it pushes its fakes' logits up. Both return one value per
sample, (B,) float32: the caller takes the batch mean and applies the loss weight (0.1 for G,
docs/training.md#losses).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LATENT_BOUND", "clamp_fake", "generator_adv_loss", "hinge_d_loss"]

# docs/training.md#losses (the official `_Latent_bound`): generated latents are clamped to [-10, 10] before
# the discriminator sees them, in both the G and the D step. Real latents (GT posterior samples * 0.18215) are
# not clamped.
LATENT_BOUND = 10.0


def clamp_fake(latent: Tensor) -> Tensor:
    """Clamp a generated latent to [-LATENT_BOUND, LATENT_BOUND] before it is scored by the discriminator.

    Args:
        latent: (B, 4, h, w) float predicted clean latent z0_hat (scaled SD latent space). The clamp passes
            gradient 1 strictly inside the bound and blocks it outside. Detach the result yourself for the
            discriminator step.

    Returns:
        Tensor of the same shape and dtype, values in [-10, 10].
    """
    return latent.clamp(-LATENT_BOUND, LATENT_BOUND)


def _per_sample_mean(logits: Tensor) -> Tensor:
    """(B, 1, h, w) logit map -> (B,) float32 mean over all non-batch positions."""
    return logits.float().flatten(1).mean(dim=1)


def _check_heads(logits: Sequence[Tensor], name: str) -> None:
    if len(logits) == 0:
        raise ValueError(f"{name} must hold at least one logit map")
    batch = logits[0].shape[0]
    for i, x in enumerate(logits):
        if x.ndim < 2 or x.shape[0] != batch:
            raise ValueError(
                f"{name}[{i}] must be a (B, ...) logit map with B={batch}, got shape {tuple(x.shape)}"
            )


def hinge_d_loss(real_logits: Sequence[Tensor], fake_logits: Sequence[Tensor]) -> Tensor:
    """Discriminator hinge loss, per sample, averaged over heads (docs/training.md#losses).

    For each head k: 0.5 * (relu(1 - D_k(real)) + relu(1 + D_k(fake))), averaged over spatial positions; then
    the mean over heads. It is zero once every real logit is >= 1 and every fake logit is <= -1.

    Args:
        real_logits: list of (B, 1, h_k, w_k) discriminator logit maps for real latents (any float dtype).
        fake_logits: the same heads, in the same order, for (clamped, detached) fake latents; same shapes.

    Returns:
        (B,) float32, >= 0.
    """
    _check_heads(real_logits, "real_logits")
    _check_heads(fake_logits, "fake_logits")
    if len(real_logits) != len(fake_logits):
        raise ValueError(f"got {len(real_logits)} real heads but {len(fake_logits)} fake heads")
    per_head = []
    for k, (real, fake) in enumerate(zip(real_logits, fake_logits, strict=True)):
        if real.shape != fake.shape:
            raise ValueError(f"head {k}: real {tuple(real.shape)} and fake {tuple(fake.shape)} shapes differ")
        loss = 0.5 * (F.relu(1.0 - real.float()) + F.relu(1.0 + fake.float()))
        per_head.append(_per_sample_mean(loss))
    return torch.stack(per_head).mean(dim=0)


def generator_adv_loss(fake_logits: Sequence[Tensor]) -> Tensor:
    """Generator hinge loss, per sample: -mean over positions of each head's fake logits, averaged over heads.

    Minimising it raises the discriminator's logits on the generated latents. Unweighted: the paper's weight
    0.1 is applied by the caller (docs/training.md#losses, docs/training.md#the-training-step).

    Args:
        fake_logits: list of (B, 1, h_k, w_k) logit maps for clamped fake latents (gradient flows through D
            into the generator; D itself is frozen for this step).

    Returns:
        (B,) float32, unbounded (negative when D believes the fakes).
    """
    _check_heads(fake_logits, "fake_logits")
    return torch.stack([-_per_sample_mean(fake) for fake in fake_logits]).mean(dim=0)
