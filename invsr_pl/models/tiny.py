"""The tiny configurations: CPU-sized twins of SD-Turbo, the noise predictor and the discriminator.

Every test, benchmark, YAML option (``conf/model/*/tiny.yaml``) and the SR command's smoke mode builds its
tiny networks here, so there is one tiny configuration per network.

The SD-Turbo twin has the same interface and geometry as SD-Turbo where it matters to callers: VAE
factor 8, 4 latent channels, scaling 0.18215, cross-attention on a ``(1, 77, D)`` prompt embedding,
SD-Turbo's scheduler (same sigma table). Random, seeded weights; builds in well under a second and runs a
64x64 image in milliseconds on CPU. The tiny UNet has two levels (one x2 downsampler) instead of SD-Turbo's
four; both take any latent size because diffusers' UNet passes explicit upsample sizes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from invsr_pl.models.discriminator import LatentDiscriminator
from invsr_pl.models.noise_predictor import NoisePredictor, down_stages
from invsr_pl.models.sd_turbo import SD_TURBO_VAE_CONFIG, FrozenSDTurbo, build_from_configs

# NoisePredictor kwargs of the tiny x4 twin (96 k parameters): one width per block, so ``scale`` only
# changes the number of blocks (see tiny_noise_predictor). No self-attention anywhere: the paper's first
# AttnDownBlock2D attends over every LR pixel (16 k tokens for a 128-px patch: ~3 s per call on a CPU,
# against 0.1 s without); a twin exists to be fast. The paper configuration keeps its attention.
TINY_NOISE_PREDICTOR: dict[str, Any] = {
    "block_out_channels": (32, 32),
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "temb_channels": 32,
    "mid_block_add_attention": False,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "scale": 4,
}
# LatentDiscriminator kwargs of the tiny twin; cross_attention_dim matches build_tiny_sd_turbo's prompt width.
TINY_DISCRIMINATOR: dict[str, Any] = {
    "block_out_channels": (32, 32, 64),
    "layers_per_block": 1,
    "num_attention_heads": (2, 2, 4),
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "addition_embed_type_num_heads": 4,
}


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the weights' initialisation without touching the caller's global RNG (``None``: no seeding)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_noise_predictor(scale: int = 4, seed: int | None = None, **overrides: Any) -> NoisePredictor:
    """The tiny ``NoisePredictor`` (:data:`TINY_NOISE_PREDICTOR`) for SR factor ``scale``.

    Args:
        scale: SR factor; the number of 32-wide blocks follows it (x4: 2, x2: 3, x8: 1) unless
            ``block_out_channels`` is overridden.
        seed: seeds the weights (the global RNG is left untouched); ``None`` draws from the global RNG.
        **overrides: any other ``NoisePredictor`` kwarg; ``down_block_types`` defaults to one
            ``"DownBlock2D"`` (no attention) per block.
    """
    kwargs = {**TINY_NOISE_PREDICTOR, "scale": scale, **overrides}
    if "block_out_channels" not in overrides:
        stages = down_stages(scale, kwargs.get("vae_scale_factor", 8))
        kwargs["block_out_channels"] = (TINY_NOISE_PREDICTOR["block_out_channels"][0],) * (stages + 1)
    if "down_block_types" not in overrides:
        kwargs["down_block_types"] = ("DownBlock2D",) * len(kwargs["block_out_channels"])
    with _seeded(seed):
        return NoisePredictor(**kwargs)


def tiny_discriminator(seed: int | None = None, **overrides: Any) -> LatentDiscriminator:
    """The tiny ``LatentDiscriminator`` (:data:`TINY_DISCRIMINATOR`), e.g. ``cross_attention_dim=...``.

    Args:
        seed: seeds the weights (the global RNG is left untouched); ``None`` draws from the global RNG.
        **overrides: any other ``LatentDiscriminator`` kwarg.
    """
    with _seeded(seed):
        return LatentDiscriminator(**{**TINY_DISCRIMINATOR, **overrides})


def tiny_unet_config(cross_attention_dim: int = 32) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs: two levels (32, 64), one cross-attention block, 8 norm groups."""
    return {
        "sample_size": 8,  # 64 px / 8
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": True,  # as SD-2.x / SD-Turbo
        "norm_num_groups": 8,
    }


def tiny_vae_config() -> dict[str, Any]:
    """``AutoencoderKL`` kwargs: SD-Turbo's VAE geometry (four levels, three x2 downsamplers -> factor 8,
    4 latent channels, scaling 0.18215) at a few channels."""
    return {
        **SD_TURBO_VAE_CONFIG,
        "block_out_channels": (8, 16, 16, 16),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
    }


def build_tiny_sd_turbo(
    seed: int = 0, dtype: str = "float32", cross_attention_dim: int = 32
) -> FrozenSDTurbo:
    """Tiny random ``FrozenSDTurbo`` (frozen, eval, ``dtype`` weights) with SD-Turbo's scheduler.

    Args:
        seed: seeds the weights and the random ``(1, 77, cross_attention_dim)`` prompt embedding (the
            global RNG is left untouched).
        dtype: weight dtype, ``"float32"`` by default (see ``sd_turbo.resolve_dtype``).
        cross_attention_dim: width of the prompt embedding (the discriminator's conditioning must match it).
    """
    return build_from_configs(
        tiny_unet_config(cross_attention_dim), tiny_vae_config(), seed=seed, dtype=dtype
    )
