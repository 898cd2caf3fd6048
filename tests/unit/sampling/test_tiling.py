"""Padding, patch layout and Gaussian blending (docs/sampling.md)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from invsr_pl.sampling.tiling import (
    gaussian_weights,
    pad_to_min_size,
    pad_to_multiple,
    patch_starts,
    required_multiple,
    tiled_map,
)


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (2, 3), (5, 7), (20, 13), (128, 40)])
def test_pad_to_min_size_keeps_the_original_at_the_reported_offset(size: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *size)
    padded, top, left = pad_to_min_size(x, 32)
    h, w = size
    assert padded.shape == (2, 3, max(h, 32), max(w, 32))
    assert torch.equal(padded[..., top : top + h, left : left + w], x)


def test_pad_to_multiple_pads_bottom_right_only() -> None:
    x = torch.rand(1, 3, 33, 50)
    y = pad_to_multiple(x, 16)
    assert y.shape == (1, 3, 48, 64)
    assert torch.equal(y[..., :33, :50], x)


def test_patch_starts_cover_the_axis_without_overrun() -> None:
    assert patch_starts(100, 128, 64) == [0]
    assert patch_starts(128, 128, 64) == [0]
    assert patch_starts(129, 128, 64) == [0, 1]
    assert patch_starts(300, 128, 64) == [0, 64, 128, 172]
    for length in range(128, 700, 37):
        starts = patch_starts(length, 128, 64)
        assert starts[0] == 0 and starts[-1] == length - 128 and len(set(starts)) == len(starts)
        assert all(b - a <= 128 for a, b in zip(starts, starts[1:], strict=False))


def test_gaussian_weights_match_reference_shape() -> None:
    w = gaussian_weights(512)
    assert w.shape == (512, 512) and w.dtype == torch.float64
    # docs/sampling.md: peak at index L/2 - 1, edge/peak ratio about 0.0042
    assert int(w[255].argmax()) == 255 and w[255, 255] == 1.0
    assert w[255, 0].item() == pytest.approx(0.0042, abs=2e-4)
    assert torch.allclose(w, w.T)


@pytest.mark.parametrize("size", [(64, 64), (100, 77), (161, 129)])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_tiled_map_with_identity_upscaler_reconstructs_exactly(
    size: tuple[int, int], batch_size: int
) -> None:
    x = torch.rand(2, 3, *size)

    def upscale(p: torch.Tensor) -> torch.Tensor:
        assert p.shape[0] <= batch_size and p.shape[-2:] == (64, 64)
        return F.interpolate(p, scale_factor=4, mode="nearest")

    out = tiled_map(x, upscale, patch_size=64, scale=4, batch_size=batch_size)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4 * size[0], 4 * size[1])
    torch.testing.assert_close(out, F.interpolate(x, scale_factor=4, mode="nearest"), atol=1e-6, rtol=0)


def test_tiled_map_calls_fn_in_fixed_order_and_checks_sizes() -> None:
    x = torch.rand(1, 3, 96, 96)
    seen: list[int] = []

    def fn(p: torch.Tensor) -> torch.Tensor:
        seen.append(p.shape[0])
        return p

    tiled_map(x, fn, patch_size=64, scale=1, batch_size=2)
    assert seen == [2, 2]  # 2 x 2 patches at stride 32
    with pytest.raises(ValueError, match="smaller than the patch size"):
        tiled_map(torch.rand(1, 3, 20, 80), fn, patch_size=32, scale=1)
    with pytest.raises(ValueError, match="expected"):
        tiled_map(x, lambda p: p[..., :10, :10], patch_size=64, scale=1)


def test_required_multiple() -> None:
    assert required_multiple(8, 8, 4) == 16  # SD-Turbo x4 (docs/sampling.md mod_lq)
    assert required_multiple(8, 8, 2) == 32
    assert required_multiple(8, 2, 4) == 4
