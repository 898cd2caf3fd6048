"""InvSRPipeline on the tiny twins: bit for bit the sampler, save/load round trip, inputs and outputs."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_noise_predictor
from invsr_pl.pipelines import DEFAULT_SEED, FixedPromptEmbedding, InvSRPipeline
from invsr_pl.sampling.sampler import InvSRSampler
from invsr_pl.utils.images import resize_image


@pytest.fixture(scope="module")
def pipe() -> InvSRPipeline:
    pipe = InvSRPipeline.from_backbone(build_tiny_sd_turbo(seed=0), tiny_noise_predictor(seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lr(h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


@functools.cache
def _reference() -> tuple:
    """Equal twins built apart from the pipeline's (nothing shared with it)."""
    return build_tiny_sd_turbo(seed=0), tiny_noise_predictor(seed=0).eval()


def _sampler(**kwargs) -> InvSRSampler:
    """Today's sampler on the reference twins."""
    return InvSRSampler(*_reference(), **kwargs)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("color_fix", ["none", "wavelet", "ycbcr", "adain"])
def test_pipeline_is_the_sampler_bit_for_bit(pipe: InvSRPipeline, steps: int, color_fix: str) -> None:
    """Chopped (40x24 in 16-px patches), padded up to the patch size (10x6) and one-pass inputs."""
    for (h, w), chopping in (((40, 24), 16), ((10, 6), 16), ((20, 12), None)):
        lr = _lr(h, w)
        sampler = _sampler(num_steps=steps, chopping_size=chopping, color_fix=color_fix)
        expected = sampler(lr, generator=torch.Generator().manual_seed(7))
        got = pipe(
            lr, num_inference_steps=steps, chopping_size=chopping, color_fix=color_fix, generator=7,
            output_type="pt",
        ).images  # fmt: skip
        assert got.shape == (1, 3, 4 * h, 4 * w)
        assert torch.equal(got, expected), (h, w, chopping)


def test_explicit_timesteps_and_default_seed(pipe: InvSRPipeline) -> None:
    lr = _lr(16, 16)
    expected = _sampler(timesteps=[200, 100])(lr, generator=torch.Generator().manual_seed(DEFAULT_SEED))
    assert torch.equal(pipe(lr, timesteps=[200, 100], output_type="pt").images, expected)
    with pytest.raises(ValueError, match="2 timesteps"):
        pipe(lr, num_inference_steps=3, timesteps=[200, 100])
    with pytest.raises(ValueError, match="one per image"):
        pipe([lr[0], lr[0]], generator=[torch.Generator()])


def test_save_and_from_pretrained_round_trip(pipe: InvSRPipeline, tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"model_index.json", "noise_predictor", "unet", "vae"}
    loaded = InvSRPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.text_encoder, FixedPromptEmbedding) and loaded.tokenizer is None
    assert loaded.scale == 4
    lr = _lr(24, 16)
    assert torch.equal(loaded(lr, output_type="pt").images, pipe(lr, output_type="pt").images)


def test_inputs_alpha_bit_depth_and_output_types(pipe: InvSRPipeline) -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (12, 20, 4), dtype=np.uint8)
    out = pipe(PIL.Image.fromarray(rgba), output_type="np")
    assert out.images.shape == (1, 48, 80, 4) and out.bit_depths == [8]
    alpha = torch.from_numpy(rgba[..., 3:].astype(np.float32) / 255).permute(2, 0, 1)
    np.testing.assert_array_equal(out.images[0, ..., 3], resize_image(alpha, (48, 80))[0].numpy())
    # the colour is what the RGB image alone gives
    rgb = pipe(rgba[..., :3], output_type="np").images
    np.testing.assert_array_equal(out.images[..., :3], rgb)
    # 16-bit gray and a list of different sizes: a list out, with each input's bit depth
    gray16 = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    res = pipe([gray16, rgba[..., :3]], output_type="pt", outscale=2)
    assert [tuple(i.shape) for i in res.images] == [(3, 16, 16), (3, 24, 40)] and res.bit_depths == [16, 8]
    pil = pipe(torch.rand(3, 8, 8)).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (32, 32) and pil[0].mode == "RGB"
    with pytest.raises(ValueError, match="output_type"):
        pipe(torch.rand(3, 8, 8), output_type="latent")
    with pytest.raises(ValueError, match="channels"):
        pipe(torch.rand(5, 8, 8))


def test_from_sd_turbo_builtin_backbone(pipe: InvSRPipeline) -> None:
    """The smoke-mode build: a built-in backbone name and the random tiny noise predictor."""
    smoke = InvSRPipeline.from_sd_turbo("tiny", noise_predictor=None)
    smoke.set_progress_bar_config(disable=True)
    assert smoke.config.base_model == "tiny" and smoke.config.prompt is None
    lr = _lr(16, 16)
    assert torch.equal(smoke(lr, output_type="pt").images, pipe(lr, output_type="pt").images)
    with pytest.raises(ValueError, match="fixed prompt"):
        smoke(lr, prompt="a cat")
