"""InvSRPipeline on every backbone family's tiny twin: bit for bit the sampler, the pooled conditioning and
the denoiser component round-trip, old folders still load, a noise predictor for other latents is refused."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from invsr_pl.models import backbones
from invsr_pl.models.builtin import TINY, TINY_SD35_TURBO, TINY_SDXL_TURBO
from invsr_pl.models.sd35_turbo import FrozenSD35Turbo
from invsr_pl.models.sdxl_turbo import FrozenSDXLTurbo
from invsr_pl.models.tiny import tiny_noise_predictor
from invsr_pl.pipelines import FixedPromptEmbedding, InvSRPipeline, model_index
from invsr_pl.sampling.sampler import InvSRSampler

TWINS = {TINY_SDXL_TURBO: (FrozenSDXLTurbo, 4), TINY_SD35_TURBO: (FrozenSD35Turbo, 16)}


def _lr(h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


@functools.cache
def _reference(name: str) -> tuple:
    """The twin and its noise predictor built apart from any pipeline (nothing shared)."""
    backbone = backbones.build_builtin(name)
    return backbone, tiny_noise_predictor(seed=0, latent_channels=backbone.latent_channels).eval()


@functools.cache
def _pipe(name: str) -> InvSRPipeline:
    backbone = backbones.build_builtin(name)
    np_ = tiny_noise_predictor(seed=0, latent_channels=backbone.latent_channels)
    pipe = InvSRPipeline.from_backbone(backbone, np_, base_model=name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", list(TWINS))
@pytest.mark.parametrize("steps", [1, 3])
def test_pipeline_is_the_sampler_bit_for_bit(name: str, steps: int) -> None:
    """Chopped (40x24 in 16-px patches), padded up to the patch size (10x6) and one-pass odd (13x7) inputs."""
    pipe = _pipe(name)
    cls, channels = TWINS[name]
    view = pipe.backbone()
    assert type(view) is cls and view.latent_channels == channels and view.device == torch.device("cpu")
    for (h, w), chopping in (((40, 24), 16), ((10, 6), 16), ((13, 7), None)):
        lr = _lr(h, w)
        sampler = InvSRSampler(*_reference(name), num_steps=steps, chopping_size=chopping)
        expected = sampler(lr, generator=torch.Generator().manual_seed(7))
        got = pipe(
            lr, num_inference_steps=steps, chopping_size=chopping, generator=7, output_type="pt"
        ).images
        assert got.shape == (1, 3, 4 * h, 4 * w)
        assert torch.equal(got, expected), (name, h, w, chopping)


@pytest.mark.parametrize("name", list(TWINS))
def test_save_and_from_pretrained_keep_the_denoiser_and_pooled_conditioning(
    name: str, tmp_path: Path
) -> None:
    pipe = _pipe(name)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    sd3 = name == TINY_SD35_TURBO
    assert index["transformer"] == (["diffusers", "SD3Transformer2DModel"] if sd3 else [None, None])
    assert index["unet"] == ([None, None] if sd3 else ["diffusers", "UNet2DConditionModel"])
    assert index["scheduler"][1] == ("FlowMatchEulerDiscreteScheduler" if sd3 else "EulerDiscreteScheduler")
    loaded = InvSRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.text_encoder, FixedPromptEmbedding) and loaded.tokenizer is None
    reference = _reference(name)[0]
    assert torch.equal(loaded.text_encoder(), reference.prompt_embeds)
    assert torch.equal(loaded.text_encoder.pooled_embeds, reference.pooled_prompt_embeds)
    lr = _lr(16, 12)
    assert torch.equal(loaded(lr, output_type="pt").images, pipe(lr, output_type="pt").images)


@pytest.mark.parametrize("name", [TINY, *TWINS])
def test_named_backbone_export_folder_loads_it(name: str, tmp_path: Path) -> None:
    """A folder holding only the noise predictor and a model_index naming a built-in backbone (what
    invsr-export writes): from_pretrained builds the twin; from_backbone_name is the same pipeline."""
    smoke = InvSRPipeline.from_backbone_name(name)
    smoke.set_progress_bar_config(disable=True)
    assert smoke.noise_predictor.latent_channels == smoke.vae.config.latent_channels
    assert smoke.config.base_family == backbones.family_of(name) and smoke.config.prompt is None
    smoke.noise_predictor.save_pretrained(tmp_path / "noise_predictor")
    index = model_index(name, prompt=None)
    if name == TINY:  # as written before SD3.5 existed: no transformer, no base_family
        del index["transformer"], index["base_family"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = InvSRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert (loaded.transformer is None) == (name != TINY_SD35_TURBO)
    lr = _lr(12, 8)
    assert torch.equal(loaded(lr, output_type="pt").images, smoke(lr, output_type="pt").images)
    with pytest.raises(ValueError, match="fixed prompt embedding"):
        loaded(lr, prompt="a cat")


def test_a_noise_predictor_for_other_latents_is_refused() -> None:
    sd3 = backbones.build_builtin(TINY_SD35_TURBO)
    with pytest.raises(ValueError, match="4-channel latents but the FrozenSD35Turbo has 16"):
        InvSRPipeline.from_backbone(sd3, tiny_noise_predictor(seed=0))
    sdxl = backbones.build_builtin(TINY_SDXL_TURBO)
    with pytest.raises(ValueError, match="16-channel latents"):
        InvSRPipeline.from_backbone(sdxl, tiny_noise_predictor(seed=0, latent_channels=16))


def test_model_index_and_family_names() -> None:
    assert backbones.family_of(TINY_SD35_TURBO) == "sd35_turbo"
    assert backbones.family_of(TINY_SDXL_TURBO) == "sdxl_turbo"
    assert backbones.family_of("/no/such/folder", choice="sdxl_turbo") == "sdxl_turbo"
    assert backbones.family_of("/no/such/folder", choice=TINY_SD35_TURBO) == "sd35_turbo"
    assert backbones.family_of("/no/such/folder") == "sd_turbo"
    sdxl = model_index("stabilityai/sdxl-turbo", prompt="a photo")
    assert sdxl["text_encoder"][1] == "FixedPromptEmbedding" and sdxl["tokenizer"] == [None, None]
    assert sdxl["prompt"] == "a photo" and sdxl["unet"][1] == "UNet2DConditionModel"  # embedded at load
    sd3 = model_index("/data/my-sd35", family="sd35_turbo")
    assert sd3["transformer"][1] == "SD3Transformer2DModel" and sd3["unet"] == [None, None]
    sd = model_index("stabilityai/sd-turbo")
    assert sd["text_encoder"] == ["transformers", "CLIPTextModel"] and sd["transformer"] == [None, None]


def test_fixed_prompt_embedding_pooled_round_trip(tmp_path: Path) -> None:
    embeds, pooled = torch.randn(1, 5, 8), torch.randn(1, 3)
    model = FixedPromptEmbedding.of(embeds, pooled)
    model.save_pretrained(tmp_path / "with")
    back = FixedPromptEmbedding.from_pretrained(tmp_path / "with")
    assert torch.equal(back(), embeds) and torch.equal(back.pooled_embeds, pooled)
    FixedPromptEmbedding.of(embeds).save_pretrained(tmp_path / "without")
    plain = FixedPromptEmbedding.from_pretrained(tmp_path / "without")
    assert plain.pooled_embeds is None and plain.config.pooled_dim == 0
    with pytest.raises(ValueError, match="pooled"):
        FixedPromptEmbedding.of(embeds, torch.randn(3))
