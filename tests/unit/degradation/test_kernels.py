"""Blur kernels: normalisation, support, symmetry, per-sample diversity and the sinc cut-off."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules.degradation import kernels as K

TRAIN = dict(
    sinc_prob=0.1,
    type_probs=(0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
    sigma_range=(0.2, 3.0),
    betag_range=(0.5, 4.0),
    betap_range=(1.0, 2.0),
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_kernel_sizes_are_odd_from_3():
    assert K.kernel_sizes(21) == [3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert K.kernel_sizes(7) == [3, 5]
    with pytest.raises(ValueError, match="odd"):
        K.kernel_sizes(20)


def test_kernels_sum_to_one_and_stay_in_support():
    p = K.sample_kernel_params(500, 21, _gen(), **TRAIN)
    k = K.build_kernels(p, 21)
    assert k.shape == (500, 21, 21) and k.dtype == torch.float32
    assert torch.isfinite(k).all()
    torch.testing.assert_close(k.sum(dim=(1, 2)), torch.ones(500), atol=1e-5, rtol=0)
    # Outside each sample's centred ksize x ksize window the kernel is exactly zero.
    half = (p["ksize"] - 1) // 2
    ax = torch.arange(21) - 10
    outside = (ax.abs().view(1, -1, 1) > half.view(-1, 1, 1)) | (
        ax.abs().view(1, 1, -1) > half.view(-1, 1, 1)
    )
    assert (k[outside] == 0).all()
    assert set(p["ksize"].tolist()) <= set(range(3, 21, 2))


def test_all_families_drawn_with_recipe_probabilities():
    n = 20000
    p = K.sample_kernel_params(n, 21, _gen(1), **TRAIN)
    share = torch.bincount(p["type"], minlength=7).float() / n
    expect = torch.tensor([0.45, 0.25, 0.12, 0.03, 0.12, 0.03]) * 0.9
    torch.testing.assert_close(share[:6], expect, atol=0.015, rtol=0)
    assert abs(share[K.SINC].item() - 0.1) < 0.01
    sinc_small = p["omega_c"][(p["type"] == K.SINC) & (p["ksize"] < 13)]
    assert sinc_small.min() >= math.pi / 3 - 1e-6
    sinc_large = p["omega_c"][(p["type"] == K.SINC) & (p["ksize"] >= 13)]
    assert sinc_large.min() < math.pi / 3  # [pi/5, pi] for large kernels
    # Plateau betas: half exactly 1 (U[1, 1]), half in [1, 2].
    beta_p = p["beta"][(p["type"] == 4) | (p["type"] == 5)]
    assert 0.4 < (beta_p == 1).float().mean() < 0.6 and beta_p.max() <= 2


def test_isotropic_kernels_are_symmetric():
    n = 64
    p = K.sample_kernel_params(
        n, 21, _gen(2), **{**TRAIN, "sinc_prob": 0.0, "type_probs": (1, 0, 0, 0, 0, 0)}
    )
    k = K.build_kernels(p, 21)
    torch.testing.assert_close(k, k.flip(-1))
    torch.testing.assert_close(k, k.flip(-2))
    torch.testing.assert_close(k, k.transpose(-1, -2))
    # Anisotropic kernels are point-symmetric but generally not transpose-symmetric.
    pa = K.sample_kernel_params(
        n, 21, _gen(3), **{**TRAIN, "sinc_prob": 0.0, "type_probs": (0, 1, 0, 0, 0, 0)}
    )
    ka = K.build_kernels(pa, 21)
    torch.testing.assert_close(ka, ka.flip(-1).flip(-2))
    assert (ka - ka.transpose(-1, -2)).abs().amax() > 1e-3


def test_gaussian_matches_closed_form():
    size, sigma = 21, 2.0
    p = {
        "type": torch.tensor([0]),
        "sigma_x": torch.tensor([sigma]),
        "sigma_y": torch.tensor([sigma]),
        "theta": torch.tensor([0.0]),
        "beta": torch.tensor([1.0]),
        "ksize": torch.tensor([19]),
        "omega_c": torch.tensor([1.0]),
    }
    k = K.build_kernels(p, size)[0]
    ax = torch.arange(-9, 10, dtype=torch.float32)
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    ref = torch.zeros(size, size)
    ref[1:20, 1:20] = torch.outer(g, g) / torch.outer(g, g).sum()
    torch.testing.assert_close(k, ref)


def test_per_sample_diversity_and_determinism():
    a = K.build_kernels(K.sample_kernel_params(16, 21, _gen(5), **TRAIN), 21)
    b = K.build_kernels(K.sample_kernel_params(16, 21, _gen(5), **TRAIN), 21)
    assert torch.equal(a, b)
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(16)).min() > 0  # no two kernels identical


@pytest.mark.parametrize("omega_c", [math.pi / 4, math.pi / 3, math.pi / 2, 0.8 * math.pi])
def test_sinc_cutoff(omega_c):
    """The circular low-pass passes frequencies below omega_c and suppresses those above it."""
    size = 21
    k = K.sinc_kernels(torch.tensor([omega_c]), torch.tensor([size]), size)[0].double()
    assert abs(k.sum().item() - 1) < 1e-6
    torch.testing.assert_close(k, k.transpose(0, 1))
    n = 256
    spec = torch.fft.fft2(k, s=(n, n)).abs()
    freq = torch.fft.fftfreq(n, dtype=torch.float64) * 2 * math.pi
    radius = torch.sqrt(freq.view(-1, 1) ** 2 + freq.view(1, -1) ** 2)
    # Truncation to 21 taps leaves a transition band and Gibbs ripple; away from omega_c the response is
    # ~1 in the pass band and ~0 in the stop band.
    passband = spec[radius < 0.7 * omega_c]
    stopband = spec[(radius > 1.3 * omega_c) & (radius <= math.pi)]
    assert (passband - 1).abs().max() < 0.2
    assert (passband - 1).abs().mean() < 0.1
    if stopband.numel():
        assert stopband.max() < 0.15
        assert stopband.mean() < 0.03


def test_final_sinc_or_delta():
    p = K.sample_sinc_params(200, 15, _gen(7), prob=0.8)
    k = K.build_sinc_or_delta(p, 15)
    torch.testing.assert_close(k.sum(dim=(1, 2)), torch.ones(200), atol=1e-5, rtol=0)
    delta = K.delta_kernels(1, 15)[0]
    is_delta = (k == delta).flatten(1).all(1)
    assert torch.equal(is_delta, ~p["apply"])
    assert 0.7 < p["apply"].float().mean() < 0.9
    assert p["omega_c"].min() >= math.pi / 3 - 1e-6 and p["omega_c"].max() <= math.pi


def test_bad_type_probs_raise():
    with pytest.raises(ValueError, match="type_probs"):
        K.sample_kernel_params(2, 21, _gen(), **{**TRAIN, "type_probs": (1.0, 0.0)})


@pytest.mark.parametrize("ktype", [1, 3, 5])
def test_anisotropic_families_match_covariance_form(ktype):
    """Rotated-axes evaluation equals exp(-0.5 (x^T S^-1 x)^b) / 1 / (1 + (x^T S^-1 x)^b) with S = R D R^T."""
    sx, sy, theta, beta, size = 2.5, 0.8, 0.6, 1.7, 15
    p = {
        "type": torch.tensor([ktype]),
        "sigma_x": torch.tensor([sx]),
        "sigma_y": torch.tensor([sy]),
        "theta": torch.tensor([theta]),
        "beta": torch.tensor([1.0 if ktype == 1 else beta]),
        "ksize": torch.tensor([13]),
        "omega_c": torch.tensor([1.0]),
    }
    k = K.build_kernels(p, size)[0].double()
    rot = torch.tensor(
        [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64
    )
    inv = torch.linalg.inv(rot @ torch.diag(torch.tensor([sx**2, sy**2], dtype=torch.float64)) @ rot.T)
    ax = torch.arange(-6, 7, dtype=torch.float64)
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    xy = torch.stack([xx, yy], -1)
    q = torch.einsum("...i,ij,...j->...", xy, inv, xy)
    b = 1.0 if ktype == 1 else beta
    ref = 1 / (1 + q**b) if ktype == 5 else torch.exp(-0.5 * q**b)
    ref = ref / ref.sum()
    torch.testing.assert_close(k[1:14, 1:14], ref, atol=1e-6, rtol=1e-4)
    assert (k[0] == 0).all() and (k[:, 0] == 0).all()
