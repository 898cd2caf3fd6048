"""FrozenSDXLTurbo: the frozen SDXL-Turbo prior (docs/backbones.md).

SDXL-Turbo is SD-Turbo's recipe (adversarial diffusion distillation) on SDXL: the same epsilon prediction and
Euler sigma table (scaled-linear betas 0.00085 to 0.012), so InvSR's maths is SD-Turbo's unchanged
(:class:`~invsr_pl.models.sd_turbo.FrozenSDTurbo`). What differs is the conditioning: the UNet attends to two
CLIP encoders' penultimate hidden states side by side (``(1, 77, 768 + 1280)``), and its added conditioning
takes the second encoder's pooled embedding and six "time ids" (original size, crop corner, target size).
All of it is computed once at load and cached; the text encoders are then released.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from torch import Tensor

from invsr_pl.models.backbone import resolve_dtype, seeded
from invsr_pl.models.sd_turbo import POSITIVE_PROMPT, FrozenSDTurbo
from invsr_pl.models.timesteps import SD_TURBO_SCHEDULER_CONFIG, build_scheduler
from invsr_pl.models.weights_folder import (
    BackboneWeightsNotFound,
    WeightsSpec,
    load_part,
    not_found,
    resolve_folder,
)

__all__ = [
    "DEFAULT_MODEL_ID",
    "SDXL_TURBO_UNET_CONFIG",
    "SDXL_TURBO_VAE_CONFIG",
    "FrozenSDXLTurbo",
    "BackboneWeightsNotFound",
    "encode_sdxl_prompt",
    "size_time_ids",
]

DEFAULT_MODEL_ID = "stabilityai/sdxl-turbo"

WEIGHTS = WeightsSpec(
    name="SDXL-Turbo",
    model_id=DEFAULT_MODEL_ID,
    subfolders=("unet", "vae", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
    layout=(
        "unet/, vae/ (config.json + diffusion_pytorch_model.safetensors each), "
        "scheduler/scheduler_config.json, text_encoder/ and text_encoder_2/ "
        "(config.json + model.safetensors), tokenizer/ and tokenizer_2/"
    ),
    hub_patterns=[
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "scheduler/*",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.fp16.safetensors",
        "tokenizer/*",
        "tokenizer_2/*",
    ],
)

# docs/backbones.md: the SDXL UNet of stabilityai/sdxl-turbo (2,567,463,684 parameters), written out so that
# a random twin (memory estimates, benchmarks) is built without a download.
SDXL_TURBO_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,  # 512 px / 8: SDXL-Turbo's native size (SDXL base: 128)
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,  # CLIP ViT-L (768) + OpenCLIP bigG (1280) hidden states
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled bigG (1280) + 6 time ids x 256
    "norm_num_groups": 32,
}
# docs/backbones.md: the SDXL VAE (x8, 4 channels, scaling 0.13025); it overflows in fp16 (force_upcast).
SDXL_TURBO_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
_PROMPT_TOKENS = 77
_TIME_IDS = 6


def size_time_ids(size: int) -> Tensor:
    """``(1, 6)`` SDXL micro-conditioning of a square ``size`` px image: original size, crop (0,0), target."""
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)


@torch.no_grad()
def encode_sdxl_prompt(
    folder: Path, prompt: str, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """SDXL's prompt conditioning, as diffusers' SDXL pipeline computes it without classifier-free guidance.

    Both CLIP encoders see the prompt padded to 77 tokens; the penultimate hidden states are concatenated
    along the width and the second encoder's projected pooled output is the pooled embedding. The encoders
    run in fp32 on CPU (fp16 CPU kernels are incomplete) and are released afterwards.

    Returns:
        ``(prompt_embeds (1, 77, D1 + D2), pooled_prompt_embeds (1, P))`` in ``dtype``.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    enc_dtype = dtype if device.type == "cuda" else torch.float32
    hidden, pooled = [], None
    for sub, model_cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder=f"tokenizer{sub}")
        encoder = load_part(model_cls, folder, f"text_encoder{sub}", dtype, dtype=enc_dtype)
        encoder.to(device).eval()
        ids = tokenizer(
            prompt,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the last (projected) encoder's pooled output, as diffusers
        del encoder
    return torch.cat(hidden, dim=-1).to(dtype), pooled.to(dtype)


class FrozenSDXLTurbo(FrozenSDTurbo):
    """Frozen SDXL-Turbo: :class:`FrozenSDTurbo`'s VE epsilon maths with SDXL's added conditioning.

    Args:
        unet: SDXL's ``UNet2DConditionModel`` (``addition_embed_type="text_time"``) or a tiny twin.
        vae: ``AutoencoderKL`` (scaling 0.13025); kept in float32 when the weights are float16 (it overflows).
        scheduler: ``EulerDiscreteScheduler`` (SD-Turbo's betas; only its ``alphas_cumprod`` is used).
        prompt_embeds: ``(1, 77, cross_attention_dim)`` prompt embedding.
        pooled_prompt_embeds: ``(1, P)`` pooled embedding, ``P + 6 * addition_time_embed_dim`` =
            ``projection_class_embeddings_input_dim``.
        dtype: weight dtype (see :func:`resolve_dtype`); None keeps the UNet's.
        size_condition: the square image size in the time ids; None: the UNet's native size
            (``sample_size * 8``, 512 for SDXL-Turbo, what diffusers' pipeline uses by default).
        execution_device: see :class:`~invsr_pl.models.backbone.FrozenBackbone`.
    """

    vae_fp16_overflows = True

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: EulerDiscreteScheduler,
        prompt_embeds: Tensor,
        pooled_prompt_embeds: Tensor,
        dtype: str | torch.dtype | None = None,
        size_condition: int | None = None,
        execution_device: torch.device | None = None,
    ) -> None:
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(
                "FrozenSDXLTurbo needs an SDXL UNet (addition_embed_type='text_time'), got "
                f"addition_embed_type={unet.config.addition_embed_type!r}"
            )
        expected = (
            unet.config.projection_class_embeddings_input_dim
            - _TIME_IDS * unet.config.addition_time_embed_dim
        )
        if pooled_prompt_embeds.ndim != 2 or pooled_prompt_embeds.shape[-1] != expected:
            raise ValueError(
                f"pooled_prompt_embeds must be (1, {expected}), got {tuple(pooled_prompt_embeds.shape)}"
            )
        super().__init__(
            unet,
            vae,
            scheduler,
            prompt_embeds,
            dtype=dtype,
            execution_device=execution_device,
            pooled_prompt_embeds=pooled_prompt_embeds,
        )
        size = int(size_condition or unet.config.sample_size * self.vae_scale_factor)
        time_ids = size_time_ids(size).to(device=self.sigmas.device, dtype=self.prompt_embeds.dtype)
        self.register_buffer("add_time_ids", time_ids, persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL_ID,
        dtype: str = "auto",
        prompt: str = POSITIVE_PROMPT,
        revision: str | None = None,
        cache_dir: str | None = None,
        device: str | None = None,
        latent_channels: int | None = None,
        cross_attention_dim: int | None = None,
        size_condition: int | None = None,
    ) -> FrozenSDXLTurbo:
        """Load SDXL-Turbo from a hub id or a local folder with the diffusers layout.

        Args:
            model: hub id (default ``stabilityai/sdxl-turbo``) or a folder (see :data:`WEIGHTS`).
            dtype: weight dtype (``"auto"``: fp16 on CUDA, fp32 on CPU; the VAE stays fp32 under fp16).
            prompt: text embedded once with both text encoders (then released).
            revision / cache_dir: hub revision and cache folder.
            device: where to put the weights (None: CPU; Lightning moves the module later).
            latent_channels / cross_attention_dim: the geometry the config expects, checked (None: any).
            size_condition: see the class.

        Raises:
            BackboneWeightsNotFound: the weights are not available locally and the hub is offline/unreachable.
            ValueError: the loaded model's geometry differs from the expected one.
        """
        target = torch.device(device) if device is not None else torch.device("cpu")
        weight_dtype = resolve_dtype(dtype, device)
        folder = str(resolve_folder(WEIGHTS, str(model), revision, cache_dir))
        try:
            unet = load_part(UNet2DConditionModel, folder, "unet", weight_dtype, torch_dtype=weight_dtype)
            vae = load_part(AutoencoderKL, folder, "vae", weight_dtype, torch_dtype=weight_dtype)
            scheduler = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
            prompt_embeds, pooled = encode_sdxl_prompt(Path(folder), prompt, weight_dtype, target)
        except OSError as err:  # diffusers/transformers report missing files as OSError
            raise not_found(WEIGHTS, str(model), f"files are missing in {folder} ({err})") from err
        backbone = cls(unet, vae, scheduler, prompt_embeds, pooled, weight_dtype, size_condition).to(target)
        return backbone.check_geometry(latent_channels, cross_attention_dim, source=str(model))

    @classmethod
    def from_configs(
        cls,
        unet_config: dict[str, Any],
        vae_config: dict[str, Any],
        seed: int = 0,
        dtype: str | torch.dtype = "float32",
    ) -> FrozenSDXLTurbo:
        """Random weights and a random prompt conditioning from config dicts (seeded; the global RNG is left
        untouched): the tiny twin (``models/tiny.py``) and the full-size architecture for memory checks."""
        with seeded(seed):
            unet = UNet2DConditionModel(**unet_config)
            vae = AutoencoderKL(**vae_config)
            config = unet.config
            pooled_dim = (
                config.projection_class_embeddings_input_dim - _TIME_IDS * config.addition_time_embed_dim
            )
            prompt_embeds = torch.randn(1, _PROMPT_TOKENS, config.cross_attention_dim)
            pooled = torch.randn(1, pooled_dim)
        scheduler = build_scheduler(SD_TURBO_SCHEDULER_CONFIG)  # SDXL-Turbo's betas are SD-Turbo's
        return cls(unet, vae, scheduler, prompt_embeds, pooled, dtype=resolve_dtype(dtype))

    def _added_conditions(self, batch: int) -> dict[str, Any]:
        """SDXL's ``added_cond_kwargs``: the pooled prompt and the time ids, one row per sample."""
        device = self.prompt_embeds.device
        return {
            "added_cond_kwargs": {
                "text_embeds": self.pooled_prompt_embeds.to(device).expand(batch, -1),
                "time_ids": self.add_time_ids.to(device).expand(batch, -1),
            }
        }
