"""FrozenSDTurbo on the tiny random twin: frozen/eval, shapes, VE maths, dtypes, offline loading errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_text_encoders import clip_encoder, clip_tokenizer

from invsr_pl.models import timesteps as ts
from invsr_pl.models.sd_turbo import (
    DEFAULT_MODEL_ID,
    POSITIVE_PROMPT,
    BackboneWeightsNotFound,
    FrozenSDTurbo,
    resolve_dtype,
)
from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_unet_config, tiny_vae_config


@pytest.fixture(scope="module")
def tiny() -> FrozenSDTurbo:
    return build_tiny_sd_turbo(seed=0)


def test_prompts() -> None:
    assert POSITIVE_PROMPT.startswith("Cinematic, high-contrast") and POSITIVE_PROMPT.endswith("deformations")
    assert DEFAULT_MODEL_ID == "stabilityai/sd-turbo"


def test_tiny_is_frozen() -> None:
    model = build_tiny_sd_turbo(seed=1)
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training and not any(m.training for m in model.modules())
    model.train()  # Lightning calls this on every fit/validation switch: must stay eval
    assert not any(m.training for m in model.modules())
    assert model.sigmas.shape == (1000,) and model.sigmas.dtype == torch.float32
    assert model.prompt_embeds.shape == (1, 77, 32)
    # Derived buffers never reach checkpoints.
    assert not any(k in ("sigmas", "prompt_embeds") for k in model.state_dict())


def test_properties(tiny: FrozenSDTurbo) -> None:
    assert tiny.vae_scale_factor == 8
    assert tiny.latent_channels == 4
    assert tiny.scaling_factor == pytest.approx(0.18215)
    assert tiny.cross_attention_dim == 32
    assert tiny.dtype == torch.float32 and tiny.device == torch.device("cpu")
    assert tiny.num_train_timesteps == 1000
    assert build_tiny_sd_turbo(cross_attention_dim=16).prompt_embeds.shape == (1, 77, 16)


def test_tiny_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_tiny_sd_turbo(seed=0), build_tiny_sd_turbo(seed=0), build_tiny_sd_turbo(seed=1)
    assert torch.equal(torch.rand(1), before)
    torch.testing.assert_close(a.unet.conv_in.weight, b.unet.conv_in.weight)
    torch.testing.assert_close(a.prompt_embeds, b.prompt_embeds)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_sigma_matches_table(tiny: FrozenSDTurbo) -> None:
    got = tiny.sigma(ts.to_index([200, 250]))
    assert got.dtype == torch.float32 and got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor([0.569285, 0.693205]), atol=1e-5, rtol=0)


def test_encode_decode_shapes_and_determinism(tiny: FrozenSDTurbo) -> None:
    image = torch.rand(2, 3, 64, 48)
    with torch.no_grad():
        z1 = tiny.encode(image, generator=torch.Generator().manual_seed(0))
        z2 = tiny.encode(image, generator=torch.Generator().manual_seed(0))
        z3 = tiny.encode(image, generator=torch.Generator().manual_seed(1))
        mean = tiny.encode(image, sample=False)
        out = tiny.decode(z1)
    assert z1.shape == (2, 4, 8, 6) and z1.dtype == torch.float32
    torch.testing.assert_close(z1, z2)
    assert not torch.equal(z1, z3)  # posterior *sample* (docs/deviations.md)
    torch.testing.assert_close(mean, tiny.encode(image, sample=False))
    mean_direct = tiny.vae.encode(image * 2 - 1).latent_dist.mean * 0.18215
    torch.testing.assert_close(mean, mean_direct)
    assert out.shape == (2, 3, 64, 48) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny.encode(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.encode(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="latent"):
        tiny.decode(torch.rand(1, 3, 8, 8))


def test_predict_eps_and_x0(tiny: FrozenSDTurbo) -> None:
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, 4, 8, 8, generator=g)
    idx = ts.to_index([200, 100])
    with torch.no_grad():
        eps = tiny.predict_eps(z_t, idx)
        x0 = tiny.predict_x0(z_t, idx)
        # The UNet sees the VP input z_t / sqrt(1 + sigma^2) and the cached prompt (docs/conventions.md).
        sigma = tiny.sigma(idx)
        direct = tiny.unet(
            ts.scale_model_input(z_t, sigma), idx, encoder_hidden_states=tiny.prompt_embeds.expand(2, -1, -1)
        ).sample
        one = tiny.predict_eps(z_t[:1], 199)
    assert eps.shape == (2, 4, 8, 8) and eps.dtype == torch.float32
    torch.testing.assert_close(eps, direct)
    torch.testing.assert_close(x0, z_t - sigma.view(-1, 1, 1, 1) * eps)
    torch.testing.assert_close(one, eps[:1])
    with pytest.raises(ValueError, match="index"):
        tiny.predict_eps(z_t, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="z_t"):
        tiny.predict_eps(torch.randn(1, 3, 8, 8), 199)


def test_invert_step_is_start_state_then_x0(tiny: FrozenSDTurbo) -> None:
    """The one-step inversion: z_t = z_lq + sigma * noise, x0_hat = predict_x0(z_t); eps for a next step."""
    g = torch.Generator().manual_seed(1)
    z_lq, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    idx = torch.tensor([199, 99])
    with torch.no_grad():
        x0, eps = tiny.invert_step(z_lq, noise, idx)
        z_t = z_lq + tiny.sigma(idx).view(-1, 1, 1, 1) * noise
        torch.testing.assert_close(x0, tiny.predict_x0(z_t, idx), atol=0, rtol=0)
        torch.testing.assert_close(eps, tiny.predict_eps(z_t, idx), atol=0, rtol=0)
        single, _ = tiny.invert_step(z_lq[:1], noise[:1], 199)
    torch.testing.assert_close(single, x0[:1])
    noise.requires_grad_(True)
    tiny.invert_step(z_lq, noise, idx)[0].square().mean().backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0


def test_encode_with_given_noise_equals_generator_draw(tiny: FrozenSDTurbo) -> None:
    image = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        drawn = tiny.encode(image, generator=torch.Generator().manual_seed(4))
        noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(tiny.encode(image, noise=noise), drawn, atol=0, rtol=0)
        with pytest.raises(ValueError, match="noise shape"):
            tiny.encode(image, noise=noise[:1])


def test_gradients_flow_through_frozen_unet(tiny: FrozenSDTurbo) -> None:
    z_t = torch.randn(2, 4, 8, 8, requires_grad=True)
    tiny.predict_x0(z_t, torch.tensor([199, 99])).square().mean().backward()
    reference = z_t.grad.clone()
    assert torch.isfinite(reference).all() and reference.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())

    model = build_tiny_sd_turbo(seed=0)
    model.enable_gradient_checkpointing()
    assert model.unet.is_gradient_checkpointing
    z_ckpt = z_t.detach().clone().requires_grad_(True)
    model.predict_x0(z_ckpt, torch.tensor([199, 99])).square().mean().backward()
    torch.testing.assert_close(z_ckpt.grad, reference)


@pytest.mark.parametrize(("name", "expected"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_weights_return_fp32(name: str, expected: torch.dtype) -> None:
    model = build_tiny_sd_turbo(dtype=name)
    assert model.dtype == expected and model.vae.dtype == expected
    assert model.prompt_embeds.dtype == expected and model.sigmas.dtype == torch.float32
    with torch.no_grad():
        z = model.encode(torch.rand(1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
        eps = model.predict_eps(z, 199)
        img = model.decode(z)
    assert z.dtype == eps.dtype == img.dtype == torch.float32
    assert torch.isfinite(eps).all()


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    with pytest.raises(ValueError, match="unknown backbone dtype"):
        resolve_dtype("int8")


def test_offline_hub_id_fails_fast_with_instructions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls: list[bool] = []
    real = huggingface_hub.snapshot_download

    def recording(*args, **kwargs):
        calls.append(bool(kwargs.get("local_files_only")))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    with pytest.raises(BackboneWeightsNotFound) as info:
        FrozenSDTurbo.from_pretrained("stabilityai/sd-turbo", cache_dir=str(tmp_path / "empty_cache"))
    assert calls == [True]  # the local cache only: offline never waits on the network
    message = str(info.value)
    assert "stabilityai/sd-turbo" in message
    assert "model.backbone.model=/path/to/sd-turbo" in message
    assert "unet/" in message and "text_encoder/" in message and "HF_HUB_OFFLINE" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(BackboneWeightsNotFound, match="does not exist"):
        FrozenSDTurbo.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(BackboneWeightsNotFound, match=r"lacks the subfolders \['vae'"):
        FrozenSDTurbo.from_pretrained(str(tmp_path / "partial"))


def _write_tiny_folder(folder: Path) -> None:
    """A complete diffusers-layout folder with tiny random components (like a local sd-turbo copy)."""
    source = build_tiny_sd_turbo(seed=0)
    source.unet.save_pretrained(folder / "unet")
    source.vae.save_pretrained(folder / "vae")
    source.scheduler.save_pretrained(folder / "scheduler")
    vocab = clip_tokenizer(folder, "tokenizer")
    clip_encoder(folder, "text_encoder", vocab, 32, None, seed=0, intermediate=37, layers=1, heads=4)


def test_from_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "sd-turbo"
    _write_tiny_folder(folder)
    model = FrozenSDTurbo.from_pretrained(str(folder), dtype="bf16", prompt="a cat")
    assert model.dtype == torch.bfloat16 and model.prompt_embeds.dtype == torch.bfloat16
    assert model.prompt_embeds.shape == (1, 77, 32)
    assert model.prompt_embeds.float().abs().sum() > 0
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    assert not hasattr(model, "text_encoder")
    torch.testing.assert_close(model.sigma(torch.tensor([199])), torch.tensor([0.569285]), atol=1e-5, rtol=0)
    reference = build_tiny_sd_turbo(seed=0, dtype="bf16")
    torch.testing.assert_close(model.unet.conv_in.weight, reference.unet.conv_in.weight)
    # A folder lacking weight files gives the same clear error.
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BackboneWeightsNotFound, match="files are missing"):
        FrozenSDTurbo.from_pretrained(str(folder), dtype="fp32", prompt="a cat")


def test_tiny_configs_geometry() -> None:
    assert len(tiny_vae_config()["block_out_channels"]) == 4  # three x2 downsamplers: factor 8
    assert tiny_unet_config(16)["cross_attention_dim"] == 16


@pytest.mark.slow
def test_random_sd_turbo_real_shapes() -> None:
    model = FrozenSDTurbo.random_sd_turbo(seed=0, dtype="float32")
    assert sum(p.numel() for p in model.unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in model.vae.parameters()) == 83_653_863
    assert model.cross_attention_dim == 1024 and model.prompt_embeds.shape == (1, 77, 1024)
    assert model.vae_scale_factor == 8 and model.latent_channels == 4
    assert model.scaling_factor == pytest.approx(0.18215)
    with torch.no_grad():
        z = model.encode(torch.rand(1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
        eps = model.predict_eps(z, 199)
        img = model.decode(z)
    assert z.shape == eps.shape == (1, 4, 8, 8) and img.shape == (1, 3, 64, 64)
    assert torch.isfinite(eps).all()
