"""A tiny random SD-Turbo twin for tests and smoke runs (ARCHITECTURE C4.12, diffusers' dummy components).

Same interface and geometry as SD-Turbo where it matters to callers: VAE factor 8, 4 latent channels,
scaling 0.18215, cross-attention on a ``(1, 77, D)`` prompt embedding, SD-Turbo's scheduler (same sigma
table). Random, seeded weights; builds in well under a second and runs a 64x64 image in milliseconds on CPU.
The tiny UNet has two levels (one x2 downsampler) instead of SD-Turbo's four; both take any latent size
because diffusers' UNet passes explicit upsample sizes.
"""

from __future__ import annotations

from typing import Any

from invsr_pl.models.sd_turbo import SD_TURBO_VAE_CONFIG, FrozenSDTurbo, build_from_configs


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
