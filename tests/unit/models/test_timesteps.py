"""Timestep/sigma conventions against the reference table (docs/conventions.md)."""

from __future__ import annotations

import pytest
import torch

from invsr_pl.models import timesteps as ts

# docs/conventions.md: user timestep -> sigma.
REFERENCE_SIGMAS = {50: 0.223004, 100: 0.341674, 150: 0.453819, 200: 0.569285, 250: 0.693205}


@pytest.fixture(scope="module")
def sigmas() -> torch.Tensor:
    return ts.sd_turbo_sigmas()


def test_sigma_table_matches_reference(sigmas: torch.Tensor) -> None:
    assert sigmas.shape == (1000,) and sigmas.dtype == torch.float32
    for t, expected in REFERENCE_SIGMAS.items():
        got = ts.lookup_sigma(sigmas, ts.to_index(t))
        assert got.item() == pytest.approx(expected, abs=1e-5), t
    assert torch.all(sigmas[1:] > sigmas[:-1])
    assert sigmas[0].item() == pytest.approx(0.029168, abs=1e-5)
    assert sigmas[-1].item() == pytest.approx(14.6146, abs=1e-3)


def test_sigma_table_equals_scheduler_sigmas(sigmas: torch.Tensor) -> None:
    # The official code flips the scheduler's descending 1001-entry table and drops the trailing 0.
    sched = ts.build_scheduler()
    flipped = sched.sigmas.flip(0)[1:].to(torch.float32)
    torch.testing.assert_close(sigmas, flipped, atol=1e-5, rtol=1e-5)


def test_lookup_sigma_batch_and_device(sigmas: torch.Tensor) -> None:
    idx = ts.to_index([200, 100, 200])
    got = ts.lookup_sigma(sigmas, idx)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert got[0] == got[2]
    with pytest.raises(ValueError, match="out of range"):
        ts.lookup_sigma(sigmas, torch.tensor([1000]))


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, [200]),
        (2, [200, 100]),
        (3, [200, 100, 50]),
        (4, [200, 150, 100, 50]),
        (5, [250, 200, 150, 100, 50]),
        (6, [250, 208, 166, 125, 83, 41]),
        (10, [250, 225, 200, 175, 150, 125, 100, 75, 50, 25]),
    ],
)
def test_default_timesteps(n: int, expected: list[int]) -> None:
    assert ts.default_timesteps(n) == expected


def test_default_timesteps_many_and_errors() -> None:
    assert ts.default_timesteps(250) == list(range(250, 0, -1))
    for bad in (0, -1, 251):
        with pytest.raises(ValueError, match="num_steps"):
            ts.default_timesteps(bad)


def test_validate_timesteps() -> None:
    assert ts.validate_timesteps([250, 200, 1]) == [250, 200, 1]
    assert ts.validate_timesteps(200) == [200]
    assert ts.validate_timesteps(torch.tensor([200, 100])) == [200, 100]
    with pytest.raises(ValueError, match="empty"):
        ts.validate_timesteps([])
    with pytest.raises(ValueError, match="descending"):
        ts.validate_timesteps([100, 200])
    with pytest.raises(ValueError, match="descending"):
        ts.validate_timesteps([200, 200])
    with pytest.raises(ValueError, match="out of range"):
        ts.validate_timesteps([1001])
    with pytest.raises(ValueError, match="out of range"):
        ts.validate_timesteps([200, 0])
    with pytest.raises(ValueError, match="integers"):
        ts.validate_timesteps([200.5])
    with pytest.raises(ValueError, match="int"):
        ts.validate_timesteps("200")


def test_to_index() -> None:
    assert ts.to_index(200).item() == 199 and ts.to_index(200).ndim == 0
    idx = ts.to_index([200, 100])
    assert idx.dtype == torch.long and idx.tolist() == [199, 99]
    assert ts.to_index(torch.tensor([1, 1000])).tolist() == [0, 999]
    for bad in (0, 1001, [200, 0]):
        with pytest.raises(ValueError, match="1, 1000"):
            ts.to_index(bad)
    with pytest.raises(ValueError, match="integer"):
        ts.to_index(torch.tensor([200.0]))


def test_ve_vp_conversions(sigmas: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 3, 3, generator=g)
    eps = torch.randn(2, 4, 3, 3, generator=g)
    sigma = ts.lookup_sigma(sigmas, ts.to_index([200, 100]))
    z_t = ts.add_noise(z0, eps, sigma)
    # UNet input equals the VP sample sqrt(abar) z0 + sqrt(1 - abar) eps (docs/conventions.md).
    abar = 1.0 / (1.0 + sigma**2)
    vp = abar.sqrt().view(-1, 1, 1, 1) * z0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(ts.scale_model_input(z_t, sigma), vp)
    torch.testing.assert_close(ts.x0_from_eps(z_t, eps, sigma), z0)
    # Scalar sigma broadcasts; a wrong-length sigma is rejected.
    torch.testing.assert_close(ts.scale_model_input(z_t, 0.0), z_t)
    with pytest.raises(ValueError, match="batch"):
        ts.scale_model_input(z_t, torch.ones(3))


def test_batch_index_rules() -> None:
    """The one index check of the backbone, noise predictor and discriminator."""
    assert ts.batch_index(199, 3).tolist() == [199] * 3
    assert ts.batch_index(torch.tensor(99), 2).tolist() == [99, 99]
    assert ts.batch_index(torch.tensor([49]), 2).tolist() == [49, 49]
    out = ts.batch_index(torch.tensor([1, 2], dtype=torch.int32), 2)
    assert out.dtype == torch.long and out.tolist() == [1, 2]
    for bad in (199.0, True, torch.tensor([1.0, 2.0]), torch.tensor([True, False]), torch.tensor([1, 2, 3]),
                torch.zeros(2, 2, dtype=torch.long)):  # fmt: skip
        with pytest.raises(ValueError, match="index"):
            ts.batch_index(bad, 2)


@pytest.mark.parametrize("network", ["noise_predictor", "discriminator", "backbone"])
def test_networks_share_the_index_rules(network: str) -> None:
    from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_discriminator, tiny_noise_predictor

    with torch.no_grad():
        if network == "noise_predictor":
            model, x = tiny_noise_predictor(seed=0), torch.rand(2, 3, 8, 8)
            run = lambda index: model(x, index).mean  # noqa: E731
        elif network == "discriminator":
            model, x = tiny_discriminator(seed=0), torch.randn(2, 4, 8, 8)
            run = lambda index: model(x, index, torch.randn(2, 7, 32))[0]  # noqa: E731
        else:
            model, x = build_tiny_sd_turbo(seed=0), torch.randn(2, 4, 8, 8)
            run = lambda index: model.predict_eps(x, index)  # noqa: E731
        assert run(torch.tensor([199])).shape[0] == 2  # (1,) broadcast everywhere
        for bad in (torch.tensor([199.0, 99.0]), torch.tensor([1, 2, 3])):
            with pytest.raises(ValueError, match="index"):
                run(bad)
