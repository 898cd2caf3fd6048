"""Inference speed options: SDPA attention, the half-precision noise predictor, padded patch batches and the
compiled path (tiny twins on CPU; tolerances stated per test and in docs/sampling.md)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from invsr_pl.models.discriminator import LatentDiscriminator
from invsr_pl.models.noise_predictor import NoisePredictor
from invsr_pl.models.sd_turbo import SD_TURBO_UNET_CONFIG, SD_TURBO_VAE_CONFIG
from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_discriminator, tiny_noise_predictor
from invsr_pl.sampling.sampler import InvSRSampler
from invsr_pl.utils.compile import compile_for_inference, is_compiled, prepare_for_inference


def _processors(module: nn.Module) -> set[type]:
    return {type(m.processor) for m in module.modules() if isinstance(m, Attention)}


def test_every_attention_uses_sdpa() -> None:
    """UNet, VAE (mid-block self-attention), noise predictor and discriminator run torch's SDPA kernels."""
    tiny = build_tiny_sd_turbo(seed=0)
    modules = [tiny.unet, tiny.vae, tiny_discriminator(seed=0)]
    assert _processors(tiny_noise_predictor(seed=0)) == set()  # attention-free twin (models/tiny.py)
    with torch.device("meta"):  # the paper/SD-Turbo configurations, without allocating their weights
        modules += [
            UNet2DConditionModel(**SD_TURBO_UNET_CONFIG),
            AutoencoderKL(**SD_TURBO_VAE_CONFIG),
            NoisePredictor(),
            LatentDiscriminator(),
        ]
    for module in modules:
        assert _processors(module) == {AttnProcessor2_0}, type(module).__name__
    assert any(isinstance(m, Attention) for m in tiny.vae.decoder.mid_block.modules())


def test_half_noise_predictor_stays_within_tolerance_of_fp32() -> None:
    """bf16 weights (CPU has no fp16 convolutions): |mean diff| <= 0.04 max, <= 0.01 RMS, std within 3 %
    (the outputs are O(1)); no worse than twice today's fp32-weights-under-autocast path."""
    model = tiny_noise_predictor(seed=0).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x, 199)
        half = copy.deepcopy(model).to(torch.bfloat16)(x, 199)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(x, 199)
    assert half.mean.dtype == torch.float32  # the Gaussian's moments are fp32 whatever the weights
    diff = (half.mean - ref.mean).abs()
    assert diff.max() <= 0.04 and diff.square().mean().sqrt() <= 0.01
    assert ((half.std - ref.std) / ref.std).abs().max() <= 0.03
    assert diff.square().mean() <= 4 * (autocast.mean - ref.mean).square().mean()


def test_prepare_for_inference_runs_the_noise_predictor_in_half_without_autocast() -> None:
    lr = torch.rand(1, 3, 16, 16)
    backbone = build_tiny_sd_turbo(seed=0, dtype="bfloat16")
    noise_predictor = tiny_noise_predictor(seed=0)
    reference = InvSRSampler(backbone, noise_predictor, chopping_size=None)(
        lr, generator=1
    )  # fp32 weights under autocast
    prepare_for_inference(backbone, noise_predictor, channels_last=True)
    assert next(noise_predictor.parameters()).dtype == torch.bfloat16 and not noise_predictor.training
    assert noise_predictor.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    keys = set(noise_predictor.state_dict())
    seen: list[bool] = []
    hook = noise_predictor.encoder.mid_block.register_forward_pre_hook(
        lambda m, args: seen.append(torch.is_autocast_enabled("cpu"))
    )
    try:
        out = InvSRSampler(backbone, noise_predictor, chopping_size=None)(lr, generator=1)
    finally:
        hook.remove()
    assert seen == [False]  # half weights: no per-call weight casts
    assert set(noise_predictor.state_dict()) == keys
    assert (out - reference).abs().mean() < 0.02  # bf16 both ways; outputs in [0, 1]
    fp32 = build_tiny_sd_turbo(seed=0)
    kept = tiny_noise_predictor(seed=0)
    prepare_for_inference(fp32, kept)  # an fp32 backbone keeps the noise predictor in fp32
    assert next(kept.parameters()).dtype == torch.float32


def test_padded_patch_batches_change_nothing_but_the_batch_size() -> None:
    """8 patches at chopping_batch 5: batches of 5 and 3; padding runs the 3 as 4 with the same outputs."""
    backbone, noise_predictor = build_tiny_sd_turbo(seed=0), tiny_noise_predictor(seed=0).eval()
    lr = torch.rand(1, 3, 80, 48)  # patch starts 0/16/32/48 x 0/16 at chopping 32
    runs = {}
    for pad in (False, True):
        sizes: list[int] = []
        hook = backbone.unet.register_forward_pre_hook(
            lambda m, args, sizes=sizes: sizes.append(args[0].shape[0])
        )
        try:
            sampler = InvSRSampler(
                backbone, noise_predictor, chopping_size=32, chopping_batch=5, pad_batches=pad
            )
            runs[pad] = sampler(lr, generator=7), sizes
        finally:
            hook.remove()
    assert runs[False][1] == [5, 3] and runs[True][1] == [5, 4]
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=1e-5, rtol=0)
    z = InvSRSampler(backbone, noise_predictor, pad_batches=True, chopping_batch=8).invert(
        torch.rand(3, 3, 16, 16), generator=torch.Generator().manual_seed(0)
    )
    assert z.shape == (3, 4, 8, 8)  # padded rows never leave the sampler


def _compiled_vs_eager(backend: str) -> tuple[torch.Tensor, torch.Tensor, InvSRSampler]:
    backbone, noise_predictor = build_tiny_sd_turbo(seed=0), tiny_noise_predictor(seed=0).eval()
    lr = torch.rand(1, 3, 48, 32, generator=torch.Generator().manual_seed(2))
    eager = InvSRSampler(backbone, noise_predictor, chopping_size=32, chopping_batch=4)(lr, generator=3)
    keys = (set(backbone.state_dict()), set(noise_predictor.state_dict()))
    compile_for_inference(backbone, noise_predictor, backend=backend)
    assert (set(backbone.state_dict()), set(noise_predictor.state_dict())) == keys  # no "_orig_mod."
    sampler = InvSRSampler(backbone, noise_predictor, chopping_size=32, chopping_batch=4)
    assert sampler.pad_batches and is_compiled(noise_predictor) and is_compiled(backbone.unet)
    return sampler(lr, generator=3), eager, sampler


@pytest.mark.slow
def test_compiled_graphs_match_eager() -> None:
    """Every network compiles as one graph (fullgraph) and gives the eager outputs (|diff| <= 1e-5)."""
    compiled, eager, _ = _compiled_vs_eager("aot_eager")
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C++ compiler")
def test_inductor_noise_predictor_matches_eager() -> None:
    """Inductor-generated CPU kernels for the noise predictor agree with eager to 1e-4 (fp32; the outputs
    are O(1)). The whole sampler under inductor is measured by benchmarks/inference.py --compile."""
    model = tiny_noise_predictor(seed=0).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(x, 199)
        model.encoder.compile(fullgraph=True, dynamic=False)
        compiled = model(x, 199)
    torch.testing.assert_close(compiled.mean, eager.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(compiled.logvar, eager.logvar, atol=1e-4, rtol=0)
