"""InvSRSampler: Algorithm 1, any-size tiling, determinism, colour fix (INVSR_REFERENCE §5).

Two kinds of backbone: the project's tiny random SD-Turbo (real code paths: shapes, ranges, determinism,
UNet calls per step) and a *local* stand-in whose encode/decode/eps are pixel-local and noise-free, so that a
patched run can be compared with an unpatched one and alignment can be checked by eye-like measurements.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

from invsr_pl.sampling import timesteps as ts
from invsr_pl.sampling.sampler import STAGES, InvSRSampler


class LocalBackbone(nn.Module):
    """Stand-in with the FrozenSDTurbo interface and pixel-local, deterministic ops.

    encode: 8x8 average pool (RGB + grey as the 4th channel); decode: nearest x8 of the first three channels;
    predict_eps: 0 (so x0_hat is the start state). With a zero-noise predictor the whole sampler is then the
    local map ``nearest8(avgpool8(bicubic4(lr)))``.
    """

    vae_scale_factor = 8
    latent_channels = 4

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("sigmas", ts.sd_turbo_sigmas())
        self.unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=(8, 8, 8, 8)))  # UNet factor 8
        self.eps_calls = 0

    @property
    def device(self) -> torch.device:
        return self.sigmas.device

    def sigma(self, index: Tensor) -> Tensor:
        return self.sigmas[index]

    def encode(self, image: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        pooled = F.avg_pool2d(image, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)

    def decode(self, latent: Tensor) -> Tensor:
        return F.interpolate(latent[:, :3], scale_factor=8, mode="nearest").clamp(0, 1)

    def predict_eps(self, z_t: Tensor, index: Tensor) -> Tensor:
        assert index.shape == (z_t.shape[0],) and index.dtype == torch.long
        self.eps_calls += 1
        return torch.zeros_like(z_t)


class ZeroNoisePredictor(nn.Module):
    """Noise predictor stand-in with a point mass at 0 (x4)."""

    scale = 4

    def forward(self, lr: Tensor, index: Tensor) -> DiagonalGaussianDistribution:
        b, _, h, w = lr.shape
        return DiagonalGaussianDistribution(torch.zeros(b, 8, h // 2, w // 2), deterministic=True)


def local_reference(lr: Tensor) -> Tensor:
    up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False)
    return F.interpolate(F.avg_pool2d(up, 8), scale_factor=8, mode="nearest").clamp(0, 1)


# ---------------------------------------------------------------------------------- local stand-in


def test_patched_run_equals_unpatched_run() -> None:
    lr = torch.rand(2, 3, 96, 80)
    backbone = LocalBackbone()
    whole = InvSRSampler(backbone, ZeroNoisePredictor(), chopping_size=None)(lr)
    patched = InvSRSampler(backbone, ZeroNoisePredictor(), chopping_size=32, chopping_batch=3)(lr)
    assert whole.shape == patched.shape == (2, 3, 384, 320)
    torch.testing.assert_close(whole, local_reference(lr), atol=1e-5, rtol=0)
    # patches see their own borders (bicubic edge handling); the Gaussian weights make that negligible
    diff = (whole - patched).abs()
    assert diff.mean() < 2e-3 and diff.max() < 0.05


@pytest.mark.parametrize("size", [(20, 13), (5, 7), (1, 3), (37, 50)])
def test_padded_small_input_stays_aligned(size: tuple[int, int]) -> None:
    h, w = size
    lr = torch.full((1, 3, h, w), 0.1)
    y0, x0 = h // 3, w // 3
    lr[..., y0 : y0 + max(h // 3, 1), x0 : x0 + max(w // 3, 1)] = 0.9  # a bright rectangle
    sr = InvSRSampler(LocalBackbone(), ZeroNoisePredictor(), chopping_size=32)(lr)
    assert sr.shape == (1, 3, 4 * h, 4 * w)
    want = F.interpolate(lr, scale_factor=4, mode="nearest")

    def centroid(img: Tensor) -> Tensor:
        weight = (img[0, 0] - img[0, 0].min()).clamp_min(0)
        ys, xs = torch.meshgrid(torch.arange(img.shape[-2]), torch.arange(img.shape[-1]), indexing="ij")
        return torch.stack([(weight * ys).sum(), (weight * xs).sum()]) / weight.sum()

    # misaligned padding would move the rectangle by 4 * pad >= 4 px; avg-pool quantisation moves it < 4 px
    if h > 1 and w > 1:
        assert (centroid(sr) - centroid(want)).abs().max() < 4


def test_color_fix_reference_is_aligned_with_unpadded_input() -> None:
    lr = torch.rand(1, 3, 20, 13)
    for method in ("wavelet", "ycbcr", "adain"):
        sr = InvSRSampler(LocalBackbone(), ZeroNoisePredictor(), chopping_size=32, color_fix=method)(lr)
        assert sr.shape == (1, 3, 80, 52) and sr.min() >= 0 and sr.max() <= 1


def test_timings_are_off_by_default_and_cover_every_stage() -> None:
    sampler = InvSRSampler(LocalBackbone(), ZeroNoisePredictor(), chopping_size=32, color_fix="wavelet")
    sampler(torch.rand(1, 3, 40, 40))
    assert sampler.timings is None
    sampler.timings = {}
    sampler(torch.rand(1, 3, 40, 40))
    assert set(sampler.timings) == set(STAGES) and all(v >= 0 for v in sampler.timings.values())


def test_no_noise_predictor_uses_standard_normal_noise() -> None:
    backbone = LocalBackbone()
    sampler = InvSRSampler(backbone, None, chopping_size=32)
    lr = torch.rand(1, 3, 32, 32)
    a, b, c = sampler(lr, generator=1), sampler(lr, generator=1), sampler(lr, generator=2)
    assert sampler.scale == 4 and a.shape == (1, 3, 128, 128)
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded N(0, I) noise enters the start state


def test_bad_arguments_error_clearly() -> None:
    backbone = LocalBackbone()
    with pytest.raises(ValueError, match="strictly descending"):
        InvSRSampler(backbone, ZeroNoisePredictor(), timesteps=[100, 200])
    with pytest.raises(ValueError, match="out of range"):
        InvSRSampler(backbone, ZeroNoisePredictor(), timesteps=[1200])
    with pytest.raises(ValueError, match="multiple of 16"):
        InvSRSampler(backbone, ZeroNoisePredictor(), chopping_size=40)
    with pytest.raises(ValueError, match="color_fix"):
        InvSRSampler(backbone, ZeroNoisePredictor(), color_fix="lab")
    with pytest.raises(ValueError, match="scale"):
        InvSRSampler(backbone, ZeroNoisePredictor(), scale=2)
    sampler = InvSRSampler(backbone, ZeroNoisePredictor(), chopping_size=32)
    with pytest.raises(ValueError, match="num_steps=2"):
        sampler(torch.rand(1, 3, 32, 32), timesteps=[200], num_steps=2)
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        sampler(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="strictly descending"):
        sampler(torch.rand(1, 3, 32, 32), timesteps=[50, 50])


@pytest.mark.parametrize("steps", [[200], [250, 200, 150, 100, 50], [900, 700, 500, 300, 200, 100, 50, 1]])
def test_one_eps_call_per_step(steps: list[int]) -> None:
    backbone = LocalBackbone()
    InvSRSampler(backbone, ZeroNoisePredictor(), chopping_size=32, chopping_batch=8)(
        torch.rand(1, 3, 48, 48), steps
    )
    assert backbone.eps_calls == len(steps)  # 2 x 2 patches in one batch: one call per step
