"""RealESRGANDegradation: output size per scale, 8-bit output, reproducibility, diversity, configs."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.degradation import (
    BicubicDegradation,
    DegradationConfig,
    RealESRGANDegradation,
    imagenet_test_config,
)
from datamodules.degradation.kernels import KERNEL_TYPES


def _photo(name: str) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: a scikit-image photo, or a smooth colour pattern without skimage."""
    try:
        import skimage.data
    except ImportError:  # e.g. a bare GPU box; the statistics tests only need natural-ish content
        yy, xx = torch.meshgrid(torch.linspace(0, 6, 512), torch.linspace(0, 6, 512), indexing="ij")
        phase = float(len(name))
        return torch.stack(
            [(torch.sin(xx * yy / 3 + phase) + 1) / 2, (torch.cos(xx + phase) + 1) / 2, yy / 6]
        )
    return torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def gt() -> torch.Tensor:
    """(8, 3, 64, 64) float32 in [0, 1]: crops of two scikit-image photos."""
    imgs = [_photo("astronaut"), _photo("coffee")]
    return torch.stack([imgs[i % 2][:, 40 * i : 40 * i + 64, 100:164] for i in range(8)])


def _g(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_output_size_range_and_grid(gt, scale):
    deg = RealESRGANDegradation(scale=scale)
    lq = deg(gt, _g())
    assert lq.shape == (8, 3, 64 // scale, 64 // scale) and lq.dtype == torch.float32
    assert lq.min() >= 0 and lq.max() <= 1
    torch.testing.assert_close(lq * 255, (lq * 255).round(), atol=1e-4, rtol=0)


def test_non_square_input():
    lq = RealESRGANDegradation()(torch.rand(2, 3, 48, 96), _g())
    assert lq.shape == (2, 3, 12, 24)


def test_same_seed_same_output_and_params(gt):
    deg = RealESRGANDegradation()
    a, pa = deg(gt, _g(7), return_params=True)
    b, pb = deg(gt, _g(7), return_params=True)
    assert torch.equal(a, b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    c = deg(gt, _g(8))
    assert not torch.equal(a, c)


def test_params_replay_reproduces_output(gt):
    deg = RealESRGANDegradation()
    g = _g(3)
    params = deg.sample_params(8, 64, 64, g)
    state = g.get_state()
    lq = deg(gt, g, params=params)
    g2 = _g(0)
    g2.set_state(state)
    assert torch.equal(deg(gt, g2, params=params), lq)


def test_every_image_gets_its_own_degradation():
    """Eight copies of one image come out different, with different kernels, noise and JPEG qualities."""
    img = _photo("chelsea")[:, :64, :64]
    batch = img.expand(8, -1, -1, -1).contiguous()
    lq, p = RealESRGANDegradation()(batch, _g(1), return_params=True)
    flat = lq.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(8)).min() > 0
    for key in ("first.kernel.sigma_x", "first.jpeg_quality", "first.noise_sigma", "final.jpeg_quality"):
        assert p[key].unique().numel() == 8, key
    # the two resize scales are shared by the batch (one tensor size), as in the official pipeline
    assert p["first.resize_scale"].unique().numel() == 1
    assert p["second.resize_scale"].unique().numel() == 1


def test_per_image_params_are_json(gt):
    deg = RealESRGANDegradation()
    _, p = deg(gt, _g(), return_params=True)
    rows = deg.per_image_params(p)
    assert len(rows) == 8
    text = json.dumps(rows)
    back = json.loads(text)
    assert back[0]["first.kernel.type"] in {*KERNEL_TYPES, "sinc"}
    assert back[0]["final.resize_mode"] in {"area", "bilinear", "bicubic"}
    assert isinstance(back[0]["second.apply"], bool)


def test_zero_strength_config_is_close_to_plain_downscale(gt):
    """With every random stage switched off the pipeline reduces to resize + 8-bit rounding."""
    identity_kernel = {"sinc_prob": 0.0, "type_probs": [1, 0, 0, 0, 0, 0], "sigma_range": [1e-3, 1e-3]}
    deg = RealESRGANDegradation(
        first_stage={
            "kernel": identity_kernel,
            "resize_probs": [0, 0, 1],
            "noise_range": [0, 0],
            "poisson_scale_range": [0, 0],
            "jpeg_range": [100, 100],
        },
        second_stage={"prob": 0.0},
        final_stage={"sinc_prob": 0.0, "jpeg_range": [100, 100], "resize_modes": ["area"]},
        jpeg_codec="kornia",
    )
    lq = deg(gt, _g())
    ref = torch.nn.functional.interpolate(gt, scale_factor=0.25, mode="area")
    # JPEG at quality 100 still subsamples chroma (4:2:0), so "identity" means a high PSNR, not equality.
    psnr = -10 * torch.log10(((lq - ref) ** 2).mean())
    assert psnr > 35


def test_imagenet_test_preset(gt):
    deg = RealESRGANDegradation.imagenet_test()
    assert deg.config == imagenet_test_config()
    lq, p = deg(gt, _g(), return_params=True)
    assert lq.shape == (8, 3, 16, 16)
    assert not p["second.apply"].any()
    assert p["first.kernel.ksize"].max() <= 11 and p["final.sinc.ksize"].max() <= 5
    assert p["final.jpeg_quality"].min() >= 80


def test_config_defaults_are_the_paper_training_settings():
    c = DegradationConfig()
    assert c.first_stage.kernel.size == 21 and c.second_stage.kernel.size == 15
    assert c.second_stage.prob == 0.5 and c.final_stage.sinc_prob == 0.8
    assert c.first_stage.jpeg_range == (30.0, 95.0) and c.final_stage.jpeg_range == (30.0, 95.0)


def test_mapping_kwargs_and_bad_keys():
    deg = RealESRGANDegradation(first_stage={"kernel": {"size": 13}, "blur_prob": 0.5})
    assert deg.config.first_stage.kernel.size == 13 and deg.config.first_stage.blur_prob == 0.5
    with pytest.raises(ValueError, match="unknown key"):
        RealESRGANDegradation(first_stage={"blur_probability": 0.5})
    with pytest.raises(ValueError, match="probability"):
        RealESRGANDegradation(second_stage={"prob": 1.5})
    with pytest.raises(ValueError, match="divisible"):
        RealESRGANDegradation()(torch.rand(1, 3, 30, 30), _g())


def test_generator_device_must_match():
    with pytest.raises(TypeError, match="Generator"):
        RealESRGANDegradation()(torch.rand(1, 3, 16, 16), 0)


def test_bicubic_degradation(gt):
    lq = BicubicDegradation(scale=4)(gt)
    assert lq.shape == (8, 3, 16, 16)
    ref = torch.nn.functional.interpolate(gt, size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
    assert (lq - ref).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.gpu
def test_cpu_cuda_agree_statistically(gt):
    """Generators differ across devices, so agreement is checked on statistics of many degradations."""
    deg = RealESRGANDegradation(jpeg_codec="libjpeg")
    big = gt.repeat(8, 1, 1, 1)  # 64 images
    cpu = deg(big, _g(0))
    cuda = deg(big.cuda(), _g(0, "cuda")).cpu()
    assert cuda.shape == cpu.shape
    ref = torch.nn.functional.interpolate(big, scale_factor=0.25, mode="area")
    e_cpu = (cpu - ref).abs().flatten(1).mean(1)
    e_cuda = (cuda - ref).abs().flatten(1).mean(1)
    assert abs(e_cpu.mean() - e_cuda.mean()) < 0.35 * e_cpu.mean()
    # same params + a fixed-path config give the same image on both devices up to float differences
    det = RealESRGANDegradation(
        first_stage={"noise_range": [0, 0], "poisson_scale_range": [0, 0]},
        second_stage={"noise_range": [0, 0], "poisson_scale_range": [0, 0]},
        jpeg_codec="kornia",
    )
    params = det.sample_params(8, 64, 64, _g(4))
    a = det(gt, _g(0), params=params)
    b = det(gt.cuda(), _g(0, "cuda"), params={k: v.cuda() for k, v in params.items()}).cpu()
    assert (a - b).abs().mean() < 1.5 / 255


def test_output_does_not_depend_on_thread_count(gt):
    """CPU Poisson/JPEG run in fixed chunks on a thread pool only when torch uses > 1 thread: same result."""
    deg = RealESRGANDegradation(
        first_stage={"gaussian_noise_prob": 0.0}, second_stage={"gaussian_noise_prob": 0.0}
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = deg(gt, _g(9))
        torch.set_num_threads(2)
        two = deg(gt, _g(9))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
