"""Real-ESRGAN second-order degradation as one batched ``nn.Module`` (docs/data.md#degradation-pipeline).

Every image of a batch gets its own kernels, noise, resize modes, JPEG qualities, second-stage decision and
final-stage order. Two things are shared by the batch, as in the official pipeline, because a batch must keep
one tensor size: the first-stage resize scale and the second-stage resize scale.

Decisions that differ from the official (batch-level) draws, all keeping the per-image marginal distribution:

- The official draws the second-stage coin, the Gaussian-vs-Poisson choice, the second blur coin, the resize
  modes and the final-stage order once per *batch*; here each is drawn per *sample* (samples are grouped, so
  the ops still run batched). Each image's degradation has the same distribution as before, but one batch now
  mixes them, which the pair pool (docs/data.md#pair-pool) only partly achieved.
- Resizes use an explicit target size ``int(H * s)`` rather than ``scale_factor=s``: same output size; the
  sampling grid uses the in/out size ratio instead of 1/s (a sub-pixel difference).
- JPEG: see ``ops.resolve_jpeg_codec`` (real libjpeg on CPU, kornia's batched codec on CUDA); the official
  uses DiffJPEG, a differentiable approximation of the same baseline codec. libjpeg takes integer qualities
  and 8-bit input, so its intermediate images are 8-bit; the approximations keep floats.
- Poisson noise follows Real-ESRGAN's definition exactly, including the per-image level count
  (``ops.poisson_levels``: a batched histogram instead of a ``torch.unique`` per image).

``tests/unit/degradation/test_fidelity.py`` checks the LQ distribution against a naive per-image
implementation of the recipe.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .config import (
    DegradationConfig,
    FinalStageConfig,
    FirstStageConfig,
    SecondStageConfig,
    coerce,
    imagenet_test_config,
)
from .kernels import (
    build_kernels,
    build_sinc_or_delta,
    delta_kernels,
    sample_kernel_params,
    sample_sinc_params,
)

Params = dict[str, Tensor]


def _check_generator(generator: torch.Generator, x: Tensor) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != x.device.type:
        raise ValueError(
            f"generator is on {generator.device} but the images are on {x.device}; create it with "
            f"torch.Generator(device=images.device)"
        )


def _check_gt(gt: Tensor, scale: int) -> None:
    if gt.ndim != 4 or gt.shape[1] != 3 or not gt.is_floating_point():
        raise ValueError(
            f"gt must be a float (B, 3, H, W) tensor in [0, 1], got {tuple(gt.shape)} {gt.dtype}"
        )
    if gt.shape[-2] % scale or gt.shape[-1] % scale:
        raise ValueError(f"GT size {tuple(gt.shape[-2:])} must be divisible by the scale {scale}")


def _uniform(n: int, rng: tuple[float, float], g: torch.Generator, dev: torch.device) -> Tensor:
    return rng[0] + (rng[1] - rng[0]) * torch.rand(n, generator=g, device=dev)


def _coin(n: int, p: float, g: torch.Generator, dev: torch.device) -> Tensor:
    return torch.rand(n, generator=g, device=dev) < p


def _modes(n: int, allowed: tuple[str, ...], g: torch.Generator, dev: torch.device) -> Tensor:
    """(n,) int64 indices into ``ops.RESIZE_MODES``, uniform over ``allowed``."""
    table = torch.tensor([ops.RESIZE_MODES.index(m) for m in allowed], device=dev)
    return table[torch.randint(len(allowed), (n,), generator=g, device=dev)]


def _resize_scale(
    n: int, probs: tuple[float, ...], rng: tuple[float, float], g: torch.Generator, dev: torch.device
) -> Tensor:
    """One (up | down | keep) scale for the whole batch, repeated to (n,): up ~ U[1, hi], down ~ U[lo, 1]."""
    kind = int(torch.multinomial(torch.tensor(probs, device=dev), 1, generator=g))
    u = float(torch.rand(1, generator=g, device=dev))
    s = (1 + (rng[1] - 1) * u) if kind == 0 else (rng[0] + (1 - rng[0]) * u) if kind == 1 else 1.0
    return torch.full((n,), s, device=dev)


def _noise_params(
    prefix: str, cfg: FirstStageConfig | SecondStageConfig, n: int, g: torch.Generator, dev: torch.device
) -> Params:
    return {
        f"{prefix}.gaussian": _coin(n, cfg.gaussian_noise_prob, g, dev),
        f"{prefix}.noise_sigma": _uniform(n, cfg.noise_range, g, dev),  # 0-255 scale
        f"{prefix}.poisson_scale": _uniform(n, cfg.poisson_scale_range, g, dev),
        f"{prefix}.gray": _coin(n, cfg.gray_noise_prob, g, dev),
    }


def _kernel_params(
    prefix: str, cfg: FirstStageConfig | SecondStageConfig, n: int, g: torch.Generator, dev: torch.device
) -> Params:
    k = cfg.kernel
    raw = sample_kernel_params(
        n,
        k.size,
        g,
        sinc_prob=k.sinc_prob,
        type_probs=k.type_probs,
        sigma_range=k.sigma_range,
        betag_range=k.betag_range,
        betap_range=k.betap_range,
        device=dev,
    )
    out = {f"{prefix}.kernel.{key}": v for key, v in raw.items()}
    out[f"{prefix}.blur"] = _coin(n, cfg.blur_prob, g, dev)
    return out


def _sub(params: Params, prefix: str, idx: Tensor | None = None) -> dict[str, Tensor]:
    """Entries under ``prefix.`` with the prefix stripped, optionally restricted to samples ``idx``."""
    n = len(prefix) + 1
    return {k[n:]: (v if idx is None else v[idx]) for k, v in params.items() if k.startswith(prefix + ".")}


class RealESRGANDegradation(nn.Module):
    """Synthesise LQ images from GT with the Real-ESRGAN second-order pipeline, vectorised over the batch.

    Constructor keyword arguments map one-to-one to ``conf/data/degradation/*.yaml`` (Hydra passes the nested
    stage mappings as dicts; they are validated into the dataclasses of ``config.py``)::

        _target_: datamodules.degradation.pipeline.RealESRGANDegradation
        scale: 4
        jpeg_codec: auto
        first_stage: {blur_prob: 1.0, kernel: {size: 21, ...}, resize_probs: [0.2, 0.7, 0.1], ...}
        second_stage: {prob: 0.5, ...}
        final_stage: {sinc_prob: 0.8, ...}

    Args:
        scale: downscaling factor (2, 4, 8, ...); GT sides must be divisible by it.
        first_stage / second_stage / final_stage: config dataclasses, mappings of their fields, or None for
            the paper's training defaults.
        jpeg_codec: ``auto`` | ``libjpeg`` | ``kornia`` (``ops.resolve_jpeg_codec``).
    """

    def __init__(
        self,
        scale: int = 4,
        first_stage: FirstStageConfig | dict[str, Any] | None = None,
        second_stage: SecondStageConfig | dict[str, Any] | None = None,
        final_stage: FinalStageConfig | dict[str, Any] | None = None,
        jpeg_codec: str = "auto",
    ) -> None:
        super().__init__()
        self.config = DegradationConfig(
            scale=scale,
            first_stage=coerce(first_stage, FirstStageConfig, "first_stage"),
            second_stage=coerce(second_stage, SecondStageConfig, "second_stage"),
            final_stage=coerce(final_stage, FinalStageConfig, "final_stage"),
            jpeg_codec=jpeg_codec,
        )

    @classmethod
    def from_config(cls, config: DegradationConfig) -> RealESRGANDegradation:
        return cls(
            config.scale, config.first_stage, config.second_stage, config.final_stage, config.jpeg_codec
        )

    @classmethod
    def imagenet_test(cls, scale: int = 4, jpeg_codec: str = "auto") -> RealESRGANDegradation:
        """ImageNet-Test synthesis preset (docs/data.md#imagenet-test-synthesis)."""
        cfg = imagenet_test_config(scale)
        cfg.jpeg_codec = jpeg_codec
        return cls.from_config(cfg)

    @property
    def scale(self) -> int:
        return self.config.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}, jpeg_codec={self.config.jpeg_codec!r}"

    # ------------------------------------------------------------------ parameters
    def sample_params(self, batch: int, height: int, width: int, generator: torch.Generator) -> Params:
        """Draw every per-image parameter (and the two batch-shared resize scales) for one batch.

        Args:
            batch, height, width: GT batch size and spatial size.
            generator: the source of randomness; parameters are created on its device.

        Returns:
            flat dict ``"stage.name" -> (B,)`` tensor on the generator's device (bool, int64 or float32):
            ``first.*``, ``second.*`` (``second.apply`` says whether the stage was taken) and ``final.*``.
            Noise sigmas are on the 0-255 scale; JPEG qualities are floats.
        """
        c, g, dev, n = self.config, generator, generator.device, batch
        p: Params = {}
        f1, f2, fin = c.first_stage, c.second_stage, c.final_stage
        # The draw order is fixed: it defines what a seed means (docs/data.md#degradation-pipeline).
        p.update(_kernel_params("first", f1, n, g, dev))
        p["first.resize_scale"] = _resize_scale(n, f1.resize_probs, f1.resize_range, g, dev)
        p["first.resize_mode"] = _modes(n, f1.resize_modes, g, dev)
        p.update(_noise_params("first", f1, n, g, dev))
        p["first.jpeg_quality"] = _uniform(n, f1.jpeg_range, g, dev)

        p["second.apply"] = _coin(n, f2.prob, g, dev)
        p.update(_kernel_params("second", f2, n, g, dev))
        p["second.resize_scale"] = _resize_scale(n, f2.resize_probs, f2.resize_range, g, dev)
        p["second.resize_mode"] = _modes(n, f2.resize_modes, g, dev)
        p.update(_noise_params("second", f2, n, g, dev))

        sinc = sample_sinc_params(
            n, fin.sinc_size, g, prob=fin.sinc_prob, omega_range=fin.sinc_omega_range, device=dev
        )
        p.update({f"final.sinc.{k}": v for k, v in sinc.items()})
        p["final.resize_mode"] = _modes(n, fin.resize_modes, g, dev)
        p["final.jpeg_quality"] = _uniform(n, fin.jpeg_range, g, dev)
        p["final.resize_first"] = _coin(n, fin.resize_first_prob, g, dev)
        return p

    # ------------------------------------------------------------------ stages
    def _blur(self, x: Tensor, p: dict[str, Tensor], size: int) -> Tensor:
        kp = {k[len("kernel.") :]: v for k, v in p.items() if k.startswith("kernel.")}
        kernels = build_kernels(kp, size)
        kernels = torch.where(p["blur"].view(-1, 1, 1), kernels, delta_kernels(x.shape[0], size, x.device))
        return ops.filter2d(x, kernels)

    def _noise(self, x: Tensor, p: dict[str, Tensor], g: torch.Generator) -> Tensor:
        return ops.add_noise(x, p["gaussian"], p["noise_sigma"] / 255.0, p["poisson_scale"], p["gray"], g)

    def _first_stage(self, gt: Tensor, p: Params, g: torch.Generator) -> Tensor:
        f1 = self.config.first_stage
        q = _sub(p, "first")
        x = self._blur(gt, q, f1.kernel.size)
        s = float(q["resize_scale"][0])
        x = ops.resize(x, (max(1, int(gt.shape[-2] * s)), max(1, int(gt.shape[-1] * s))), q["resize_mode"])
        x = self._noise(x, q, g)
        return ops.jpeg(x, q["jpeg_quality"], self.config.jpeg_codec)

    def _second_stage(
        self, x: Tensor, p: Params, idx: Tensor, lq_size: tuple[int, int], g: torch.Generator
    ) -> Tensor:
        f2 = self.config.second_stage
        q = _sub(p, "second", idx)
        x = self._blur(x, q, f2.kernel.size)
        s = float(q["resize_scale"][0])
        x = ops.resize(x, (max(1, int(lq_size[0] * s)), max(1, int(lq_size[1] * s))), q["resize_mode"])
        return self._noise(x, q, g)

    def _final_stage(
        self, x: Tensor, p: Params, idx: Tensor, lq_size: tuple[int, int], resize_first: bool
    ) -> Tensor:
        fin = self.config.final_stage
        q = _sub(p, "final", idx)
        sinc = build_sinc_or_delta(
            {"apply": q["sinc.apply"], "ksize": q["sinc.ksize"], "omega_c": q["sinc.omega_c"]}, fin.sinc_size
        )
        if resize_first:  # (a) resize -> sinc -> JPEG
            x = ops.filter2d(ops.resize(x, lq_size, q["resize_mode"]), sinc)
            return ops.jpeg(x, q["jpeg_quality"], self.config.jpeg_codec)
        # (b) JPEG -> resize -> sinc
        x = ops.jpeg(x, q["jpeg_quality"], self.config.jpeg_codec)
        return ops.filter2d(ops.resize(x, lq_size, q["resize_mode"]), sinc)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(
        self,
        gt: Tensor,
        generator: torch.Generator,
        return_params: bool = False,
        params: Params | None = None,
    ) -> Tensor | tuple[Tensor, Params]:
        """Degrade a GT batch.

        Args:
            gt: (B, 3, H, W) float in [0, 1]; H and W divisible by ``scale``.
            generator: ``torch.Generator`` on gt's device; same state -> same output.
            return_params: also return the sampled parameters (see ``sample_params``; ``per_image_params``
                turns them into JSON-ready dicts).
            params: parameters from ``sample_params`` to use instead of drawing new ones (noise is still drawn
                from ``generator``).

        Returns:
            lq (B, 3, H / scale, W / scale) float32 in [0, 1] on the 8-bit grid, or ``(lq, params)``.
        """
        _check_gt(gt, self.scale)
        _check_generator(generator, gt)
        b, _, h, w = gt.shape
        dtype = gt.dtype
        gt = gt.float()
        p = self.sample_params(b, h, w, generator) if params is None else params
        p = {k: v.to(gt.device) for k, v in p.items()}
        lq_size = (h // self.scale, w // self.scale)

        x = self._first_stage(gt, p, generator)
        out = gt.new_empty(b, 3, *lq_size)
        second = p["second.apply"].tolist()
        first_order = p["final.resize_first"].tolist()
        # Four groups (second stage taken or not) x (final order): ops stay batched inside each group.
        for take_second in (True, False):
            for resize_first in (True, False):
                sel = [i for i in range(b) if second[i] == take_second and first_order[i] == resize_first]
                if not sel:
                    continue
                idx = torch.tensor(sel, device=gt.device)
                y = x[idx]
                if take_second:
                    y = self._second_stage(y, p, idx, lq_size, generator)
                out[idx] = self._final_stage(y, p, idx, lq_size, resize_first)
        lq = ops.quantize_8bit(out).to(dtype)
        return (lq, p) if return_params else lq

    @staticmethod
    def per_image_params(params: Params) -> list[dict[str, Any]]:
        """Split ``sample_params`` output into one JSON-serialisable dict per image (plain bools/ints/floats).

        Kernel types are named (``ops``/``kernels`` names) and resize modes spelled out.
        """
        from .kernels import KERNEL_TYPES

        names = (*KERNEL_TYPES, "sinc")
        cols = {k: v.detach().cpu().tolist() for k, v in params.items()}
        b = len(next(iter(cols.values()))) if cols else 0
        out: list[dict[str, Any]] = []
        for i in range(b):
            d: dict[str, Any] = {}
            for k, v in cols.items():
                val = v[i]
                if k.endswith("kernel.type"):
                    val = names[int(val)]
                elif k.endswith("resize_mode"):
                    val = ops.RESIZE_MODES[int(val)]
                elif isinstance(val, float):
                    val = round(val, 6) if math.isfinite(val) else val
                d[k] = val
            out.append(d)
        return out


class BicubicDegradation(nn.Module):
    """Plain bicubic downscale (antialiased, like MATLAB ``imresize``) quantised to 8 bit, for ablations.

    Same call signature as ``RealESRGANDegradation``; the generator is accepted and unused.

    Args:
        scale: downscaling factor; GT sides must be divisible by it.
        antialias: low-pass before subsampling (``F.interpolate(antialias=True)``).
    """

    def __init__(self, scale: int = 4, antialias: bool = True) -> None:
        super().__init__()
        if int(scale) < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        self.scale = int(scale)
        self.antialias = bool(antialias)

    @torch.no_grad()
    def forward(
        self, gt: Tensor, generator: torch.Generator | None = None, return_params: bool = False
    ) -> Tensor | tuple[Tensor, Params]:
        """gt (B, 3, H, W) in [0, 1] -> lq (B, 3, H / scale, W / scale) in [0, 1], 8-bit grid."""
        _check_gt(gt, self.scale)
        h, w = gt.shape[-2] // self.scale, gt.shape[-1] // self.scale
        lq = torch.nn.functional.interpolate(
            gt.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=self.antialias
        )
        lq = ops.quantize_8bit(lq).to(gt.dtype)
        if return_params:
            return lq, {"bicubic.scale": torch.full((gt.shape[0],), self.scale, device=gt.device)}
        return lq
