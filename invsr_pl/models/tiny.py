"""The tiny configurations: CPU-sized twins of the priors (SD-Turbo, SDXL-Turbo, SD3.5 Large Turbo), the noise
predictor and the discriminator.

Every test, benchmark, YAML option (``conf/model/*/tiny.yaml``) and the SR command's smoke mode builds its
tiny networks here, so there is one tiny configuration per network.

The SD-Turbo twin has the same interface and geometry as SD-Turbo where it matters to callers: VAE
factor 8, 4 latent channels, scaling 0.18215, cross-attention on a ``(1, 77, D)`` prompt embedding,
SD-Turbo's scheduler (same sigma table). Random, seeded weights; builds in well under a second and runs a
64x64 image in milliseconds on CPU. The tiny UNet has two levels (one x2 downsampler) instead of SD-Turbo's
four; both take any latent size because diffusers' UNet passes explicit upsample sizes.
"""

from __future__ import annotations

from typing import Any

from invsr_pl.models.backbone import seeded
from invsr_pl.models.discriminator import LatentDiscriminator
from invsr_pl.models.noise_predictor import NoisePredictor, down_stages
from invsr_pl.models.sd35_turbo import SD35_VAE_CONFIG, FrozenSD35Turbo
from invsr_pl.models.sd_turbo import SD_TURBO_VAE_CONFIG, FrozenSDTurbo, build_from_configs
from invsr_pl.models.sdxl_turbo import SDXL_TURBO_VAE_CONFIG, FrozenSDXLTurbo

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


def tiny_noise_predictor(
    scale: int = 4, seed: int | None = None, latent_channels: int = 4, **overrides: Any
) -> NoisePredictor:
    """The tiny ``NoisePredictor`` (:data:`TINY_NOISE_PREDICTOR`) for SR factor ``scale``.

    Args:
        scale: SR factor; the number of 32-wide blocks follows it (x4: 2, x2: 3, x8: 1) unless
            ``block_out_channels`` is overridden.
        seed: seeds the weights (the global RNG is left untouched); ``None`` draws from the global RNG.
        latent_channels: latent channels of the backbone (4; 16 for SD3.5): the output has twice that.
        **overrides: any other ``NoisePredictor`` kwarg; ``down_block_types`` defaults to one
            ``"DownBlock2D"`` (no attention) per block.
    """
    kwargs = {**TINY_NOISE_PREDICTOR, "scale": scale, "latent_channels": latent_channels, **overrides}
    if "block_out_channels" not in overrides:
        stages = down_stages(scale, kwargs.get("vae_scale_factor", 8))
        kwargs["block_out_channels"] = (TINY_NOISE_PREDICTOR["block_out_channels"][0],) * (stages + 1)
    if "down_block_types" not in overrides:
        kwargs["down_block_types"] = ("DownBlock2D",) * len(kwargs["block_out_channels"])
    with seeded(seed):
        return NoisePredictor(**kwargs)


def tiny_discriminator(seed: int | None = None, **overrides: Any) -> LatentDiscriminator:
    """The tiny ``LatentDiscriminator`` (:data:`TINY_DISCRIMINATOR`), e.g. ``cross_attention_dim=...``.

    Args:
        seed: seeds the weights (the global RNG is left untouched); ``None`` draws from the global RNG.
        **overrides: any other ``LatentDiscriminator`` kwarg.
    """
    with seeded(seed):
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


def tiny_sdxl_unet_config(cross_attention_dim: int = 32, pooled_dim: int = 32) -> dict[str, Any]:
    """SDXL-layout ``UNet2DConditionModel`` kwargs at CPU size: :func:`tiny_unet_config` plus SDXL's added
    conditioning (``text_time``: a ``pooled_dim`` pooled prompt and six time ids of width 8)."""
    time_dim = 8
    return {
        **tiny_unet_config(cross_attention_dim),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": pooled_dim + 6 * time_dim,
    }


def tiny_sdxl_vae_config() -> dict[str, Any]:
    """:func:`tiny_vae_config` with SDXL's latent scaling (0.13025) and its fp16 upcast flag."""
    return {
        **tiny_vae_config(),
        "scaling_factor": SDXL_TURBO_VAE_CONFIG["scaling_factor"],
        "force_upcast": True,
    }


def build_tiny_sdxl_turbo(
    seed: int = 0, dtype: str = "float32", cross_attention_dim: int = 32
) -> FrozenSDXLTurbo:
    """Tiny random ``FrozenSDXLTurbo``: the SDXL UNet class with added conditioning, 4-channel VAE (x8).

    Args:
        seed: seeds the weights and the random prompt / pooled embeddings (the global RNG is left untouched).
        dtype: weight dtype, ``"float32"`` by default.
        cross_attention_dim: width of the prompt embedding (the discriminator's conditioning must match it).
    """
    return FrozenSDXLTurbo.from_configs(
        tiny_sdxl_unet_config(cross_attention_dim), tiny_sdxl_vae_config(), seed=seed, dtype=dtype
    )


def tiny_sd35_transformer_config(cross_attention_dim: int = 32, latent_channels: int = 16) -> dict[str, Any]:
    """``SD3Transformer2DModel`` kwargs at CPU size: two MMDiT blocks of 2 x 8-wide heads, patch 2,
    16 channels, RMS q/k norm as SD3.5; positions for latents up to 128 (1024-px patches)."""
    return {
        "sample_size": 16,
        "patch_size": 2,
        "in_channels": latent_channels,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": cross_attention_dim,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 16,
        "out_channels": latent_channels,
        "pos_embed_max_size": 64,
        "qk_norm": "rms_norm",
    }


def tiny_sd35_vae_config(latent_channels: int = 16) -> dict[str, Any]:
    """SD3's VAE geometry (x8, 16 channels, shift 0.0609, scaling 1.5305, no quant convs), few channels."""
    return {
        **SD35_VAE_CONFIG,
        "latent_channels": latent_channels,
        "block_out_channels": (8, 16, 16, 16),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
    }


def build_tiny_sd35_turbo(
    seed: int = 0, dtype: str = "float32", cross_attention_dim: int = 32, latent_channels: int = 16
) -> FrozenSD35Turbo:
    """Tiny random ``FrozenSD35Turbo``: the SD3 transformer class, a 16-channel shifted VAE, flow times.

    Args:
        seed: seeds the weights and the random ``(1, 77, cross_attention_dim)`` prompt and pooled embeddings.
        dtype: weight dtype, ``"float32"`` by default.
        cross_attention_dim: width of the prompt embedding (``joint_attention_dim``; the discriminator's
            conditioning must match it).
        latent_channels: VAE latent channels (16 as SD3; the noise predictor, discriminator and latent
            LPIPS configs read it).
    """
    return FrozenSD35Turbo.from_configs(
        tiny_sd35_transformer_config(cross_attention_dim, latent_channels),
        tiny_sd35_vae_config(latent_channels),
        seed=seed,
        dtype=dtype,
        prompt_tokens=77,
    )
