"""LatentLPIPS: released key layout, strict loading, distance properties, frozen module, missing file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from invsr_pl.losses.perceptual import LPIPS_WEIGHTS_URL, LatentLPIPS, LPIPSWeightsNotFoundError

OFFICIAL = Path("/work/shared/reference/official_state_dicts.json")
REPO_REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "official_state_dicts.json"
# The released latent_lpips layout (INVSR_REFERENCE §3.4), used when the shared reference file is absent.
_CONVS = {
    "slice1": (0, 2),
    "slice2": (5, 7),
    "slice3": (10, 12, 14),
    "slice4": (17, 19, 21),
    "slice5": (24, 26, 28),
}


# sha256 of the released layout "key:d0xd1x...;..." (sorted keys): the check runs even without the JSON.
RELEASED_LAYOUT_SHA256 = "f35742d0f919e22fa1144f0f31131cb6c163356c1c6608ee4cf2a76d05c8f4e7"


def _layout_digest(layout: dict[str, list[int]]) -> str:
    text = ";".join(f"{k}:{'x'.join(map(str, v))}" for k, v in sorted(layout.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _official_layout() -> dict[str, list[int]]:
    for path in (OFFICIAL, REPO_REFERENCE):
        if path.is_file():
            return json.loads(path.read_text())["latent_lpips"]
    # Without the reference file, rebuild the layout from a fresh module (pinned by the digest test).
    torch.manual_seed(0)
    return {k: list(v.shape) for k, v in LatentLPIPS(random_init=True).state_dict().items()}


@pytest.fixture(scope="module")
def lpips() -> LatentLPIPS:
    torch.manual_seed(0)
    return LatentLPIPS(random_init=True)


def _latents(batch: int = 2, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 4, size, size, generator=g)


def test_state_dict_matches_release_and_param_count(lpips: LatentLPIPS) -> None:
    reference = _official_layout()
    ours = {k: list(v.shape) for k, v in lpips.state_dict().items()}
    assert len(ours) == 38 and _layout_digest(ours) == RELEASED_LAYOUT_SHA256
    assert list(ours.items()) == list(reference.items())  # same 38 keys, shapes and order; lin* and lins.*
    assert sum(p.numel() for p in lpips.parameters()) == 14_716_736  # duplicates counted once, §3.4
    assert sorted(k for k in ours if k.startswith("net.")) == sorted(
        f"net.{s}.{i}.{w}" for s, idx in _CONVS.items() for i in idx for w in ("weight", "bias")
    )


def test_strict_load_of_a_38_key_file(tmp_path: Path) -> None:
    reference = _official_layout()
    g = torch.Generator().manual_seed(7)
    state = {k: torch.randn(*shape, generator=g) for k, shape in reference.items()}
    for k in range(5):  # the release stores identical copies of each head
        state[f"lin{k}.model.1.weight"] = state[f"lins.{k}.model.1.weight"].clone()
    path = tmp_path / "vgg16_sdturbo_lpips.pth"
    torch.save(state, path)
    model = LatentLPIPS(weights_path=str(path))
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert model.lin3 is model.lins[3]
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_strict_load_rejects_incomplete_file(tmp_path: Path, lpips: LatentLPIPS) -> None:
    state = {k: v for k, v in lpips.state_dict().items() if not k.startswith("lins.")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="lins.0.model.1.weight"):
        LatentLPIPS(weights_path=str(path))


@pytest.mark.parametrize("weights_path", [None, "does/not/exist.pth"])
def test_missing_weights_is_a_clear_error(weights_path: str | None) -> None:
    with pytest.raises(LPIPSWeightsNotFoundError) as info:
        LatentLPIPS(weights_path=weights_path)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert LPIPS_WEIGHTS_URL in message and "weights/vgg16_sdturbo_lpips.pth" in message
    assert "model.lpips.weights_path" in message


def test_distance_shape_zero_positive_symmetric(lpips: LatentLPIPS) -> None:
    x, y = _latents(batch=3)
    d = lpips(x, y)
    assert d.shape == (3,) and d.dtype == torch.float32
    assert (d > 0).all()
    torch.testing.assert_close(lpips(y, x), d)
    torch.testing.assert_close(lpips(x, x), torch.zeros(3))
    # per-sample: each row only depends on its own pair
    torch.testing.assert_close(lpips(x[1:2], y[1:2]), d[1:2])


def test_half_precision_inputs_follow_weight_dtype(lpips: LatentLPIPS) -> None:
    x, y = _latents()
    d = lpips(x.half(), y.half())
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, lpips(x.half().float(), y.half().float()))


def test_lins_copy_wins_when_the_file_copies_differ(tmp_path: Path, lpips: LatentLPIPS) -> None:
    state = {k: v.clone() for k, v in lpips.state_dict().items()}
    state["lin2.model.1.weight"].fill_(-1.0)
    state["lins.2.model.1.weight"].fill_(2.0)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    model = LatentLPIPS(weights_path=str(path))
    assert (model.lins[2].model[1].weight == 2.0).all()


def test_larger_perturbation_gives_larger_distance(lpips: LatentLPIPS) -> None:
    x, noise = _latents()
    assert (lpips(x, x + 0.05 * noise) < lpips(x, x + 1.0 * noise)).all()


def test_gradient_reaches_input_but_not_parameters(lpips: LatentLPIPS) -> None:
    x, y = _latents()
    x.requires_grad_(True)
    lpips(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())


def test_always_eval_and_frozen(lpips: LatentLPIPS) -> None:
    lpips.train()
    assert not lpips.training and not any(m.training for m in lpips.modules())
    assert not any(p.requires_grad for p in lpips.parameters())


def test_feature_resolutions_for_a_64px_latent(lpips: LatentLPIPS) -> None:
    # First three max-pools removed (§3.2); shapes checked on the meta device so no real 64x64 VGG pass runs.
    meta = LatentLPIPS(random_init=True).to("meta")
    feats = meta.features(torch.empty(1, 4, 64, 64, device="meta"))
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 64, 64),
        (1, 128, 64, 64),
        (1, 256, 64, 64),
        (1, 512, 64, 64),
        (1, 512, 32, 32),
    ]


def test_bad_shapes_raise(lpips: LatentLPIPS) -> None:
    x, y = _latents()
    with pytest.raises(ValueError, match="latents"):
        lpips(x, y[:, :3])
    with pytest.raises(ValueError, match="latents"):
        lpips(x, y[:1])
