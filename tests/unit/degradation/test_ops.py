"""Pure degradation ops: shapes, ranges, identity at zero strength, determinism, per-sample parameters."""

from __future__ import annotations

import pytest
import skimage.data
import torch

from datamodules.degradation import ops
from datamodules.degradation.kernels import delta_kernels


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """(4, 3, 64, 64) float32 in [0, 1] on the 8-bit grid: crops of scikit-image photos."""
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        a = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255.0
        out.append(a[:, 100:164, 150:214])
    return torch.stack(out)


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_filter2d_delta_is_identity(photos):
    torch.testing.assert_close(ops.filter2d(photos, delta_kernels(4, 21)), photos)


def test_filter2d_per_sample_kernel(photos):
    k = delta_kernels(4, 5)
    k[1] = 1.0 / 25  # box blur only for sample 1
    y = ops.filter2d(photos, k)
    assert y.shape == photos.shape
    torch.testing.assert_close(y[[0, 2, 3]], photos[[0, 2, 3]])
    assert (y[1] - photos[1]).abs().mean() > 1e-3
    # box blur keeps the mean of the interior and the range
    assert y[1].min() >= photos[1].min() - 1e-6 and y[1].max() <= photos[1].max() + 1e-6


def test_filter2d_tiny_image_falls_back_to_replicate():
    x = torch.rand(2, 3, 4, 4)
    k = torch.full((2, 11, 11), 1 / 121)
    assert ops.filter2d(x, k).shape == x.shape


@pytest.mark.parametrize("size", [(32, 32), (80, 48), (9, 9)])
def test_resize_shape_and_per_sample_modes(photos, size):
    modes = torch.tensor([0, 1, 2, 1])
    y = ops.resize(photos, size, modes)
    assert y.shape == (4, 3, *size)
    for i in range(4):
        ref = ops.resize(photos[i : i + 1], size, ops.RESIZE_MODES[int(modes[i])])
        torch.testing.assert_close(y[i : i + 1], ref)
    with pytest.raises(ValueError, match="unknown resize mode"):
        ops.resize(photos, size, "nearest")


def test_gaussian_noise(photos):
    zero = ops.add_gaussian_noise(photos, torch.zeros(4), torch.zeros(4, dtype=torch.bool), _g())
    torch.testing.assert_close(zero, photos)
    sigma = torch.tensor([0.0, 5.0, 20.0, 20.0]) / 255
    gray = torch.tensor([False, False, False, True])
    mid = torch.full((4, 3, 64, 64), 0.5)
    y = ops.add_gaussian_noise(mid, sigma, gray, _g(), clip=False)
    std = (y - mid).flatten(1).std(dim=1)
    torch.testing.assert_close(std, sigma, atol=0.01 * 20 / 255, rtol=0.05)
    d = y - mid
    torch.testing.assert_close(d[3, 0], d[3, 2])  # gray: one map
    assert not torch.equal(d[2, 0], d[2, 1])
    clipped = ops.add_gaussian_noise(photos, torch.full((4,), 0.5), gray, _g())
    assert clipped.min() >= 0 and clipped.max() <= 1
    a = ops.add_gaussian_noise(photos, sigma, gray, _g(3))
    b = ops.add_gaussian_noise(photos, sigma, gray, _g(3))
    assert torch.equal(a, b)


def test_poisson_levels_exact(photos):
    q = ops.quantize_8bit(photos)
    levels = ops.poisson_levels(q)
    for i in range(4):
        n = torch.unique(q[i]).numel()
        assert levels[i].item() == 2 ** torch.ceil(torch.log2(torch.tensor(float(n)))).item()
    two_level = torch.zeros(1, 3, 8, 8)
    two_level[..., :4] = 1.0
    assert ops.poisson_levels(two_level).item() == 2


def test_poisson_noise(photos):
    gray = torch.tensor([False, True, False, True])
    zero = ops.add_poisson_noise(photos, torch.zeros(4), gray, _g())
    torch.testing.assert_close(zero, photos)
    y = ops.add_poisson_noise(photos, torch.tensor([1.0, 1.0, 3.0, 3.0]), gray, _g(1), clip=False)
    d = y - photos
    torch.testing.assert_close(d[1, 0], d[1, 2])  # gray: one noise map for all channels
    assert (d[0, 0] - d[0, 2]).abs().max() > 1e-3
    # Poisson(q v) / v - q has variance q / v (v = 256 here: the ramp has all 256 levels).
    mid = ops.quantize_8bit(torch.linspace(0, 1, 3 * 128 * 128).view(1, 3, 128, 128))
    n = ops.add_poisson_noise(mid, 1.0, False, _g(2), clip=False) - mid
    expect = torch.sqrt(mid / 256).mean()
    assert abs(n.abs().mean() / (expect * 0.7979) - 1) < 0.1  # E|N(0, s)| = s sqrt(2/pi)
    assert torch.isfinite(y).all()


def test_add_noise_mixes_kinds_per_sample(photos):
    gaussian = torch.tensor([True, False, True, False])
    y = ops.add_noise(
        photos,
        gaussian,
        torch.full((4,), 10 / 255),
        torch.full((4,), 1.0),
        torch.zeros(4, dtype=torch.bool),
        _g(),
    )
    assert y.shape == photos.shape and y.min() >= 0 and y.max() <= 1
    assert (y - photos).abs().mean() > 1e-3


@pytest.mark.parametrize("codec", ["libjpeg", "kornia"])
def test_jpeg(photos, codec):
    q = torch.tensor([30.0, 50.0, 80.0, 95.0])
    y = ops.jpeg(photos, q, codec)
    assert y.shape == photos.shape and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1
    err = (y - photos).abs().flatten(1).mean(1)
    assert err[0] > err[3]  # lower quality, larger error
    assert err.max() < 0.05
    hq = ops.jpeg(photos, torch.full((4,), 100.0), codec)
    assert (hq - photos).abs().mean() < 0.01  # near identity at quality 100
    assert torch.equal(ops.jpeg(photos, q, codec), y)  # deterministic
    # per-sample quality: sample i equals its own single-image call
    torch.testing.assert_close(y[1:2], ops.jpeg(photos[1:2], q[1:2], codec), atol=1e-6, rtol=0)


def test_jpeg_odd_size_and_bad_codec():
    x = torch.rand(2, 3, 37, 53)
    assert ops.jpeg(x, 60.0, "libjpeg").shape == x.shape
    assert ops.jpeg(x, 60.0, "kornia").shape == x.shape
    with pytest.raises(ValueError, match="JPEG codec"):
        ops.jpeg(x, 60.0, "pil")


def test_quantize_8bit():
    x = torch.tensor([-0.1, 0.0, 0.5, 1.0, 1.2, 0.0021])
    y = ops.quantize_8bit(x)
    assert y.min() == 0 and y.max() == 1
    torch.testing.assert_close(y * 255, (y * 255).round())
    assert y[-1] == 1 / 255


def test_bad_input_raises():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ops.filter2d(torch.rand(3, 8, 8), torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="per-sample"):
        ops.add_gaussian_noise(torch.rand(2, 3, 8, 8), torch.ones(3), False, _g())
