"""The backbone protocol on the three priors' tiny twins (issue 23, docs/backbones.md).

The maths of each parameterisation is checked against the formulas of docs/backbones.md, the conditioning
against the networks it must reach, and the loaders against diffusers folders of tiny random components
(written offline, like a local copy of the real model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_text_encoders import clip_encoder, clip_tokenizer
from torch import Tensor, nn

from invsr_pl.models.backbone import FrozenBackbone
from invsr_pl.models.backbones import family_of
from invsr_pl.models.sd35_turbo import FrozenSD35Turbo
from invsr_pl.models.sdxl_turbo import FrozenSDXLTurbo
from invsr_pl.models.timesteps import flow_sigmas, sd_turbo_sigmas
from invsr_pl.models.tiny import build_tiny_sd35_turbo, build_tiny_sd_turbo, build_tiny_sdxl_turbo
from invsr_pl.models.weights_folder import BackboneWeightsNotFound

BUILDERS = {
    "sd_turbo": build_tiny_sd_turbo,
    "sdxl_turbo": build_tiny_sdxl_turbo,
    "sd35_turbo": build_tiny_sd35_turbo,
}
CHANNELS = {"sd_turbo": 4, "sdxl_turbo": 4, "sd35_turbo": 16}


@pytest.fixture(params=sorted(BUILDERS))
def twin(request: pytest.FixtureRequest) -> tuple[str, FrozenBackbone]:
    return request.param, BUILDERS[request.param](seed=0)


def _latent(backbone: FrozenBackbone, seed: int = 0, size: int = 8) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, backbone.latent_channels, size, size, generator=g)


def test_frozen_geometry_and_encode_decode(twin: tuple[str, FrozenBackbone]) -> None:
    family, backbone = twin
    assert isinstance(backbone, FrozenBackbone) and not backbone.training
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training  # Lightning's train() must not switch the prior into training mode
    assert backbone.latent_channels == CHANNELS[family] and backbone.vae_scale_factor == 8
    image = torch.rand(2, 3, 32, 48)
    z = backbone.encode(image, sample=False)
    assert z.shape == (2, CHANNELS[family], 4, 6) and z.dtype == torch.float32
    # encode normalises the posterior mean with the VAE's shift (SD3) and scaling; decode inverts it exactly
    mean = backbone.vae.encode(image * 2 - 1).latent_dist.mean
    shift = backbone.shift_factor or 0.0
    torch.testing.assert_close(z, (mean - shift) * backbone.scaling_factor)
    expected = (backbone.vae.decode(z / backbone.scaling_factor + shift).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(backbone.decode(z), expected)
    with pytest.raises(ValueError, match=f"latent must be \\(B, {CHANNELS[family]}"):
        backbone.decode(torch.zeros(1, CHANNELS[family] + 1, 4, 4))


def test_trajectory_matches_the_formulas(twin: tuple[str, FrozenBackbone]) -> None:
    family, backbone = twin
    z_lq, noise = _latent(backbone, 0), _latent(backbone, 1)
    index = torch.tensor([199, 99])
    s = backbone.sigma(index).view(-1, 1, 1, 1)
    start = backbone.start_state(z_lq, noise, index)
    if family == "sd35_turbo":  # flow: (1 - s) z + s eps on the SNR-matched flow times
        torch.testing.assert_close(backbone.sigma(index), flow_sigmas()[index])
        torch.testing.assert_close(start, (1 - s) * z_lq + s * noise)
    else:  # VE: z + sigma eps on SD-Turbo's table
        torch.testing.assert_close(backbone.sigma(index), sd_turbo_sigmas()[index])
        torch.testing.assert_close(start, z_lq + s * noise)
    x0, direction = backbone.denoise(start, index)
    torch.testing.assert_close(x0, start - s * direction)  # x0 = z - sigma eps (VE) = z - s v (flow)
    torch.testing.assert_close(backbone.renoise(x0, direction, index), x0 + s * direction)
    x0_inv, direction_inv = backbone.invert_step(z_lq, noise, index)
    torch.testing.assert_close(x0_inv, x0) and torch.testing.assert_close(direction_inv, direction)
    # gradients reach the start noise through the frozen denoiser (training's only path)
    noise = noise.clone().requires_grad_(True)
    backbone.invert_step(z_lq, noise, index)[0].square().mean().backward()
    assert noise.grad is not None and noise.grad.abs().sum() > 0


class _ExactVelocity(nn.Module):
    """A transformer stand-in that knows the clean latent: returns the exact velocity ``eps - z0``."""

    def __init__(self, transformer: nn.Module, z0: Tensor, s: Tensor) -> None:
        super().__init__()
        self.inner, self.z0, self.s = transformer, z0, s
        self.config = transformer.config

    def forward(self, hidden_states: Tensor, timestep: Tensor, **_: object) -> tuple[Tensor]:
        torch.testing.assert_close(timestep, self.s.view(-1) * 1000)  # the transformer's time is 1000 s
        eps = (hidden_states.float() - (1 - self.s) * self.z0) / self.s
        return (eps - self.z0,)


def test_flow_with_the_exact_velocity_recovers_the_clean_latent() -> None:
    backbone = build_tiny_sd35_turbo(seed=0)
    z0, eps = _latent(backbone, 2), _latent(backbone, 3)
    index = torch.tensor([249, 49])
    s = backbone.sigma(index).view(-1, 1, 1, 1)
    backbone.transformer = _ExactVelocity(backbone.transformer, z0, s)
    x0, v = backbone.invert_step(z0, eps, index)  # the start state IS on the straight path through z0
    torch.testing.assert_close(x0, z0, atol=1e-5, rtol=0)
    torch.testing.assert_close(v, eps - z0, atol=1e-5, rtol=0)
    # the Euler step lands on the same path: (1 - s') z0 + s' eps
    s_next = backbone.sigma(torch.tensor([99, 99])).view(-1, 1, 1, 1)
    torch.testing.assert_close(
        backbone.renoise(x0, v, 99), (1 - s_next) * z0 + s_next * eps, atol=1e-5, rtol=0
    )


def test_flow_times_have_sd_turbos_snr() -> None:
    ve, flow = sd_turbo_sigmas(), flow_sigmas()
    snr_ve, snr_flow = 1 / ve.double() ** 2, ((1 - flow.double()) / flow.double()) ** 2
    torch.testing.assert_close(snr_flow, snr_ve, rtol=1e-5, atol=0)
    assert abs(float(flow[199]) - 0.3628) < 1e-4 and bool((flow[1:] > flow[:-1]).all())


def test_sdxl_conditioning_reaches_the_unet() -> None:
    backbone = build_tiny_sdxl_turbo(seed=0)
    z = _latent(backbone)
    eps = backbone.predict_eps(z, 199)
    assert backbone.add_time_ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]  # sample_size 8 x VAE 8
    backbone.pooled_prompt_embeds = backbone.pooled_prompt_embeds + 1.0
    assert not torch.allclose(backbone.predict_eps(z, 199), eps)
    backbone.pooled_prompt_embeds = backbone.pooled_prompt_embeds - 1.0
    backbone.add_time_ids = backbone.add_time_ids * 2
    assert not torch.allclose(backbone.predict_eps(z, 199), eps)


def test_sdxl_vae_stays_fp32_under_fp16_weights() -> None:
    backbone = build_tiny_sdxl_turbo(seed=0, dtype="fp16")
    assert backbone.dtype == torch.float16 and backbone.vae_dtype == torch.float32
    assert build_tiny_sd_turbo(seed=0, dtype="fp16").vae_dtype == torch.float16  # as the official SD-Turbo
    assert build_tiny_sdxl_turbo(seed=0, dtype="bf16").vae_dtype == torch.bfloat16


def test_sd35_conditioning_reaches_the_transformer() -> None:
    backbone = build_tiny_sd35_turbo(seed=0)
    z = _latent(backbone)
    v = backbone.predict_velocity(z, 199)
    backbone.pooled_prompt_embeds = backbone.pooled_prompt_embeds + 1.0
    assert not torch.allclose(backbone.predict_velocity(z, 199), v)


def test_check_geometry_refuses_another_prior(twin: tuple[str, FrozenBackbone]) -> None:
    family, backbone = twin
    assert backbone.check_geometry(CHANNELS[family], 32, source="x") is backbone
    assert backbone.check_geometry(None, None, source="x") is backbone
    with pytest.raises(
        ValueError, match="latent_channels=.*config expects 8 .*model.backbone.latent_channels"
    ):
        backbone.check_geometry(8, None, source="x")
    with pytest.raises(ValueError, match="cross_attention_dim=32.*expects 1024"):
        backbone.check_geometry(None, 1024, source="x")


# ---------------------------------------------------------------- loaders on tiny diffusers folders


def _write_sdxl_folder(folder: Path) -> FrozenSDXLTurbo:
    """UNet/VAE of the tiny twin plus two CLIP encoders (widths 12 + 20 = 32, pooled 32) and tokenizers."""
    source = build_tiny_sdxl_turbo(seed=0)
    source.unet.save_pretrained(folder / "unet")
    source.vae.save_pretrained(folder / "vae")
    source.scheduler.save_pretrained(folder / "scheduler")
    vocab = clip_tokenizer(folder, "tokenizer")
    clip_tokenizer(folder, "tokenizer_2")
    clip_encoder(folder, "text_encoder", vocab, 12, None, seed=1)
    clip_encoder(folder, "text_encoder_2", vocab, 20, 32, seed=2)
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return source


def test_sdxl_from_folder_embeds_with_both_encoders(tmp_path: Path) -> None:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = tmp_path / "sdxl-turbo"
    source = _write_sdxl_folder(folder)
    backbone = FrozenSDXLTurbo.from_pretrained(str(folder), dtype="fp32", prompt="a cat", latent_channels=4)
    assert backbone.prompt_embeds.shape == (1, 77, 32) and backbone.pooled_prompt_embeds.shape == (1, 32)
    assert not hasattr(backbone, "text_encoder")  # released after embedding
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    ids = tok("a cat", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    one = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))(ids, output_hidden_states=True)
    two = CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"))(
        ids, output_hidden_states=True
    )
    expected = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)  # penultimate, side by side
    torch.testing.assert_close(backbone.prompt_embeds, expected)
    torch.testing.assert_close(backbone.pooled_prompt_embeds, two.text_embeds)
    torch.testing.assert_close(backbone.unet.conv_in.weight, source.unet.conv_in.weight)
    assert family_of(str(folder)) == "sdxl_turbo"
    with pytest.raises(ValueError, match="latent_channels=4, but the config expects 16"):
        FrozenSDXLTurbo.from_pretrained(str(folder), dtype="fp32", latent_channels=16)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(BackboneWeightsNotFound, match="SDXL-Turbo weights .*files are missing"):
        FrozenSDXLTurbo.from_pretrained(str(folder), dtype="fp32")


def _write_sd35_folder(folder: Path, with_t5: bool) -> FrozenSD35Turbo:
    """Transformer/VAE of the tiny twin, CLIP-L/G with projections (pooled 8 + 8 = 16) and, optionally, a tiny
    T5 with a word-level tokenizer built offline."""
    source = build_tiny_sd35_turbo(seed=0)
    source.transformer.save_pretrained(folder / "transformer")
    source.vae.save_pretrained(folder / "vae")
    source.scheduler.save_pretrained(folder / "scheduler")
    vocab = clip_tokenizer(folder, "tokenizer")
    clip_tokenizer(folder, "tokenizer_2")
    clip_encoder(folder, "text_encoder", vocab, 12, 8, seed=1)
    clip_encoder(folder, "text_encoder_2", vocab, 12, 8, seed=2)
    if with_t5:
        from transformers import T5Config, T5EncoderModel, T5TokenizerFast

        # a Unigram vocabulary given directly (T5's tokenizer is a sentencepiece Unigram): no download
        words = [
            ("<pad>", 0.0),
            ("</s>", 0.0),
            ("<unk>", 0.0),
            ("\u2581", -2.0),
            ("\u2581a", -1.0),
            ("\u2581cat", -1.0),
        ]
        T5TokenizerFast(vocab=words, extra_ids=0).save_pretrained(folder / "tokenizer_3")
        torch.manual_seed(3)
        config = T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
        T5EncoderModel(config).save_pretrained(folder / "text_encoder_3")
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": ["transformers", "T5EncoderModel"] if with_t5 else [None, None],
        "tokenizer_3": ["transformers", "T5TokenizerFast"] if with_t5 else [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return source


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd35_from_folder(tmp_path: Path, with_t5: bool) -> None:
    folder = tmp_path / "sd35"
    _write_sd35_folder(folder, with_t5)
    backbone = FrozenSD35Turbo.from_pretrained(str(folder), dtype="fp32", prompt="a cat", use_t5=with_t5)
    assert backbone.prompt_embeds.shape == (1, 77 + 256, 32) and backbone.pooled_prompt_embeds.shape == (
        1,
        16,
    )
    clip, t5 = backbone.prompt_embeds[:, :77], backbone.prompt_embeds[:, 77:]
    assert clip[..., 24:].abs().sum() == 0  # CLIP-L 12 + CLIP-G 12 wide, zero-padded to the joint width 32
    assert clip[..., :24].abs().sum() > 0
    assert (t5.abs().sum() > 0) == with_t5  # without T5: zeros for its tokens, as diffusers
    assert family_of(str(folder)) == "sd35_turbo"
    if not with_t5:
        with pytest.raises(
            BackboneWeightsNotFound, match="text_encoder_3/ \\+ tokenizer_3/ \\(T5\\); or set use_t5"
        ):
            FrozenSD35Turbo.from_pretrained(str(folder), dtype="fp32", use_t5=True)


def test_conditioning_equals_diffusers_pipelines(tmp_path: Path) -> None:
    """The cached conditioning is what diffusers' own SDXL / SD3 pipelines compute for the prompt (no CFG)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    _write_sdxl_folder(tmp_path / "sdxl")
    ours = FrozenSDXLTurbo.from_pretrained(str(tmp_path / "sdxl"), dtype="fp32", prompt="a cat")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "sdxl"))
    embeds, _, pooled, _ = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)
    torch.testing.assert_close(ours.prompt_embeds, embeds, atol=0, rtol=0)
    torch.testing.assert_close(ours.pooled_prompt_embeds, pooled, atol=0, rtol=0)
    ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=32)
    torch.testing.assert_close(ours.add_time_ids, ids)  # the tiny UNet's native size: 8 latents x 8

    _write_sd35_folder(tmp_path / "sd35", with_t5=True)
    ours = FrozenSD35Turbo.from_pretrained(str(tmp_path / "sd35"), dtype="fp32", prompt="a cat")
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "sd35"))
    embeds, _, pooled, _ = pipe.encode_prompt("a cat", None, None, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours.prompt_embeds, embeds, atol=1e-4, rtol=0)  # T5 reloaded: float noise
    torch.testing.assert_close(ours.pooled_prompt_embeds, pooled, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("cls", "model_id", "extra"),
    [
        (FrozenSDXLTurbo, "stabilityai/sdxl-turbo", ""),
        (FrozenSD35Turbo, "stabilityai/stable-diffusion-3.5-large-turbo", "gated: accept its licence"),
    ],
)
def test_missing_weights_say_what_to_download(
    cls: type[FrozenBackbone], model_id: str, extra: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(BackboneWeightsNotFound) as err:
        cls.from_pretrained(model_id)
    message = str(err.value)
    assert f"hf download {model_id}" in message and "model.backbone.model=" in message
    assert extra in message
    with pytest.raises(BackboneWeightsNotFound, match="does not exist"):
        cls.from_pretrained(str(tmp_path / "nope"))


def test_family_of_names_and_ids() -> None:
    assert family_of("stabilityai/sd-turbo") == "sd_turbo"
    assert family_of("stabilityai/sdxl-turbo") == "sdxl_turbo"
    assert family_of("stabilityai/stable-diffusion-3.5-large-turbo") == "sd35_turbo"
    assert family_of("tiny_sd35_turbo") == "sd35_turbo" and family_of("tiny_trained") == "sd_turbo"


def test_fp16_variant_is_loaded_when_it_is_the_only_copy(tmp_path: Path) -> None:
    """What the hub patterns fetch for SDXL-Turbo: only ``*.fp16.safetensors``; fp32 loads cast from it."""
    from invsr_pl.models.weights_folder import fp16_variant

    folder = tmp_path / "sdxl-turbo"
    source = _write_sdxl_folder(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    source.unet.half().save_pretrained(folder / "unet", variant="fp16")
    assert fp16_variant(folder, "unet", torch.float32) == "fp16"
    assert fp16_variant(folder, "vae", torch.float16) is None  # no fp16 file there
    backbone = FrozenSDXLTurbo.from_pretrained(str(folder), dtype="fp32", prompt="a cat")
    assert backbone.dtype == torch.float32
    torch.testing.assert_close(backbone.unet.conv_in.weight, source.unet.conv_in.weight.float())
