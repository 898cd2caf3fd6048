"""FrozenBackbone: the one interface between InvSR and a frozen one-step prior (docs/backbones.md).

The training system, the sampler, the pipeline, the SR command, the demo and evaluation use a prior only
through this interface, so a new prior is one subclass:

- geometry: :attr:`latent_channels`, :attr:`vae_scale_factor` (image -> latent), :attr:`latent_multiple`
  (the latent size the denoiser needs a multiple of);
- :meth:`encode` / :meth:`decode`: image in [0, 1] <-> the backbone's normalised latent;
- :meth:`sigma`: the noise level of a diffusion index (user timestep - 1, docs/conventions.md);
- :meth:`start_state`: the LR latent moved onto the trajectory by a predicted noise (the paper's inversion);
- :meth:`denoise`: one denoiser call, ``(x0_hat, direction)``; :meth:`renoise`: the state of the same
  deterministic trajectory at another index (``x0_hat + sigma * direction`` for both parameterisations
  here); a sampler step is ``denoise(renoise(x0_hat, direction, next))``;
- the cached prompt conditioning: :attr:`prompt_embeds` ``(1, L, D)`` (also what the latent discriminator
  attends to) and, where the prior has one, ``pooled_prompt_embeds``.

Subclasses: ``FrozenSDTurbo`` and ``FrozenSDXLTurbo`` (variance-exploding epsilon form,
``models/sd_turbo.py``, ``models/sdxl_turbo.py``), ``FrozenSD35Turbo`` (rectified flow,
``models/sd35_turbo.py``). Weights are frozen, always in eval mode and cast in the constructor, before
Lightning/DDP can wrap anything (docs/lightning.md).
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from invsr_pl.models.timesteps import batch_index, lookup_sigma

__all__ = ["DTYPES", "FrozenBackbone", "resolve_dtype", "seeded"]

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """Weight dtype from a config string.

    Args:
        dtype: ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"fp32"``/``"float32"``, ``"fp16"``/``"float16"``,
            ``"bf16"``/``"bfloat16"``, or a ``torch.dtype``.
        device: target device for ``"auto"``; ``None`` means CUDA when available (Lightning moves it there).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported backbone dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    key = str(dtype).lower()
    if key == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.float16 if on_cuda else torch.float32  # docs/conventions.md: fp16 weights on GPU
    if key not in DTYPES:
        raise ValueError(f"unknown backbone dtype {dtype!r}; use one of 'auto', {sorted(DTYPES)}")
    return DTYPES[key]


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed random initialisation without touching the caller's global RNG (``None``: no seeding); how every
    random twin (``models/tiny.py``, the full-size random architectures) draws its weights."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FrozenBackbone(nn.Module):
    """A frozen VAE + denoiser with a fixed prompt conditioning (see the module docstring for the protocol).

    Args:
        denoiser: the frozen denoising network, kept under its diffusers name :attr:`denoiser_name`.
        vae: ``AutoencoderKL`` with ``config.scaling_factor`` (and ``shift_factor`` where the prior has one).
        scheduler: the prior's diffusers scheduler; kept for its config (and saved by the pipeline).
        sigmas: ``(N,)`` float32 noise level per diffusion index, ascending.
        prompt_embeds: ``(1, L, D)`` cached prompt embedding.
        dtype: weight dtype (see :func:`resolve_dtype`); ``None`` keeps the denoiser's current dtype.
        pooled_prompt_embeds: ``(1, P)`` pooled prompt embedding of priors that take one, else None.
        execution_device: where the inputs go when the weights are moved by offload hooks (the pipeline's
            execution device); None: the weights' device.
    """

    denoiser_name = "unet"  # the attribute (and pipeline component) holding the denoiser: unet / transformer
    # keep the VAE in float32 when the weights are float16 (SDXL's VAE overflows in fp16, docs/backbones.md)
    vae_fp16_overflows = False

    def __init__(
        self,
        denoiser: nn.Module,
        vae: nn.Module,
        scheduler: Any,
        sigmas: Tensor,
        prompt_embeds: Tensor,
        dtype: str | torch.dtype | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        execution_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        weight_dtype = next(denoiser.parameters()).dtype if dtype is None else resolve_dtype(dtype)
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1:
            raise ValueError(f"prompt_embeds must be (1, tokens, dim), got {tuple(prompt_embeds.shape)}")
        if pooled_prompt_embeds is not None and (
            pooled_prompt_embeds.ndim != 2 or pooled_prompt_embeds.shape[0] != 1
        ):
            raise ValueError(
                f"pooled_prompt_embeds must be (1, dim), got {tuple(pooled_prompt_embeds.shape)}"
            )
        setattr(self, self.denoiser_name, denoiser)
        self.vae = vae
        self.scheduler = scheduler
        self._execution_device = execution_device
        # Freeze, eval and cast before anything can wrap the modules (docs/lightning.md).
        self.requires_grad_(False)
        vae_dtype = (
            torch.float32 if self.vae_fp16_overflows and weight_dtype == torch.float16 else weight_dtype
        )
        for part, part_dtype in ((self.denoiser, weight_dtype), (self.vae, vae_dtype)):
            if any(p.dtype != part_dtype for p in part.parameters()):
                part.to(part_dtype)
        super().train(False)
        # Derived data, not weights: kept out of checkpoints (persistent=False) but moved with .to(device).
        self.register_buffer("sigmas", sigmas.float(), persistent=False)
        self.register_buffer("prompt_embeds", prompt_embeds.detach().to(weight_dtype), persistent=False)
        pooled = None if pooled_prompt_embeds is None else pooled_prompt_embeds.detach().to(weight_dtype)
        self.register_buffer("pooled_prompt_embeds", pooled, persistent=False)
        if execution_device is not None:  # the buffers only: moving the module would un-offload the weights
            self.sigmas = self.sigmas.to(execution_device)
            self.prompt_embeds = self.prompt_embeds.to(execution_device)
            if pooled is not None:
                self.pooled_prompt_embeds = self.pooled_prompt_embeds.to(execution_device)

    # ---------------------------------------------------------------- geometry and properties

    @property
    def denoiser(self) -> nn.Module:
        """The frozen denoising network (the UNet or the transformer)."""
        return getattr(self, self.denoiser_name)

    @property
    @abstractmethod
    def latent_multiple(self) -> int:
        """Latent height/width must be a multiple of this for the denoiser (UNet downsampling, patch size)."""

    @property
    def dtype(self) -> torch.dtype:
        """Weight dtype of the denoiser."""
        return next(self.denoiser.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the execution device when set, else the denoiser's weights' device."""
        if self._execution_device is not None:
            return self._execution_device
        return next(self.denoiser.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        """Spatial factor image -> latent (8 for every prior here)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float | None:
        """The VAE's latent shift (SD3), or None (SD, SDXL)."""
        shift = getattr(self.vae.config, "shift_factor", None)
        return None if shift is None else float(shift)

    @property
    def cross_attention_dim(self) -> int:
        """Width D of :attr:`prompt_embeds` (the latent discriminator's ``cross_attention_dim``)."""
        return int(self.prompt_embeds.shape[-1])

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    def check_geometry(
        self, latent_channels: int | None, cross_attention_dim: int | None, source: str
    ) -> FrozenBackbone:
        """Refuse a loaded prior whose geometry is not what the config built the trainable parts for
        (``model.backbone.latent_channels`` / ``cross_attention_dim``, read by the noise predictor,
        discriminator and latent LPIPS configs); None checks nothing. Returns ``self``."""
        for key, expected, actual in (
            ("latent_channels", latent_channels, self.latent_channels),
            ("cross_attention_dim", cross_attention_dim, self.cross_attention_dim),
        ):
            if expected is not None and int(expected) != actual:
                raise ValueError(
                    f"{source} is a {type(self).__name__} with {key}={actual}, but the config expects "
                    f"{expected} (model.backbone.{key}): is model.backbone.model the prior this backbone "
                    "config is for?"
                )
        return self

    # ---------------------------------------------------------------- modes

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Always eval: the prior is frozen; Lightning's ``model.train()`` must not switch dropout on."""
        return super().train(False)

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the denoiser's blocks; gradients still flow *through* it into the noise predictor."""
        self.denoiser.enable_gradient_checkpointing()

    # ---------------------------------------------------------------- VAE

    def sigma(self, index: Tensor | int) -> Tensor:
        """``(B,)`` float32 noise level per diffusion index, on the index's device (conventions.md)."""
        return lookup_sigma(self.sigmas, index)

    def _check_image(self, image: Tensor) -> None:
        f = self.vae_scale_factor
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W) in [0, 1], got {tuple(image.shape)}")
        if image.shape[-2] % f or image.shape[-1] % f:
            raise ValueError(f"image size {tuple(image.shape[-2:])} must be a multiple of {f} (VAE factor)")

    def _check_latent(self, latent: Tensor, name: str = "latent") -> None:
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"{name} must be (B, {self.latent_channels}, h, w), got {tuple(latent.shape)}")

    def encode(
        self,
        image: Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Image -> normalised latent ``(z - shift_factor) * scaling_factor`` (no shift where there is none).

        Args:
            image: ``(B, 3, H, W)`` float in [0, 1]; H, W multiples of :attr:`vae_scale_factor`.
            generator: for the posterior sample (determinism); ``None`` uses the global RNG.
            sample: posterior *sample* (default, as the official code, docs/deviations.md) or its mean.
            noise: ``(B, C, H/8, W/8)`` standard normal draw for the posterior sample, used instead of drawing
                one from ``generator`` (the sampler draws it itself so padded rows draw nothing).

        Returns:
            ``(B, latent_channels, H/8, W/8)`` float32 latent.
        """
        self._check_image(image)
        x = image.to(device=self.device, dtype=self.vae_dtype) * 2.0 - 1.0  # VAE works in [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        mean = posterior.mean.float()
        if sample:
            if noise is None:
                # Draw in fp32 so the sample does not depend on the weight dtype's noise resolution.
                noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            elif noise.shape != mean.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(mean.shape)}")
            latent = mean + posterior.std.float() * noise.float()
        else:
            latent = mean
        if self.shift_factor is not None:
            latent = latent - self.shift_factor
        return latent * self.scaling_factor

    def decode(self, latent: Tensor) -> Tensor:
        """Normalised latent ``(B, C, h, w)`` -> image ``(B, 3, 8h, 8w)`` float32 in [0, 1] (clamped)."""
        self._check_latent(latent)
        z = latent.float() / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        x = self.vae.decode(z.to(device=self.device, dtype=self.vae_dtype), return_dict=False)[0]
        return (x.float() / 2.0 + 0.5).clamp(0.0, 1.0)  # docs/sampling.md

    # ---------------------------------------------------------------- the trajectory

    @abstractmethod
    def start_state(self, z_lq: Tensor, noise: Tensor, index: Tensor | int) -> Tensor:
        """The paper's start state: ``z_lq`` moved to the noise level of ``index`` by ``noise``.

        Args:
            z_lq: ``(B, C, h, w)`` latent of the bicubic-upsampled LR image.
            noise: ``(B, C, h, w)`` start noise (the noise predictor's sample, or N(0, I)).
            index: diffusion index: int or an integer tensor of shape (), (1,) or (B,).

        Returns:
            ``(B, C, h, w)`` float32 state.
        """

    @abstractmethod
    def denoise(self, z_t: Tensor, index: Tensor | int) -> tuple[Tensor, Tensor]:
        """One denoiser call on the state ``z_t`` at ``index``: ``(x0_hat, direction)``, both float32
        ``(B, C, h, w)`` and differentiable w.r.t. ``z_t`` (weights are frozen); ``direction`` is what
        :meth:`renoise` continues with (the predicted noise, or the velocity)."""

    @abstractmethod
    def renoise(self, x0: Tensor, direction: Tensor, index: Tensor | int) -> Tensor:
        """The state at ``index`` on the deterministic trajectory through ``x0`` (the next Euler step)."""

    def invert_step(self, z_lq: Tensor, noise: Tensor, index: Tensor | int) -> tuple[Tensor, Tensor]:
        """The paper's one-step inversion (Sec. 3, Algorithm 1): :meth:`start_state`, then :meth:`denoise`.

        Used by training (every iteration) and by the sampler (its first step); differentiable w.r.t.
        ``noise``. Returns ``(x0_hat, direction)`` as :meth:`denoise`.
        """
        idx = batch_index(index, z_lq.shape[0], z_lq.device)
        return self.denoise(self.start_state(z_lq, noise, idx), idx)

    def _prompt_batch(self, z_t: Tensor) -> Tensor:
        """``(B, L, D)`` :attr:`prompt_embeds` for a batch like ``z_t`` (an expanded view, no copy)."""
        return self.prompt_embeds.to(z_t.device).expand(z_t.shape[0], -1, -1)

    def _pooled_batch(self, z_t: Tensor) -> Tensor:
        """``(B, P)`` ``pooled_prompt_embeds`` for a batch like ``z_t``."""
        if self.pooled_prompt_embeds is None:
            raise ValueError(f"{type(self).__name__} has no pooled prompt embedding")
        return self.pooled_prompt_embeds.to(z_t.device).expand(z_t.shape[0], -1)
