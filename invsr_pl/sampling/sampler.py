"""InvSRSampler: LR image -> SR image by diffusion inversion in any number of steps (docs/sampling.md).

The one inference path of the project: the SR command, evaluation and the LightningModule's validation all
call it. Algorithm 1 of the paper on one batch of LR patches is :meth:`InvSRSampler.invert` (latent) /
:meth:`InvSRSampler.sample_patch` (image); :meth:`InvSRSampler.__call__` adds padding, overlapping patches
with Gaussian blending and colour correction so that any input size works (docs/sampling.md).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from invsr_pl.models import timesteps as ts
from invsr_pl.sampling.color_fix import COLOR_FIX_METHODS, apply_color_fix, upsample_reference
from invsr_pl.sampling.tiling import pad_to_min_size, pad_to_multiple, required_multiple, tiled_map
from invsr_pl.utils.compile import is_compiled

__all__ = ["STAGES", "InvSRSampler"]

# names of the timed stages (see InvSRSampler.timings)
STAGES = ("noise_predictor", "vae_encode", "unet", "vae_decode", "blending", "color_fix")


class InvSRSampler:
    """Super-resolve LR images with a frozen one-step prior and a trained noise predictor.

    Args:
        backbone: a :class:`~invsr_pl.models.backbone.FrozenBackbone` (SD-Turbo, SDXL-Turbo, SD3.5 Large
            Turbo or a tiny twin); the sampler uses its ``encode``, ``decode``, ``invert_step``, ``denoise``,
            ``renoise`` and geometry only.
        noise_predictor: ``NoisePredictor`` giving the start noise; ``None``: N(0, I) noise.
        num_steps: default number of steps; the timesteps come from ``timesteps.default_timesteps``.
        timesteps: default user timesteps (strictly descending, e.g. ``[200, 100]``); overrides ``num_steps``.
        chopping_size: LR patch size (128); smaller inputs are reflect-padded up to it, larger ones are
            processed in overlapping patches at stride ``chopping_size // 2``. ``None`` or 0: no chopping, the
            whole (modulus-padded) image in one pass.
        chopping_batch: patches per network call (8, docs/sampling.md).
        color_fix: ``"none"``, ``"wavelet"``, ``"ycbcr"`` or ``"adain"``, against the aligned LR.
        scale: SR factor when ``noise_predictor`` is None (else it must match ``noise_predictor.scale``); 4 if
            both are absent.
        pad_batches: pad a short batch of patches (the last one, or a small image's) with copies of its last
            patch up to the next power of two (at most ``chopping_batch``), so that compiled networks see a
            few fixed shapes instead of recompiling; outputs are unchanged (the random draws cover the real
            patches only). ``None``: on when the noise predictor or UNet is compiled
            (``invsr_pl.utils.compile``).

    Attributes:
        timings: ``None`` (default, no overhead) or a ``dict[str, float]`` into which every call adds the
            seconds spent per stage (:data:`STAGES`); CUDA is synchronised around each stage when set.
    """

    def __init__(
        self,
        backbone: nn.Module,
        noise_predictor: nn.Module | None,
        num_steps: int = 1,
        timesteps: Sequence[int] | None = None,
        chopping_size: int | None = 128,
        chopping_batch: int = 8,
        color_fix: str = "none",
        scale: int | None = None,
        pad_batches: bool | None = None,
    ) -> None:
        np_scale = getattr(noise_predictor, "scale", None)
        if scale is not None and np_scale is not None and scale != np_scale:
            raise ValueError(f"scale={scale} differs from the noise predictor's scale {np_scale}")
        self.scale = int(scale or np_scale or 4)
        if color_fix not in COLOR_FIX_METHODS:
            raise ValueError(f"unknown color_fix {color_fix!r}; choose one of {', '.join(COLOR_FIX_METHODS)}")
        if chopping_batch < 1:
            raise ValueError(f"chopping_batch must be >= 1, got {chopping_batch}")
        self.backbone = backbone
        self.noise_predictor = noise_predictor
        # docs/conventions.md: explicit timesteps win over num_steps
        self.timesteps = (
            ts.validate_timesteps(timesteps) if timesteps is not None else ts.default_timesteps(num_steps)
        )
        self.modulus = required_multiple(backbone.vae_scale_factor, backbone.latent_multiple, self.scale)
        if chopping_size and chopping_size % self.modulus:
            raise ValueError(
                f"chopping_size {chopping_size} must be a multiple of {self.modulus} so that x{self.scale} "
                "patches fit the VAE and UNet downsampling"
            )
        self.chopping_size = chopping_size or None
        self.chopping_batch = chopping_batch
        self.color_fix = color_fix
        if pad_batches is None:
            pad_batches = is_compiled(noise_predictor) or is_compiled(getattr(backbone, "denoiser", None))
        self.pad_batches = bool(pad_batches)
        self.timings: dict[str, float] | None = None

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def __call__(
        self,
        lr: Tensor,
        timesteps: Sequence[int] | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | int | None = None,
    ) -> Tensor:
        """Super-resolve a batch of any size.

        Args:
            lr: (B, 3, h, w) float in [0, 1], any h, w >= 1.
            timesteps / num_steps: override the constructor's schedule for this call (timesteps win).
            generator: ``torch.Generator`` or an int seed (seeds a generator on the backbone's device);
                drives the noise-predictor and VAE posterior samples, so equal seeds give equal outputs.

        Returns:
            (B, 3, s*h, s*w) float32 in [0, 1] on the backbone's device, aligned with ``lr``.
        """
        if lr.ndim != 4 or lr.shape[1] != 3 or lr.shape[-2] < 1 or lr.shape[-1] < 1:
            raise ValueError(f"lr must have shape (B, 3, h, w) with h, w >= 1, got {tuple(lr.shape)}")
        steps = (
            self.timesteps
            if timesteps is None and num_steps is None
            else self._resolve_timesteps(timesteps, num_steps)
        )
        generator = self._generator(generator)
        lr = lr.to(device=self.backbone.device, dtype=torch.float32)
        h, w = lr.shape[-2:]
        s = self.scale

        with self._stage("blending"):
            # docs/sampling.md: pad small images up to the patch size (accumulated pads,
            # PR #51), then bottom/right up to the modulus; the crop below undoes both.
            x, top, left = pad_to_min_size(lr, self.chopping_size or 0)
            x = pad_to_multiple(x, self.modulus)
        network_before = self._network_seconds()
        start = time.perf_counter()
        if self.chopping_size is None:  # one pass over the whole (modulus-padded) image
            sr = torch.cat(
                [self.sample_patch(chunk, steps, generator) for chunk in x.split(self.chopping_batch)]
            )
        else:
            sr = tiled_map(
                x,
                lambda patches: self.sample_patch(patches, steps, generator),
                patch_size=self.chopping_size,
                scale=s,
                batch_size=self.chopping_batch,
            )
        if self.timings is not None:
            # blending = time in the patch loop that is not spent in the networks
            self._sync()
            elapsed = time.perf_counter() - start - (self._network_seconds() - network_before)
            self.timings["blending"] = self.timings.get("blending", 0.0) + elapsed
        with self._stage("blending"):
            sr = sr[..., s * top : s * (top + h), s * left : s * (left + w)]  # docs/sampling.md
        with self._stage("color_fix"):
            if self.color_fix != "none":
                # docs/deviations.md: the reference is the *unpadded* LR, so it is aligned with sr
                sr = apply_color_fix(sr, upsample_reference(lr, (s * h, s * w)), self.color_fix)
        return sr.float().clamp(0.0, 1.0)

    def invert(
        self,
        lr_patch: Tensor,
        timesteps: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Algorithm 1 on LR patches: the predicted clean latent after the last step.

        Respects the caller's grad mode (training validation may call it under ``torch.no_grad``).

        Args:
            lr_patch: (B, 3, p, q) float in [0, 1], p and q multiples of :attr:`modulus`.
            timesteps: strictly descending user timesteps (default: the constructor's).
            generator: drives the noise-predictor sample and the VAE posterior sample.

        Returns:
            (B, C, s*p/8, s*q/8) float32 latent x0_hat (C: the backbone's latent channels).
        """
        return self._invert(lr_patch, timesteps, generator)[: lr_patch.shape[0]]

    def sample_patch(
        self,
        lr_patch: Tensor,
        timesteps: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:meth:`invert` then decode: (B, 3, p, q) in [0, 1] -> (B, 3, s*p, s*q) float32 in [0, 1]."""
        z0 = self._invert(
            lr_patch, timesteps, generator
        )  # padded rows, if any, are decoded too (fixed shape)
        with self._stage("vae_decode"):
            return self.backbone.decode(z0).float()[: lr_patch.shape[0]]

    def _invert(
        self, lr_patch: Tensor, timesteps: Sequence[int] | None, generator: torch.Generator | None
    ) -> Tensor:
        """:meth:`invert` on the batch padded to :meth:`_padded_rows` rows; returns all rows."""
        steps = self.timesteps if timesteps is None else ts.validate_timesteps(timesteps)
        if lr_patch.shape[-2] % self.modulus or lr_patch.shape[-1] % self.modulus:
            raise ValueError(f"patch size {tuple(lr_patch.shape[-2:])} must be a multiple of {self.modulus}")
        device = self.backbone.device
        b = lr_patch.shape[0]
        rows = self._padded_rows(b)
        x = _pad_rows(lr_patch.to(device=device, dtype=torch.float32), rows)
        index = ts.to_index(steps, device=device)  # (T,) diffusion indices, user t -> t - 1
        latent = (
            b,
            self.backbone.latent_channels,
            *(self.scale * n // self.backbone.vae_scale_factor for n in x.shape[-2:]),
        )

        with self._stage("noise_predictor"):
            # docs/sampling.md: the start-noise draw first, then the VAE posterior draw; both drawn here, for
            # the real rows only, so that padding a batch never changes a real patch's random numbers.
            # diffusers' helper also accepts a CPU generator for a CUDA tensor (drawn on CPU, then moved).
            start = _pad_rows(
                randn_tensor(latent, generator=generator, device=device, dtype=torch.float32), rows
            )
            posterior = _pad_rows(
                randn_tensor(latent, generator=generator, device=device, dtype=torch.float32), rows
            )
            if self.noise_predictor is not None:
                dist = self._predict_noise_distribution(x, index[:1].expand(rows))
                noise = dist.mean + dist.std * start  # = dist.sample(generator) on the real rows
            else:
                noise = start
        with self._stage("vae_encode"):
            # docs/sampling.md: bicubic without antialias, not clamped (as the official pipeline)
            lr_up = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
            z_lq = self.backbone.encode(lr_up, noise=posterior).float()
        if noise.shape != z_lq.shape:
            raise ValueError(
                f"noise predictor output {tuple(noise.shape)} does not match the latent {tuple(z_lq.shape)}"
            )
        with self._stage("unet"):
            # docs/sampling.md: one-step inversion, then deterministic Euler steps (s_churn 0) in fp32; the
            # last sigma is 0, so each step continues from x0_hat + sigma_next * direction (the predicted
            # noise, or the velocity of a flow prior: docs/backbones.md)
            x0, direction = self.backbone.invert_step(z_lq, noise, index[:1].expand(rows))
            for i in range(1, len(steps)):
                z = self.backbone.renoise(x0, direction, index[i : i + 1].expand(rows))
                x0, direction = self.backbone.denoise(z, index[i : i + 1].expand(rows))
        return x0

    def _predict_noise_distribution(self, x: Tensor, index: Tensor) -> DiagonalGaussianDistribution:
        """The noise predictor's Gaussian (float32 moments).

        fp32 weights run under autocast in a half backbone's dtype (docs/sampling.md); half weights (see
        ``invsr_pl.utils.compile.prepare_for_inference``) run as they are, without per-call weight casts.
        """
        dtype = self.backbone.dtype
        # a weightless stand-in counts as fp32
        np_dtype = next(self.noise_predictor.parameters(), torch.empty(0)).dtype
        half = dtype in (torch.float16, torch.bfloat16) and np_dtype == torch.float32
        with torch.autocast(x.device.type, dtype=dtype if half else None, enabled=half):
            return self.noise_predictor(x, index)

    def _padded_rows(self, rows: int) -> int:
        """Rows a batch of ``rows`` patches is padded to: ``rows`` itself unless :attr:`pad_batches`; then the
        next power of two, at most ``chopping_batch``, so compiled networks see a few fixed batch sizes."""
        if not self.pad_batches or rows >= self.chopping_batch:
            return rows
        return min(1 << (rows - 1).bit_length(), self.chopping_batch)

    # ------------------------------------------------------------------ helpers

    def _resolve_timesteps(self, timesteps: Sequence[int] | None, num_steps: int | None) -> list[int]:
        if timesteps is not None:
            out = ts.validate_timesteps(timesteps)
            if num_steps is not None and num_steps != len(out):
                raise ValueError(f"num_steps={num_steps} but {len(out)} timesteps were given: {out}")
            return out
        return ts.default_timesteps(1 if num_steps is None else num_steps)

    def _generator(self, generator: torch.Generator | int | None) -> torch.Generator | None:
        if generator is None or isinstance(generator, torch.Generator):
            return generator
        return torch.Generator(device=self.backbone.device).manual_seed(int(generator))

    def _sync(self) -> None:
        if self.backbone.device.type == "cuda":
            torch.cuda.synchronize(self.backbone.device)

    def _network_seconds(self) -> float:
        if self.timings is None:
            return 0.0
        return sum(self.timings.get(k, 0.0) for k in ("noise_predictor", "vae_encode", "unet", "vae_decode"))

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        assert self.timings is not None
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def _stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        return _NULL if self.timings is None else self._timed(name)


_NULL = contextlib.nullcontext()


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """Pad ``x`` (B, ...) to ``rows`` rows by repeating its last row (the extra results are dropped)."""
    if rows == x.shape[0]:
        return x
    return torch.cat([x, x[-1:].expand(rows - x.shape[0], *x.shape[1:])])
