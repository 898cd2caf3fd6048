"""Colour corrections (docs/sampling.md)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.color
import skimage.data
import torch
import torch.nn.functional as F

from invsr_pl.sampling.color_fix import (
    COLOR_FIX_METHODS,
    adain_color_fix,
    apply_color_fix,
    rgb_to_ycbcr_bt601,
    upsample_reference,
    wavelet_color_fix,
    ycbcr_bt601_to_rgb,
    ycbcr_color_fix,
)


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """(1, 3, 128, 128) crop of scikit-image's astronaut, float32 in [0, 1]."""
    return torch.from_numpy(skimage.data.astronaut()[100:228, 150:278]).permute(2, 0, 1)[None].float() / 255


def test_ycbcr_matches_matlab_and_round_trips(photo: torch.Tensor) -> None:
    ycc = rgb_to_ycbcr_bt601(photo)
    reference = (
        skimage.color.rgb2ycbcr(photo[0].permute(1, 2, 0).numpy()) / 255.0
    )  # MATLAB BT.601 studio swing
    np.testing.assert_allclose(ycc[0].permute(1, 2, 0).numpy(), reference, atol=1e-5)
    assert ycc[:, 0].min() >= 16 / 255 - 1e-6 and ycc[:, 0].max() <= 235 / 255 + 1e-6
    torch.testing.assert_close(ycbcr_bt601_to_rgb(ycc), photo, atol=1e-4, rtol=0)


def test_ycbcr_fix_takes_luma_from_sr_and_chroma_from_reference(photo: torch.Tensor) -> None:
    ref = photo * 0.8 + 0.1  # a desaturated version: Y(photo) + CbCr(ref) stays mostly inside the RGB cube
    out = ycbcr_color_fix(photo, ref)
    got, want_sr, want_ref = rgb_to_ycbcr_bt601(out), rgb_to_ycbcr_bt601(photo), rgb_to_ycbcr_bt601(ref)
    # clamping to the RGB cube may move a few out-of-gamut pixels; most must match exactly
    assert ((got[:, 0] - want_sr[:, 0]).abs() < 2e-3).float().mean() > 0.95
    assert ((got[:, 1:] - want_ref[:, 1:]).abs() < 2e-3).float().mean() > 0.95


def test_wavelet_fix_transfers_low_frequencies(photo: torch.Tensor) -> None:
    tinted = (photo * torch.tensor([0.7, 1.0, 1.2]).view(1, 3, 1, 1)).clamp(0, 1)
    out = wavelet_color_fix(tinted, photo)
    assert out.shape == photo.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    # the channel means (lowest frequency) follow the reference, the tint is gone
    torch.testing.assert_close(out.mean((2, 3)), photo.mean((2, 3)), atol=0.02, rtol=0)
    assert (tinted.mean((2, 3)) - photo.mean((2, 3))).abs().max() > 0.05
    # identical inputs: identity
    torch.testing.assert_close(wavelet_color_fix(photo, photo), photo, atol=1e-5, rtol=0)
    # a smooth reference changes high frequencies of the SR image little: edges survive
    high_sr = photo - F.avg_pool2d(photo, 3, 1, 1)
    high_out = wavelet_color_fix(photo, torch.full_like(photo, 0.5)) - F.avg_pool2d(
        wavelet_color_fix(photo, torch.full_like(photo, 0.5)), 3, 1, 1
    )
    assert torch.corrcoef(torch.stack([high_sr.flatten(), high_out.flatten()]))[0, 1] > 0.9


def test_adain_matches_reference_statistics(photo: torch.Tensor) -> None:
    ref = (photo * 0.5 + 0.3).clamp(0, 1)
    out = adain_color_fix(photo, ref)
    torch.testing.assert_close(out.mean((2, 3)), ref.mean((2, 3)), atol=1e-3, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), ref.std(dim=(2, 3)), atol=1e-3, rtol=0)


def test_none_is_identity_and_unknown_method_errors(photo: torch.Tensor) -> None:
    assert torch.equal(apply_color_fix(photo, photo.flip(-1), "none"), photo)
    for method in COLOR_FIX_METHODS:
        assert apply_color_fix(photo, photo, method).shape == photo.shape
    with pytest.raises(ValueError, match="unknown colour fix"):
        apply_color_fix(photo, photo, "lab")
    with pytest.raises(ValueError, match="must equal"):
        apply_color_fix(photo, photo[..., :64], "wavelet")


def test_upsample_reference_is_unclamped_antialiased_bicubic(photo: torch.Tensor) -> None:
    """As the official code: the bicubic overshoot reaches the colour fixes unclamped; their outputs clamp."""
    lr = photo[..., :30, :17]
    ref = upsample_reference(lr, (120, 68))
    want = torch.nn.functional.interpolate(lr, size=(120, 68), mode="bicubic", antialias=True)
    assert ref.shape == (1, 3, 120, 68) and ref.dtype == torch.float32
    torch.testing.assert_close(ref, want, atol=0, rtol=0)
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0  # a hard edge: bicubic rings beyond [0, 1]
    ringing = upsample_reference(step, (32, 32))
    assert ringing.min() < 0 and ringing.max() > 1
    for method in ("wavelet", "ycbcr", "adain"):
        out = apply_color_fix(torch.full_like(ringing, 0.5), ringing, method)
        assert out.min() >= 0 and out.max() <= 1
