"""InvSRSampler: Algorithm 1, any-size tiling, determinism, colour fix (docs/sampling.md).

Two kinds of backbone: the project's tiny random SD-Turbo (real code paths: shapes, ranges, determinism,
UNet calls per step) and a *local* stand-in whose encode/decode/eps are pixel-local and noise-free, so that a
patched run can be compared with an unpatched one and alignment can be checked by eye-like measurements.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

from invsr_pl.models import timesteps as ts
from invsr_pl.sampling.sampler import STAGES, InvSRSampler


class LocalBackbone(nn.Module):
    """Stand-in with the FrozenSDTurbo interface and pixel-local, deterministic ops.

    encode: 8x8 average pool (RGB + grey as the 4th channel); decode: nearest x8 of the first three channels;
    predict_eps: 0 (so x0_hat is the start state). With a zero-noise predictor the whole sampler is then the
    local map ``nearest8(avgpool8(bicubic4(lr)))``.
    """

    vae_scale_factor = 8
    latent_multiple = 8  # as SD-Turbo's UNet
    latent_channels = 4
    dtype = torch.float32

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("sigmas", ts.sd_turbo_sigmas())
        self.eps_calls = 0

    @property
    def device(self) -> torch.device:
        return self.sigmas.device

    def sigma(self, index: Tensor) -> Tensor:
        return self.sigmas[index]

    def encode(
        self, image: Tensor, generator=None, sample: bool = True, noise: Tensor | None = None
    ) -> Tensor:
        pooled = F.avg_pool2d(image, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)

    def decode(self, latent: Tensor) -> Tensor:
        return F.interpolate(latent[:, :3], scale_factor=8, mode="nearest").clamp(0, 1)

    def predict_eps(self, z_t: Tensor, index: Tensor) -> Tensor:
        assert index.shape == (z_t.shape[0],) and index.dtype == torch.long
        self.eps_calls += 1
        return torch.zeros_like(z_t)

    def denoise(self, z_t: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return z_t, self.predict_eps(z_t, index)  # eps = 0: x0_hat = z_t

    def renoise(self, x0: Tensor, eps: Tensor, index: Tensor) -> Tensor:
        return x0 + self.sigma(index).view(-1, 1, 1, 1) * eps

    def invert_step(self, z_lq: Tensor, noise: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.denoise(z_lq + self.sigma(index).view(-1, 1, 1, 1) * noise, index)


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
    with pytest.raises(ValueError, match="h, w >= 1"):
        sampler(torch.rand(1, 3, 0, 32))
    with pytest.raises(ValueError, match="strictly descending"):
        sampler(torch.rand(1, 3, 32, 32), timesteps=[50, 50])


@pytest.mark.parametrize("steps", [[200], [250, 200, 150, 100, 50], [900, 700, 500, 300, 200, 100, 50, 1]])
def test_one_eps_call_per_step(steps: list[int]) -> None:
    backbone = LocalBackbone()
    InvSRSampler(backbone, ZeroNoisePredictor(), chopping_size=32, chopping_batch=8)(
        torch.rand(1, 3, 48, 48), steps
    )
    assert backbone.eps_calls == len(steps)  # 2 x 2 patches in one batch: one call per step


# ---------------------------------------------------------------------------------- tiny SD-Turbo


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, nn.Module]:
    from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_noise_predictor

    return build_tiny_sd_turbo(seed=0), tiny_noise_predictor(seed=0).eval()


def test_tiny_sampler_shapes_range_and_determinism(tiny: tuple[nn.Module, nn.Module]) -> None:
    backbone, noise_predictor = tiny
    sampler = InvSRSampler(backbone, noise_predictor, num_steps=2, chopping_size=32)
    lr = torch.rand(2, 3, 21, 30)
    a = sampler(lr, generator=torch.Generator().manual_seed(3))
    b = sampler(lr, generator=torch.Generator().manual_seed(3))
    c = sampler(lr, generator=torch.Generator().manual_seed(4))
    assert a.shape == (2, 3, 84, 120) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, sampler(lr, generator=3))  # an int seed is a CPU generator seeded with it


def test_half_backbone_runs_noise_predictor_under_autocast(tiny: tuple[nn.Module, nn.Module]) -> None:
    """docs/sampling.md: fp32 noise-predictor weights under autocast in a half backbone (bf16 on CPU)."""
    from invsr_pl.models.tiny import build_tiny_sd_turbo

    _, noise_predictor = tiny
    seen: list[torch.dtype] = []
    hook = noise_predictor.encoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        lr = torch.rand(1, 3, 32, 32)
        full = InvSRSampler(build_tiny_sd_turbo(seed=0), noise_predictor)(lr, generator=1)
        half = InvSRSampler(build_tiny_sd_turbo(seed=0, dtype="bfloat16"), noise_predictor)(lr, generator=1)
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert next(noise_predictor.parameters()).dtype == torch.float32  # weights untouched
    assert half.dtype == torch.float32 and (half - full).abs().mean() < 0.05


@pytest.mark.parametrize("steps", [[200], [200, 150, 100, 50], [700, 600, 500, 400, 300, 200, 100]])
def test_tiny_unet_runs_once_per_step(tiny: tuple[nn.Module, nn.Module], steps: list[int]) -> None:
    backbone, noise_predictor = tiny
    calls: list[tuple[int, ...]] = []
    encodes: list[int] = []
    hooks = [
        backbone.unet.register_forward_hook(lambda m, args, out: calls.append(tuple(args[1].tolist()))),
        backbone.vae.encoder.register_forward_hook(lambda m, args, out: encodes.append(1)),
    ]
    try:
        # 48x48 LR at chopping 32 = 2 x 2 patches, one batch of 4
        sr = InvSRSampler(backbone, noise_predictor, chopping_size=32, chopping_batch=4)(
            torch.rand(1, 3, 48, 48), timesteps=steps, generator=0
        )
    finally:
        for h in hooks:
            h.remove()
    assert sr.shape == (1, 3, 192, 192)
    assert [c[0] for c in calls] == [t - 1 for t in steps]  # index t - 1, one UNet call per step
    assert all(len(set(c)) == 1 and len(c) == 4 for c in calls)
    assert len(encodes) == 1  # the VAE encodes once per patch batch


def test_tiny_invert_and_sample_patch(tiny: tuple[nn.Module, nn.Module]) -> None:
    backbone, noise_predictor = tiny
    sampler = InvSRSampler(backbone, noise_predictor, num_steps=6)
    assert sampler.timesteps == ts.default_timesteps(6) and len(sampler.timesteps) == 6
    lr = torch.rand(2, 3, 16, 24)
    z0 = sampler.invert(lr, [250, 30], generator=torch.Generator().manual_seed(0))
    assert z0.shape == (2, 4, 8, 12) and z0.dtype == torch.float32
    img = sampler.sample_patch(lr, [250, 30], generator=torch.Generator().manual_seed(0))
    assert img.shape == (2, 3, 64, 96) and img.min() >= 0 and img.max() <= 1
    torch.testing.assert_close(img, backbone.decode(z0))
    with pytest.raises(ValueError, match="multiple of 4"):
        sampler.invert(torch.rand(1, 3, 18, 24), [200])


def test_tiny_sampler_without_chopping_matches_single_patch(tiny: tuple[nn.Module, nn.Module]) -> None:
    backbone, noise_predictor = tiny
    lr = torch.rand(1, 3, 32, 32)
    whole = InvSRSampler(backbone, noise_predictor, chopping_size=None)(lr, generator=5)
    one_patch = InvSRSampler(backbone, noise_predictor, chopping_size=32)(lr, generator=5)
    torch.testing.assert_close(whole, one_patch, atol=1e-6, rtol=0)
