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
# The released latent_lpips layout (docs/method.md "Latent LPIPS"), used when the reference file is absent.
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
    # duplicates counted once (docs/checkpoints.md#released-weight-files)
    assert sum(p.numel() for p in lpips.parameters()) == 14_716_736
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
    # First three max-pools removed (docs/method.md#latent-lpips); shapes checked on the meta device so no
    # real 64x64 VGG pass runs.
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


# ---------------------------------------------------------------- training the metric (docs/latent_lpips.md)
def test_tiny_and_wide_twins_keep_the_released_keys() -> None:
    reference = _official_layout()
    tiny = LatentLPIPS(random_init=True, base_channels=8, in_channels=16)
    shapes = {k: tuple(v.shape) for k, v in tiny.state_dict().items()}
    assert list(shapes) == list(reference)
    assert shapes["net.slice1.0.weight"] == (8, 16, 3, 3) and shapes["lins.4.model.1.weight"] == (1, 64, 1, 1)
    d = tiny(torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8))
    assert d.shape == (2,) and (d > 0).all()
    with pytest.raises(ValueError, match="base_channels"):
        LatentLPIPS(random_init=True, base_channels=12)


def test_save_weights_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = LatentLPIPS(random_init=True, base_channels=8)
    with torch.no_grad():
        model.lins[1].model[1].weight.uniform_(0, 1)
    path = model.save_weights(tmp_path / "sub" / "latent_lpips.pth")
    state = torch.load(path, weights_only=True)
    assert list(state) == list(_official_layout())  # the released key layout and order
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in state.values())
    assert torch.equal(state["lin1.model.1.weight"], state["lins.1.model.1.weight"])
    assert state["lin1.model.1.weight"].data_ptr() != state["lins.1.model.1.weight"].data_ptr()
    loaded = LatentLPIPS(weights_path=str(path), base_channels=8)
    assert loaded.weights_source == str(path)
    x, y = _latents()
    torch.testing.assert_close(loaded(x, y), model(x, y))
    assert [p.name for p in path.parent.iterdir()] == ["latent_lpips.pth"]  # no temporary file left
    with pytest.raises(ValueError, match="set in_channels / base_channels"):
        LatentLPIPS(weights_path=str(path))  # a tiny file into a full-width module


def test_full_width_export_loads_strictly(tmp_path: Path, lpips: LatentLPIPS) -> None:
    path = lpips.save_weights(tmp_path / "vgg16_latent_lpips.pth")
    loaded = LatentLPIPS(weights_path=str(path))
    for key, value in lpips.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_imagenet_trunk_widens_conv1_from_channel_0(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {k: v.shape for k, v in LatentLPIPS(random_init=True).net.state_dict().items()}
    state = {}
    for key, shape in shapes.items():  # torchvision's names: features.<index>.<weight|bias>
        index, kind = key.split(".")[1:]
        shape = (64, 3, 3, 3) if key == "slice1.0.weight" else tuple(shape)
        state[f"features.{index}.{kind}"] = torch.randn(*shape, generator=g)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, path)
    model = LatentLPIPS(random_init=True, imagenet_trunk=True, vgg16_weights_path=str(path), in_channels=4)
    conv1 = model.net.slice1[0].weight
    assert torch.equal(conv1, state["features.0.weight"][:, :1].repeat(1, 4, 1, 1))
    assert torch.equal(model.net.slice1[0].bias, state["features.0.bias"])
    assert torch.equal(model.net.slice5.get_submodule("28").weight, state["features.28.weight"])


def test_imagenet_trunk_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        LatentLPIPS(random_init=True, imagenet_trunk=True, vgg16_weights_path=str(tmp_path / "v.pth"))
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and str(tmp_path / "v.pth") in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    with pytest.raises(ValueError, match="random_init"):
        LatentLPIPS(weights_path="x.pth", imagenet_trunk=True)
    with pytest.raises(ValueError, match="base_channels=64"):
        LatentLPIPS(random_init=True, imagenet_trunk=True, base_channels=8)


def test_lin_and_tune_modes_and_head_clamp() -> None:
    model = LatentLPIPS(random_init=True, base_channels=8)
    model.set_trainable(heads=True, trunk=False)  # "lin"
    assert all(p.requires_grad for p in model.lins.parameters())
    assert not any(p.requires_grad for p in model.net.parameters())
    model.train()
    assert model.training and model.lins[0].model[0].training  # dropout in the heads while training
    model.set_trainable(heads=True, trunk=True)  # "tune"
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.lins[2].model[1].weight.fill_(-1.0)
    model.clamp_heads_()
    assert (model.lin2.model[1].weight == 0).all()
    model.set_trainable(heads=False, trunk=False)  # frozen again: eval whatever is asked
    assert not model.train().training


def test_distances_2afc_match_two_forward_calls(lpips: LatentLPIPS) -> None:
    ref, p0 = _latents(seed=1)
    p1 = _latents(seed=2)[0]
    d0, d1 = lpips.distances_2afc(ref, p0, p1)
    torch.testing.assert_close(d0, lpips(ref, p0))
    torch.testing.assert_close(d1, lpips(ref, p1))


def test_ranker_learns_a_judgment_rule() -> None:
    from invsr_pl.losses.perceptual import TwoAFCRanker

    torch.manual_seed(0)
    ranker = TwoAFCRanker()
    d0, d1 = torch.rand(256), torch.rand(256)
    judge = (d1 < d0).float()
    logits = ranker(d0, d1)
    assert logits.shape == (256,)
    expected = torch.nn.functional.binary_cross_entropy(torch.sigmoid(logits), judge)
    torch.testing.assert_close(ranker.loss(d0, d1, judge), expected)
    opt = torch.optim.Adam(ranker.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        loss = ranker.loss(d0, d1, judge)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3
