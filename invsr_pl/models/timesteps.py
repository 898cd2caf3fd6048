"""Timestep and sigma conventions: the one place that converts user timesteps, indices and noise levels.

It lives with the models (the backbone, noise predictor and discriminator check indices with
:func:`batch_index`) and the sampler, the training module and the commands import it from here
(docs/conventions.md).

Conventions:

- A *user* timestep ``t`` (200, 100, 50, ...) is the diffusion *index* ``t - 1`` (199, 99, 49, ...).
  Public APIs that say ``timesteps`` take user timesteps (descending); networks (UNet, noise predictor,
  discriminator) take indices as a ``LongTensor (B,)``.
- The noise level of index ``i`` is the Euler/VE sigma ``sigma_i = sqrt((1 - abar_i) / abar_i)``, kept as an
  ascending ``(1000,)`` float32 table so that ``sigmas[i]`` is the sigma of index ``i``.
- VE form: ``z_t = z + sigma * eps``; the UNet sees ``z_t / sqrt(1 + sigma^2)`` (the standard VP sample) and
  ``x0_hat = z_t - sigma * eps_hat``.
- Flow-matching priors (SD3.5, docs/backbones.md) use the same user timesteps: index ``i`` is the flow time
  ``s_i = sigma_i / (1 + sigma_i)`` with the signal-to-noise ratio of SD-Turbo's index ``i``, so the paper's
  ``t <= 250`` and every schedule here keep their meaning on every backbone (:func:`flow_sigmas`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from torch import Tensor

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "SD_TURBO_SCHEDULER_CONFIG",
    "add_noise",
    "batch_index",
    "build_scheduler",
    "default_timesteps",
    "flow_sigmas",
    "lookup_sigma",
    "scale_model_input",
    "sd_turbo_sigmas",
    "sigmas_from_alphas_cumprod",
    "to_index",
    "validate_timesteps",
    "x0_from_eps",
]

NUM_TRAIN_TIMESTEPS = 1000

# docs/conventions.md: stabilityai/sd-turbo's scheduler_config.json, written out so nothing downloads.
SD_TURBO_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "trained_betas": None,
}

# docs/conventions.md: the released inference scripts' step tables for 1-5 steps.
_PAPER_TIMESTEPS: dict[int, list[int]] = {
    1: [200],
    2: [200, 100],
    3: [200, 100, 50],
    4: [200, 150, 100, 50],
    5: [250, 200, 150, 100, 50],
}
# docs/conventions.md: more than 5 steps spread evenly over [250, 0); more than 250 would repeat.
_MAX_TIMESTEP_FOR_MANY_STEPS = 250


def build_scheduler(config: dict[str, Any] | None = None) -> EulerDiscreteScheduler:
    """SD-Turbo's ``EulerDiscreteScheduler`` built from its config dict (no download).

    Args:
        config: scheduler config; ``None`` uses :data:`SD_TURBO_SCHEDULER_CONFIG`.
    """
    return EulerDiscreteScheduler.from_config(dict(SD_TURBO_SCHEDULER_CONFIG if config is None else config))


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """Ascending VE sigma table from the cumulative alpha products (docs/conventions.md).

    Args:
        alphas_cumprod: ``(N,)`` float tensor, ``abar_i`` for index ``i`` (decreasing, in (0, 1]).

    Returns:
        ``(N,)`` float32 tensor on the same device, ``sigma[i] = sqrt((1 - abar_i) / abar_i)``, ascending.
    """
    if alphas_cumprod.ndim != 1:
        raise ValueError(f"alphas_cumprod must be 1-d, got shape {tuple(alphas_cumprod.shape)}")
    a = alphas_cumprod.to(torch.float64)  # float64 so the table is exact to float32 precision
    return ((1.0 - a) / a).sqrt().to(torch.float32)


def sd_turbo_sigmas() -> Tensor:
    """The ``(1000,)`` float32 ascending sigma table of SD-Turbo's scheduler (sigma(200) = 0.569285)."""
    return sigmas_from_alphas_cumprod(build_scheduler().alphas_cumprod)


def flow_sigmas(ve_sigmas: Tensor | None = None) -> Tensor:
    """Flow-matching noise levels with the signal-to-noise ratio of the VE table (docs/backbones.md).

    ``z_s = (1 - s) z + s eps`` has SNR ``((1 - s) / s)^2``, the VE state ``z + sigma eps`` has
    ``1 / sigma^2``; they agree for ``s = sigma / (1 + sigma)`` (and then ``z_s = (1 - s) (z + sigma eps)``).

    Args:
        ve_sigmas: ``(N,)`` ascending VE table; None: SD-Turbo's (:func:`sd_turbo_sigmas`).

    Returns:
        ``(N,)`` float32 ascending flow times in (0, 1) (index 199, the paper's t = 200: 0.3628).
    """
    ve = (sd_turbo_sigmas() if ve_sigmas is None else ve_sigmas).to(torch.float64)
    return (ve / (1.0 + ve)).to(torch.float32)


def validate_timesteps(
    timesteps: int | Sequence[int] | Tensor, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> list[int]:
    """Check a user timestep list and return it as plain ints.

    Args:
        timesteps: user timesteps (e.g. ``[200, 100, 50]``); a single int is a one-step list.
        num_train_timesteps: upper bound (1000 for SD-Turbo).

    Returns:
        ``list[int]``, strictly descending, every value in ``[1, num_train_timesteps]``.

    Raises:
        ValueError: empty list, non-integer values, values out of range, or not strictly descending.
    """
    if isinstance(timesteps, Tensor):
        if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.ndim > 1:
            raise ValueError(
                f"timesteps must be a 0-d/1-d integer tensor, got {timesteps.dtype} {tuple(timesteps.shape)}"
            )
        values: list[Any] = timesteps.reshape(-1).tolist()
    elif isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool):
        values = [timesteps]
    elif isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence | np.ndarray):
        raise ValueError(f"timesteps must be an int or a sequence of ints, got {type(timesteps).__name__}")
    else:
        values = list(timesteps)
    if not values:
        raise ValueError("timesteps must not be empty")
    out: list[int] = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"timesteps must be integers, got {v!r} in {values}")
        v = int(v)
        if not 1 <= v <= num_train_timesteps:
            raise ValueError(
                f"timestep {v} is out of range [1, {num_train_timesteps}] "
                "(user timesteps, e.g. 200 = index 199)"
            )
        out.append(v)
    if any(a <= b for a, b in zip(out, out[1:], strict=False)):
        raise ValueError(f"timesteps must be strictly descending, got {out}")
    return out


def default_timesteps(num_steps: int) -> list[int]:
    """The paper's user timesteps for ``num_steps`` sampling steps (docs/conventions.md).

    1 -> [200], 2 -> [200, 100], 3 -> [200, 100, 50], 4 -> [200, 150, 100, 50], 5 -> [250, 200, 150, 100, 50];
    more than 5 -> ``linspace(250, 0, n, endpoint=False)`` as ints (e.g. 10 -> [250, 225, ..., 25]).

    Raises:
        ValueError: ``num_steps`` < 1 or > 250 (more steps than distinct timesteps below 250).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise ValueError(f"num_steps must be an int, got {num_steps!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps in _PAPER_TIMESTEPS:
        return list(_PAPER_TIMESTEPS[num_steps])
    if num_steps > _MAX_TIMESTEP_FOR_MANY_STEPS:
        raise ValueError(
            f"num_steps must be <= {_MAX_TIMESTEP_FOR_MANY_STEPS} (steps are spread over [250, 0)), "
            f"got {num_steps}; "
            "pass explicit timesteps instead"
        )
    grid = np.linspace(_MAX_TIMESTEP_FOR_MANY_STEPS, 0, num_steps, endpoint=False).astype(np.int64)
    return validate_timesteps([int(t) for t in grid])


def to_index(
    timesteps: int | Sequence[int] | Tensor,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    device: torch.device | str | None = None,
) -> Tensor:
    """User timesteps -> diffusion indices (``t - 1``), validated to ``1 <= t <= num_train_timesteps``.

    Unlike :func:`validate_timesteps` no ordering is required (a batch may repeat a timestep).

    Args:
        timesteps: an int (-> 0-d tensor), a sequence of ints (-> ``(N,)``) or an integer tensor (same shape).
        num_train_timesteps: upper bound of user timesteps.
        device: device of the result (default: the input tensor's device, else CPU).

    Returns:
        int64 tensor of indices in ``[0, num_train_timesteps - 1]``.
    """
    if isinstance(timesteps, Tensor):
        if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise ValueError(f"timesteps must be an integer tensor, got {timesteps.dtype}")
        t = timesteps.to(device=device if device is not None else timesteps.device, dtype=torch.long)
    elif isinstance(timesteps, (int, np.integer)) and not isinstance(timesteps, bool):
        t = torch.tensor(int(timesteps), dtype=torch.long, device=device)
    else:
        values = list(timesteps)
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
            raise ValueError(f"timesteps must be integers, got {values}")
        t = torch.tensor([int(v) for v in values], dtype=torch.long, device=device)
    if t.numel() and (int(t.min()) < 1 or int(t.max()) > num_train_timesteps):
        raise ValueError(
            f"user timesteps must be in [1, {num_train_timesteps}] (200 means index 199), got {t.tolist()}"
        )
    return t - 1


def batch_index(index: int | Tensor, batch: int, device: torch.device | str | None = None) -> Tensor:
    """The diffusion-index argument of every network, checked and broadcast to the batch.

    Only dtype and shape are checked, not values: a range check would synchronise the GPU on every call
    (:func:`lookup_sigma` checks the range where sigmas are looked up).

    Args:
        index: diffusion index (user timestep - 1): an int, or an integer tensor of shape ``()``, ``(1,)`` or
            ``(batch,)``.
        batch: batch size B.
        device: device of the result (default: the tensor's device, else CPU).

    Returns:
        ``(B,)`` int64 tensor (an expanded view for a single index).

    Raises:
        ValueError: float/bool/complex index, or a shape other than ``()``, ``(1,)``, ``(B,)``.
    """
    if isinstance(index, (bool, float)):
        raise ValueError(f"index must be an int or an integer tensor, got {index!r}")
    idx = torch.as_tensor(index, device=device)
    if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
        raise ValueError(f"index must be an int or an integer tensor, got dtype {idx.dtype}")
    if idx.ndim > 1 or (idx.ndim == 1 and idx.shape[0] not in (1, batch)):
        raise ValueError(
            f"index must be an int or an integer tensor of shape () / (1,) / ({batch},), "
            f"got shape {tuple(idx.shape)}"
        )
    return idx.to(torch.long).reshape(-1).expand(batch)


def lookup_sigma(sigmas: Tensor, index: Tensor | int) -> Tensor:
    """``sigmas[index]`` as float32 on the index's device.

    Args:
        sigmas: ``(N,)`` ascending sigma table (see :func:`sigmas_from_alphas_cumprod`).
        index: int or int64 tensor of diffusion indices (any shape).

    Returns:
        float32 tensor with the shape of ``index``.
    """
    idx = torch.as_tensor(index, dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= sigmas.shape[0]):
        raise ValueError(f"diffusion index out of range [0, {sigmas.shape[0] - 1}]: {idx.tolist()}")
    return sigmas.to(device=idx.device, dtype=torch.float32)[idx]


def _per_sample(sigma: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or ``(B,)`` sigma against a ``(B, C, H, W)`` tensor, in ``like``'s dtype/device."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.ndim == 1:
        if s.shape[0] not in (1, like.shape[0]):
            raise ValueError(f"sigma has {s.shape[0]} entries but the batch has {like.shape[0]}")
        s = s.reshape(-1, *([1] * (like.ndim - 1)))
    elif s.ndim != 0:
        raise ValueError(f"sigma must be a scalar or (B,), got shape {tuple(s.shape)}")
    return s


def scale_model_input(z: Tensor, sigma: Tensor | float) -> Tensor:
    """VE state -> UNet input: ``z / sqrt(sigma^2 + 1)`` (docs/conventions.md, docs/sampling.md).

    Args:
        z: ``(B, C, H, W)`` VE state ``z_t``.
        sigma: scalar or ``(B,)`` noise level per sample.
    """
    s = _per_sample(sigma, z)
    return z / (s * s + 1.0).sqrt()


def add_noise(z0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """VE forward process: ``z_t = z0 + sigma * noise`` (docs/conventions.md, docs/sampling.md).

    Args:
        z0: ``(B, C, H, W)`` clean scaled latent.
        noise: ``(B, C, H, W)`` noise (N(0, I) or the noise predictor's sample).
        sigma: scalar or ``(B,)``.
    """
    return z0 + _per_sample(sigma, z0) * noise


def x0_from_eps(z_t: Tensor, eps: Tensor, sigma: Tensor | float) -> Tensor:
    """Predicted clean latent ``x0_hat = z_t - sigma * eps_hat`` (docs/conventions.md)."""
    return z_t - _per_sample(sigma, z_t) * eps
