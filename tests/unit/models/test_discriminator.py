"""LatentDiscriminator: paper layout (on meta), tiny forward shapes, conditioning, checkpointing, loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from invsr_pl.models.discriminator import LatentDiscriminator
from invsr_pl.models.tiny import TINY_DISCRIMINATOR, tiny_discriminator

OFFICIAL = Path("/work/shared/reference/official_state_dicts.json")
REPO_REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "official_state_dicts.json"


# sha256 of the released layout "key:d0xd1x...;..." (sorted keys): the check runs even without the JSON.
RELEASED_LAYOUT_SHA256 = "bd3b48c1006004d1a9d3f4488b3400d5f4067022af226453980a58083385e7ea"


def _layout_digest(layout: dict[str, list[int]]) -> str:
    text = ";".join(f"{k}:{'x'.join(map(str, v))}" for k, v in sorted(layout.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _official_layout() -> dict[str, list[int]] | None:
    for path in (OFFICIAL, REPO_REFERENCE):
        if path.is_file():
            return json.loads(path.read_text())["discriminator"]
    return None


@pytest.fixture(scope="module")
def meta_paper() -> LatentDiscriminator:
    with torch.device("meta"):
        return LatentDiscriminator()


def _tiny(seed: int = 0) -> LatentDiscriminator:
    return tiny_discriminator(seed=seed)


def _inputs(batch: int = 2, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 4, size, size, generator=g)
    prompt = torch.randn(batch, 7, TINY_DISCRIMINATOR["cross_attention_dim"], generator=g)
    index = torch.tensor([99, 249][:batch], dtype=torch.long)
    return latent, index, prompt


def test_paper_config_parameter_count(meta_paper: LatentDiscriminator) -> None:
    assert sum(p.numel() for p in meta_paper.parameters()) == 112_082_532  # docs/method.md
    parts = {name: sum(p.numel() for p in child.parameters()) for name, child in meta_paper.named_children()}
    assert parts["conv_in"] == 4_736
    assert parts["feature_in"] == 1_184
    assert parts["time_embedding"] == 328_704
    assert parts["add_embedding"] == 3_677_696
    assert parts["down_blocks"] == 28_970_560
    assert parts["mid_block"] == 16_270_848
    assert parts["up_blocks"] == 57_353_216
    assert parts["out_blocks"] == 5_475_588


def test_paper_config_state_dict_matches_release(meta_paper: LatentDiscriminator) -> None:
    ours = {k: list(v.shape) for k, v in meta_paper.state_dict().items()}
    assert len(ours) == 519
    assert _layout_digest(ours) == RELEASED_LAYOUT_SHA256
    reference = _official_layout()
    if reference is None:
        return
    assert sorted(set(ours) - set(reference)) == []
    assert sorted(set(reference) - set(ours)) == []
    assert {k: s for k, s in ours.items() if reference[k] != s} == {}


def test_paper_config_output_shapes_on_meta(meta_paper: LatentDiscriminator) -> None:
    latent = torch.empty(2, 4, 64, 64, device="meta")
    prompt = torch.empty(2, 77, 1024, device="meta")
    logits = meta_paper(latent, torch.tensor([99, 249], device="meta"), prompt)
    assert [tuple(x.shape) for x in logits] == [
        (2, 1, 16, 16),
        (2, 1, 32, 32),
        (2, 1, 64, 64),
        (2, 1, 64, 64),
    ]


def test_tiny_forward_shapes_and_dtype() -> None:
    model = _tiny()
    latent, index, prompt = _inputs()
    logits = model(latent, index, prompt)
    assert [tuple(x.shape) for x in logits] == [(2, 1, 4, 4), (2, 1, 8, 8), (2, 1, 16, 16), (2, 1, 16, 16)]
    assert all(x.dtype == torch.float32 and torch.isfinite(x).all() for x in logits)


def test_odd_latent_size_is_supported() -> None:
    model = _tiny()
    latent, index, prompt = _inputs()
    logits = model(latent[..., :15, :13], index, prompt)
    assert [tuple(x.shape[-2:]) for x in logits] == [(4, 4), (8, 7), (15, 13), (15, 13)]


def test_int_index_equals_broadcast_tensor() -> None:
    model = _tiny().eval()
    latent, _, prompt = _inputs()
    a = model(latent, 149, prompt)
    b = model(latent, torch.full((2,), 149, dtype=torch.long), prompt)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


def test_output_depends_on_timestep_and_prompt() -> None:
    model = _tiny().eval()
    latent, index, prompt = _inputs()
    base = model(latent, index, prompt)[-1]
    assert not torch.allclose(base, model(latent, index - 50, prompt)[-1])
    assert not torch.allclose(base, model(latent, index, prompt + 1.0)[-1])


def test_samples_are_scored_independently() -> None:
    model = _tiny().eval()
    latent, index, prompt = _inputs()
    full = model(latent, index, prompt)
    first = model(latent[:1], index[:1], prompt[:1])
    for x, y in zip(full, first, strict=True):
        torch.testing.assert_close(x[:1], y, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_matches_plain_backward() -> None:
    model = _tiny()
    latent, index, prompt = _inputs()

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        x = latent.clone().requires_grad_(True)
        sum(o.mean() for o in model(x, index, prompt)).backward()
        return x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    x_ref, p_ref = grads()
    model.enable_gradient_checkpointing()  # diffusers' mechanism: the blocks recompute their resnets
    assert model.gradient_checkpointing and model.is_gradient_checkpointing
    calls: list[str] = []
    hooks = [
        blk.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
        for name, blk in [
            ("mid", model.mid_block.resnets[-1]),
            ("down0", model.down_blocks[0].resnets[0]),
            ("up0", model.up_blocks[0].resnets[0]),
        ]
    ]
    x_ck, p_ck = grads()
    for h in hooks:
        h.remove()
    # Each checkpointed resnet runs twice: forward and recomputation in backward (mid included).
    assert calls.count("mid") == 2 and calls.count("down0") == 2 and calls.count("up0") == 2
    torch.testing.assert_close(x_ck, x_ref)
    assert p_ck.keys() == p_ref.keys()
    for name in p_ref:
        torch.testing.assert_close(p_ck[name], p_ref[name], msg=name)


def test_every_parameter_gets_a_gradient() -> None:
    model = _tiny()
    latent, index, prompt = _inputs()
    sum(o.mean() for o in model(latent, index, prompt)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.module."])
@pytest.mark.parametrize("wrap", [False, True])
def test_from_official_strict_roundtrip(tmp_path: Path, prefix: str, wrap: bool) -> None:
    source = _tiny(seed=3)
    state = {prefix + k: v for k, v in source.state_dict().items()}
    path = tmp_path / "d.pth"
    torch.save({"state_dict": state} if wrap else state, path)
    loaded = LatentDiscriminator.from_official(path, **TINY_DISCRIMINATOR)
    for (ka, a), (kb, b) in zip(source.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b)


def test_from_official_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = _tiny(seed=4)
    path = tmp_path / "d.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = LatentDiscriminator.from_official(path, **TINY_DISCRIMINATOR)
    assert torch.equal(loaded.conv_in.weight, source.conv_in.weight)


def test_from_official_is_strict(tmp_path: Path) -> None:
    state = _tiny().state_dict()
    state.pop("feature_in.bias")
    path = tmp_path / "d.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="feature_in.bias"):
        LatentDiscriminator.from_official(path, **TINY_DISCRIMINATOR)
    with pytest.raises(FileNotFoundError):
        LatentDiscriminator.from_official(tmp_path / "missing.pth", **TINY_DISCRIMINATOR)


def test_bad_inputs_and_config_raise_clear_errors() -> None:
    model = _tiny()
    latent, index, prompt = _inputs()
    with pytest.raises(ValueError, match="latent"):
        model(latent[:, :3], index, prompt)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(latent, index, prompt[..., :16])
    with pytest.raises(ValueError, match="index"):
        model(latent, torch.tensor([99, 199, 249]), prompt)
    with pytest.raises(ValueError, match="norm_num_groups"):
        LatentDiscriminator(**{**TINY_DISCRIMINATOR, "block_out_channels": (36, 32, 64)})
    with pytest.raises(ValueError, match="layers_per_block"):
        LatentDiscriminator(**{**TINY_DISCRIMINATOR, "layers_per_block": (1, 2)})


def test_half_precision_prompt_is_cast_to_weight_dtype() -> None:
    model = _tiny().eval()
    latent, index, prompt = _inputs()
    a = model(latent, index, prompt)
    b = model(latent, index, prompt.half())
    for x, y in zip(a, b, strict=True):
        assert y.dtype == torch.float32
        torch.testing.assert_close(x, y, atol=1e-2, rtol=1e-2)


def test_attention_free_variant_runs() -> None:
    kwargs = {
        **TINY_DISCRIMINATOR,
        "down_block_types": ("DownBlock2D",) * 3,
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ("UpBlock2D",) * 3,
        "addition_embed_type": None,
    }
    model = LatentDiscriminator(**kwargs)
    latent, index, prompt = _inputs()
    assert [tuple(x.shape) for x in model(latent, index, prompt)][0] == (2, 1, 4, 4)


def test_save_and_from_pretrained_round_trip(tmp_path: Path) -> None:
    """diffusers' folder layout (config.json + safetensors), identical logits, loaded from a subfolder."""
    model = _tiny().eval()
    model.save_pretrained(tmp_path / "discriminator")
    files = {p.name for p in (tmp_path / "discriminator").iterdir()}
    assert files == {"config.json", "diffusion_pytorch_model.safetensors"}
    loaded = LatentDiscriminator.from_pretrained(tmp_path, subfolder="discriminator")
    assert list(loaded.config.block_out_channels) == list(model.config.block_out_channels)
    latent, index, prompt = _inputs()
    with torch.no_grad():
        for x, y in zip(loaded(latent, index, prompt), model(latent, index, prompt), strict=True):
            assert torch.equal(x, y)
