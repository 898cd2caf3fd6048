"""InvSRSampler: LR image -> SR image by diffusion inversion in any number of steps (INVSR_REFERENCE §5).

The one inference path of the project: the SR command, evaluation and the LightningModule's validation all
call it. Algorithm 1 of the paper on one batch of LR patches is :meth:`InvSRSampler.invert` (latent) /
:meth:`InvSRSampler.sample_patch` (image); :meth:`InvSRSampler.__call__` adds padding, overlapping patches
with Gaussian blending and colour correction so that any input size works (§5.5, §5.6).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from invsr_pl.sampling import timesteps as ts
from invsr_pl.sampling.color_fix import COLOR_FIX_METHODS, apply_color_fix, upsample_reference
from invsr_pl.sampling.tiling import pad_to_min_size, pad_to_multiple, required_multiple, tiled_map

__all__ = ["STAGES", "InvSRSampler"]

# names of the timed stages (see InvSRSampler.timings)
STAGES = ("noise_predictor", "vae_encode", "unet", "vae_decode", "blending", "color_fix")


class InvSRSampler:
    """Super-resolve LR images with a frozen SD-Turbo backbone and a trained noise predictor.

    Args:
        backbone: ``FrozenSDTurbo`` (or the tiny one from ``invsr_pl.models.tiny``); provides ``encode``,
            ``decode``, ``predict_eps``, ``sigma`` and ``vae_scale_factor``.
        noise_predictor: ``NoisePredictor`` giving the start noise; ``None``: N(0, I) noise (§5.2 step 5).
        num_steps: default number of steps; the timesteps come from ``timesteps.default_timesteps`` (§5.1).
        timesteps: default user timesteps (strictly descending, e.g. ``[200, 100]``); overrides ``num_steps``.
        chopping_size: LR patch size (128, §7.2); smaller inputs are reflect-padded up to it, larger ones are
            processed in overlapping patches at stride ``chopping_size // 2``. ``None`` or 0: no chopping, the
            whole (modulus-padded) image in one pass.
        chopping_batch: patches per network call (8, §7.2).
        color_fix: ``"none"``, ``"wavelet"``, ``"ycbcr"`` or ``"adain"`` (§5.6), against the aligned LR.
        scale: SR factor when ``noise_predictor`` is None (else it must match ``noise_predictor.scale``); 4 if
            both are absent.

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
        # INVSR_REFERENCE §5.1: explicit timesteps win over num_steps
        self.timesteps = (
            ts.validate_timesteps(timesteps) if timesteps is not None else ts.default_timesteps(num_steps)
        )
        self.modulus = required_multiple(backbone.vae_scale_factor, _unet_scale_factor(backbone), self.scale)
        if chopping_size and chopping_size % self.modulus:
            raise ValueError(
                f"chopping_size {chopping_size} must be a multiple of {self.modulus} so that x{self.scale} "
                "patches fit the VAE and UNet downsampling"
            )
        self.chopping_size = chopping_size or None
        self.chopping_batch = chopping_batch
        self.color_fix = color_fix
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
            # INVSR_REFERENCE §5.5 steps 1 and 3: pad small images up to the patch size (accumulated pads,
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
            sr = sr[..., s * top : s * (top + h), s * left : s * (left + w)]  # §5.5 step 5
        with self._stage("color_fix"):
            if self.color_fix != "none":
                # §5.6 with quirk 7.7.2 fixed: the reference is the *unpadded* LR, so it is aligned with sr
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
            (B, 4, s*p/8, s*q/8) float32 scaled latent x0_hat.
        """
        steps = self.timesteps if timesteps is None else ts.validate_timesteps(timesteps)
        if lr_patch.shape[-2] % self.modulus or lr_patch.shape[-1] % self.modulus:
            raise ValueError(f"patch size {tuple(lr_patch.shape[-2:])} must be a multiple of {self.modulus}")
        device = self.backbone.device
        lr_patch = lr_patch.to(device=device, dtype=torch.float32)
        b = lr_patch.shape[0]
        index = ts.to_index(steps, device=device)  # (T,) diffusion indices, user t -> t - 1 (§0)
        sigmas = self.backbone.sigma(index).float()  # (T,) float32

        with self._stage("noise_predictor"):
            # §5.2 step 5: the NP draw comes first, then the VAE posterior draw
            if self.noise_predictor is not None:
                # §5.2 step 5 / §5.7: fp32 weights under autocast in the backbone's half dtype (off in fp32)
                half = self.backbone.dtype if self.backbone.dtype in (torch.float16, torch.bfloat16) else None
                with torch.autocast(device.type, dtype=half, enabled=half is not None):
                    dist = self.noise_predictor(lr_patch, index[:1].expand(b))
                noise = dist.sample(generator=generator).float()
            else:
                shape = (
                    b,
                    self.backbone.latent_channels,
                    *(self.scale * n // self.backbone.vae_scale_factor for n in lr_patch.shape[-2:]),
                )
                # diffusers' helper also accepts a CPU generator for a CUDA tensor (drawn on CPU, then moved)
                noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        with self._stage("vae_encode"):
            # §5.2 step 3: bicubic without antialias, not clamped (as the official pipeline)
            lr_up = F.interpolate(lr_patch, scale_factor=self.scale, mode="bicubic", align_corners=False)
            z_lq = self.backbone.encode(lr_up, generator=generator).float()
        if noise.shape != z_lq.shape:
            raise ValueError(
                f"noise predictor output {tuple(noise.shape)} does not match the latent {tuple(z_lq.shape)}"
            )

        z = ts.add_noise(z_lq, noise, sigmas[0])  # §5.2 step 5: VE start state z_lq + sigma_0 * noise
        with self._stage("unet"):
            for i in range(len(steps)):
                eps = self.backbone.predict_eps(z, index[i : i + 1].expand(b)).float()
                # §5.2 step 6: deterministic Euler (s_churn 0) in fp32; the last sigma is 0 -> x0_hat
                sigma_next = sigmas[i + 1] if i + 1 < len(steps) else 0.0
                z = ts.euler_step(z, eps, sigmas[i], sigma_next)
        return z

    def sample_patch(
        self,
        lr_patch: Tensor,
        timesteps: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """:meth:`invert` then decode: (B, 3, p, q) in [0, 1] -> (B, 3, s*p, s*q) float32 in [0, 1]."""
        z0 = self.invert(lr_patch, timesteps, generator)
        with self._stage("vae_decode"):
            return self.backbone.decode(z0).float()

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


def _unet_scale_factor(backbone: nn.Module) -> int:
    """Spatial factor of the UNet: 2 ** (number of down blocks - 1) (8 for SD-Turbo, §5.5 "diffusion_sf")."""
    unet = getattr(backbone, "unet", None)
    channels = getattr(getattr(unet, "config", None), "block_out_channels", None)
    return 2 ** (len(channels) - 1) if channels else 8
