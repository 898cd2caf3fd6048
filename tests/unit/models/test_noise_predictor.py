"""NoisePredictor: paper layout vs the released checkpoint, shapes per scale, gradients, checkpoint I/O."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import load_file, save_file

from invsr_pl.models.noise_predictor import NoisePredictor
from invsr_pl.models.tiny import TINY_NOISE_PREDICTOR, tiny_noise_predictor

OFFICIAL = Path("/work/shared/reference/official_state_dicts.json")


def _public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def small(**overrides) -> NoisePredictor:
    return tiny_noise_predictor(seed=0, **overrides)


# sha256 of the sorted "key:shape" lines of official_state_dicts.json["noise_predictor"], so that the layout
# check also runs where the JSON is not available (CI).
OFFICIAL_LAYOUT_SHA256 = "4b2ed52267cf9e2d8c5a085a64123493de55fa2d6e98b4e3cb65b589d4725035"


def _layout_digest(layout: dict[str, list[int]]) -> str:
    text = "\n".join(f"{k}:{','.join(map(str, v))}" for k, v in sorted(layout.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def test_paper_config_matches_released_checkpoint_layout() -> None:
    model = NoisePredictor()
    assert sum(p.numel() for p in model.parameters()) == 33_837_576  # docs/method.md
    layout = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(layout) == 164
    assert _layout_digest(layout) == OFFICIAL_LAYOUT_SHA256
    if OFFICIAL.is_file():  # the readable comparison, where the reference JSON exists
        assert layout == json.loads(OFFICIAL.read_text())["noise_predictor"]


@pytest.mark.parametrize(
    ("scale", "widths", "lr", "latent"),
    [(4, (32, 32), 16, 8), (2, (32, 32, 32), 16, 4), (8, (32,), 8, 8), (1, (32, 32, 32, 32), 16, 2)],
)
def test_output_shapes_per_scale(scale: int, widths: tuple[int, ...], lr: int, latent: int) -> None:
    model = small(scale=scale, block_out_channels=widths)
    assert model.num_down_stages == len(widths) - 1
    with torch.no_grad():
        dist = model(torch.rand(2, 3, lr, lr), 199)
    assert isinstance(dist, DiagonalGaussianDistribution)
    assert dist.mean.shape == (2, 4, latent, latent) and dist.mean.dtype == torch.float32
    assert dist.std.shape == dist.mean.shape
    assert float(dist.logvar.min()) >= -30 and float(dist.logvar.max()) <= 20
    assert dist.sample().shape == (2, 4, latent, latent)


def test_index_forms_broadcast_and_matter() -> None:
    model = small()
    lr = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        a = model(lr, 199).mean
        b = model(lr, torch.tensor(199)).mean
        c = model(lr, torch.tensor([199])).mean
        d = model(lr, torch.tensor([199, 199])).mean
        e = model(lr, torch.tensor([199, 49])).mean
    for other in (b, c, d):
        torch.testing.assert_close(a, other)
    torch.testing.assert_close(a[0], e[0])
    assert not torch.allclose(a[1], e[1])  # the timestep reaches the output
    with pytest.raises(ValueError, match="index"):
        model(lr, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="index"):
        model(lr, torch.tensor(199.0))


def test_sample_is_deterministic_with_generator() -> None:
    model = small()
    with torch.no_grad():
        dist = model(torch.rand(1, 3, 8, 8), 199)
    s1 = dist.sample(generator=torch.Generator().manual_seed(3))
    s2 = dist.sample(generator=torch.Generator().manual_seed(3))
    s3 = dist.sample(generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(s1, s2)
    assert not torch.allclose(s1, s3)


def test_gradient_reaches_every_parameter() -> None:
    model = small(layers_per_block=(1, 2))
    dist = model(torch.rand(2, 3, 8, 8), torch.tensor([199, 99]))
    loss = dist.sample(generator=torch.Generator().manual_seed(0)).square().mean() + dist.logvar.mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scale": 3}, "scale=3"),
        ({"scale": 16}, "scale=16"),
        ({"scale": 0}, "positive int"),
        ({"scale": 2, "block_out_channels": (32, 32)}, r"block_out_channels has 2 entries.*3 widths"),
        ({"block_out_channels": (32,)}, r"block_out_channels has 1 entries.*2 widths"),
        ({"block_out_channels": (32, 36)}, "divisible"),
        ({"layers_per_block": (1, 1, 1)}, "layers_per_block"),
    ],
)
def test_geometry_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        small(**kwargs)


def test_input_errors() -> None:
    model = small(scale=2, block_out_channels=(32, 32, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 3, 10, 12), 199)
    with pytest.raises(ValueError, match=r"\(B, 3, h, w\)"):
        model(torch.rand(1, 4, 8, 8), 199)


def test_official_checkpoint_roundtrip(tmp_path: Path) -> None:
    src = small()
    # A released file: state_dict wrapper, DDP and compile prefixes, fp32 tensors (docs/checkpoints.md).
    wrapped = {"state_dict": {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}}
    path = tmp_path / "noise_predictor.pth"
    torch.save(wrapped, path)
    loaded = NoisePredictor.from_official(path, **TINY_NOISE_PREDICTOR)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    lr = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(lr, 199).mean, src(lr, 199).mean)


def test_official_checkpoint_key_errors(tmp_path: Path) -> None:
    state = small().state_dict()
    missing = dict(state)
    missing.pop("encoder.conv_out.bias")
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match=r"1 missing \[encoder.conv_out.bias\]"):
        NoisePredictor.from_official(tmp_path / "missing.pth", **TINY_NOISE_PREDICTOR)
    extra = {**state, "encoder.quant_conv.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match=r"1 unexpected \[encoder.quant_conv.weight\]"):
        NoisePredictor.from_official(tmp_path / "extra.pth", **TINY_NOISE_PREDICTOR)
    torch.save(state, tmp_path / "full.pth")
    with pytest.raises(RuntimeError, match=r"2 shape mismatches \[encoder.conv_out"):
        NoisePredictor.from_official(tmp_path / "full.pth", **{**TINY_NOISE_PREDICTOR, "latent_channels": 3})
    with pytest.raises(FileNotFoundError):
        NoisePredictor.from_official(tmp_path / "nope.pth")


def test_refuses_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": small().state_dict(), "extra": object.__new__(_Marker)}, path)
    with pytest.raises(Exception, match="(?i)weights only|unsupported|global"):
        NoisePredictor.from_official(path, **TINY_NOISE_PREDICTOR)


class _Marker:
    pass


def test_save_and_from_pretrained(tmp_path: Path) -> None:
    """diffusers' folder layout, a strict round trip (also from a subfolder), and the file on its own."""
    src = small(scale=2, block_out_channels=(32, 32, 32), layers_per_block=(1, 2, 1))
    src.save_pretrained(tmp_path / "pipe" / "np")
    folder = tmp_path / "pipe" / "np"
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    config = json.loads((folder / "config.json").read_text())
    assert config["scale"] == 2 and config["block_out_channels"] == [32, 32, 32]
    assert config["_class_name"] == "NoisePredictor"
    lr = torch.rand(1, 3, 8, 8)
    for loaded in (
        NoisePredictor.from_pretrained(folder),
        NoisePredictor.from_pretrained(tmp_path / "pipe", subfolder="np"),
    ):
        assert _public(loaded.config) == _public(src.config)
        with torch.no_grad():
            assert torch.equal(loaded(lr, 10).mean, src(lr, 10).mean)
    # The safetensors file also loads directly (strict), with the constructor arguments of config.json.
    NoisePredictor(**config).load_checkpoint(folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(OSError, match="config.json"):
        NoisePredictor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):  # not sent to the hub
        NoisePredictor.from_pretrained(tmp_path / "absent")


def test_from_pretrained_is_strict(tmp_path: Path) -> None:
    """diffusers would initialise a missing weight at random; ours refuses the folder in one line."""
    small().save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["extra"] = state.pop("encoder.conv_in.bias")
    save_file(state, str(weights))
    with pytest.raises(RuntimeError, match=r"1 missing \[encoder.conv_in.bias\]; 1 unexpected \[extra\]"):
        NoisePredictor.from_pretrained(tmp_path)


def test_gradient_checkpointing_keeps_gradients() -> None:
    """diffusers' mechanism (enable_gradient_checkpointing) recomputes the blocks with the same gradients."""
    model = small()
    lr = torch.rand(2, 3, 8, 8)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(lr, 10).mean.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
