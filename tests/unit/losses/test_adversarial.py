"""Hinge GAN losses: values, signs, per-sample shape, head averaging, gradient directions, clamp."""

from __future__ import annotations

import pytest
import torch

from invsr_pl.losses.adversarial import LATENT_BOUND, clamp_fake, generator_adv_loss, hinge_d_loss

SHAPES = [(2, 1, 2, 2), (2, 1, 4, 4), (2, 1, 8, 8), (2, 1, 8, 8)]  # four heads like the paper D


def _heads(value: float | None = None, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if value is None:
        return [torch.randn(*s, generator=g) for s in SHAPES]
    return [torch.full(s, value) for s in SHAPES]


def test_d_loss_zero_when_margins_met() -> None:
    loss = hinge_d_loss(_heads(1.0), _heads(-1.0))
    assert loss.shape == (2,) and loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.zeros(2))
    torch.testing.assert_close(hinge_d_loss(_heads(5.0), _heads(-3.0)), torch.zeros(2))


def test_d_loss_known_values() -> None:
    # all-zero logits: 0.5 * (1 + 1) = 1 per position
    torch.testing.assert_close(hinge_d_loss(_heads(0.0), _heads(0.0)), torch.ones(2))
    # D completely fooled: real=-1, fake=+1 -> 0.5 * (2 + 2) = 2
    torch.testing.assert_close(hinge_d_loss(_heads(-1.0), _heads(1.0)), torch.full((2,), 2.0))


def test_d_loss_is_mean_over_heads_of_spatial_means() -> None:
    real, fake = _heads(seed=1), _heads(seed=2)
    expected = torch.stack(
        [
            (0.5 * (torch.relu(1 - r) + torch.relu(1 + f))).mean(dim=(1, 2, 3))
            for r, f in zip(real, fake, strict=True)
        ]
    ).mean(0)
    torch.testing.assert_close(hinge_d_loss(real, fake), expected)
    assert (hinge_d_loss(real, fake) >= 0).all()


def test_per_sample_independence() -> None:
    real, fake = _heads(seed=3), _heads(seed=4)
    full = hinge_d_loss(real, fake)
    fake[0][1] += 100.0  # only sample 1 changes
    changed = hinge_d_loss(real, fake)
    assert changed[0] == full[0] and changed[1] > full[1]


def test_generator_loss_values_and_sign() -> None:
    torch.testing.assert_close(generator_adv_loss(_heads(2.0)), torch.full((2,), -2.0))
    torch.testing.assert_close(generator_adv_loss(_heads(-0.5)), torch.full((2,), 0.5))
    fake = _heads(seed=5)
    expected = torch.stack([-f.mean(dim=(1, 2, 3)) for f in fake]).mean(0)
    torch.testing.assert_close(generator_adv_loss(fake), expected)


def test_gradient_directions() -> None:
    real = [x.requires_grad_(True) for x in _heads(0.0)]
    fake = [x.requires_grad_(True) for x in _heads(0.0)]
    hinge_d_loss(real, fake).sum().backward()
    # descending the D loss raises real logits and lowers fake logits
    assert all((r.grad < 0).all() for r in real) and all((f.grad > 0).all() for f in fake)

    fake_g = [x.requires_grad_(True) for x in _heads(seed=6)]
    generator_adv_loss(fake_g).sum().backward()
    # descending the G loss raises the fake logits, with no hinge saturation
    assert all((f.grad < 0).all() for f in fake_g)


def test_half_precision_logits_give_float32() -> None:
    real, fake = [x.half() for x in _heads(seed=7)], [x.half() for x in _heads(seed=8)]
    assert hinge_d_loss(real, fake).dtype == torch.float32
    assert generator_adv_loss(fake).dtype == torch.float32


def test_mismatched_heads_raise() -> None:
    with pytest.raises(ValueError, match="heads"):
        hinge_d_loss(_heads(0.0), _heads(0.0)[:3])
    with pytest.raises(ValueError, match="shapes differ"):
        hinge_d_loss(_heads(0.0), _heads(0.0)[::-1])
    with pytest.raises(ValueError, match="at least one"):
        generator_adv_loss([])
    with pytest.raises(ValueError, match="B=2"):
        generator_adv_loss([torch.zeros(2, 1, 2, 2), torch.zeros(3, 1, 2, 2)])


def test_clamp_fake_bounds_and_gradient() -> None:
    assert LATENT_BOUND == 10.0  # docs/training.md#losses
    z = torch.tensor([-25.0, -9.5, -3.0, 0.0, 9.99, 12.0], requires_grad=True)
    out = clamp_fake(z)
    torch.testing.assert_close(out, torch.tensor([-10.0, -9.5, -3.0, 0.0, 9.99, 10.0]))
    out.sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))
