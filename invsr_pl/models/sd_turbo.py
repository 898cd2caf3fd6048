"""FrozenSDTurbo: the frozen SD-Turbo prior (VAE + UNet + sigma table + cached prompt embedding).

A thin wrapper around released diffusers classes (``UNet2DConditionModel``, ``AutoencoderKL``,
``EulerDiscreteScheduler``); the text encoder is used once at load to embed the prompt and then dropped
(docs/conventions.md). Weights are frozen, always in eval mode and cast to the configured dtype in the
constructor, i.e. before Lightning/DDP can wrap anything (docs/lightning.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from torch import Tensor, nn

from invsr_pl.models.backbone import FrozenBackbone, resolve_dtype, seeded
from invsr_pl.models.timesteps import (
    SD_TURBO_SCHEDULER_CONFIG,
    add_noise,
    batch_index,
    build_scheduler,
    scale_model_input,
    sigmas_from_alphas_cumprod,
    x0_from_eps,
)
from invsr_pl.models.weights_folder import BackboneWeightsNotFound, WeightsSpec, not_found
from invsr_pl.models.weights_folder import resolve_folder as resolve_weights_folder

__all__ = [
    "DEFAULT_MODEL_ID",
    "POSITIVE_PROMPT",
    "BackboneWeightsNotFound",
    "FrozenSDTurbo",
    "build_from_configs",
    "embed_prompt",
    "encode_prompt",
    "resolve_dtype",
    "resolve_folder",
]

# docs/conventions.md: the positive prompt is used for training, validation and inference at every step.
POSITIVE_PROMPT = (
    "Cinematic, high-contrast, photo-realistic, 8k, ultra HD, meticulous detailing, hyper sharpness, "
    "perfect without deformations"
)
DEFAULT_MODEL_ID = "stabilityai/sd-turbo"

# The diffusers folder layout a local SD-Turbo copy must have (what `hf download` produces).
REQUIRED_SUBFOLDERS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer")
_EXPECTED_LAYOUT = (
    "unet/{config.json, diffusion_pytorch_model.safetensors}, vae/{config.json, "
    "diffusion_pytorch_model.safetensors}, scheduler/scheduler_config.json, text_encoder/{config.json, "
    "model.safetensors}, tokenizer/{vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json}"
)
_HUB_PATTERNS = [
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/*",
]

# docs/conventions.md: SD-2.1-layout UNet of stabilityai/sd-turbo (865,910,724 parameters), written out so
# that a randomly initialised twin can be built without downloading anything.
SD_TURBO_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,  # 512 px / 8
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20, 20),  # diffusers' legacy name: number of heads per block for SD-2.x
    "cross_attention_dim": 1024,  # OpenCLIP-H text width
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
}
# docs/conventions.md: SD-2.1 VAE (downsampling x8, 4 latent channels, scaling 0.18215, no latent mean/std).
SD_TURBO_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "act_fn": "silu",
}
_PROMPT_TOKENS = 77  # CLIP context length (docs/conventions.md)

WEIGHTS = WeightsSpec(
    name="SD-Turbo",
    model_id=DEFAULT_MODEL_ID,
    subfolders=REQUIRED_SUBFOLDERS,
    layout=_EXPECTED_LAYOUT,
    hub_patterns=_HUB_PATTERNS,
)


def _not_found(model: str, reason: str) -> BackboneWeightsNotFound:
    return not_found(WEIGHTS, model, reason)


def resolve_folder(model: str, revision: str | None, cache_dir: str | None) -> Path:
    """Local SD-Turbo folder for ``model`` (a folder or hub id): :func:`weights_folder.resolve_folder`."""
    return resolve_weights_folder(WEIGHTS, model, revision, cache_dir)


@torch.no_grad()
def encode_prompt(folder: Path, prompt: str, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(1, 77, D)`` last hidden state of the SD-Turbo text encoder for ``prompt`` (docs/conventions.md).

    The text encoder runs in fp32 on CPU (fp16 CPU kernels are incomplete) and is released afterwards.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    enc_dtype = dtype if device.type == "cuda" else torch.float32
    text_encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", dtype=enc_dtype)
    text_encoder.to(device).eval()
    embeds = embed_prompt(tokenizer, text_encoder, prompt)
    del text_encoder
    return embeds.to(dtype)


@torch.no_grad()
def embed_prompt(tokenizer: Any, text_encoder: nn.Module, prompt: str) -> Tensor:
    """``(1, 77, D)`` last hidden state of ``text_encoder`` (a CLIP text model) for ``prompt``, in the text
    encoder's dtype on its device; padded to the tokenizer's length, no clip-skip (docs/conventions.md)."""
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]


class FrozenSDTurbo(FrozenBackbone):
    """Frozen SD-Turbo: VAE encode/decode, epsilon and x0 prediction in the VE (Euler) parameterisation.

    Conventions (docs/conventions.md): latents are *scaled* (posterior sample * 0.18215), float32 at the
    edges; ``index`` is the diffusion index (user timestep - 1); ``z_t = z + sigma * eps``; the sampler's
    direction is the predicted noise, so a step continues from ``x0_hat + sigma_next * eps_hat``.

    Args:
        unet: SD-Turbo's ``UNet2DConditionModel`` (or a tiny twin).
        vae: ``AutoencoderKL`` with ``config.scaling_factor`` set.
        scheduler: ``EulerDiscreteScheduler``; kept only for its config and ``alphas_cumprod``.
        prompt_embeds: ``(1, 77, cross_attention_dim)`` prompt embedding, cached as a buffer.
        dtype: weight dtype (see :func:`resolve_dtype`); ``None`` keeps the UNet's current dtype.
        execution_device: see :class:`~invsr_pl.models.backbone.FrozenBackbone`.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: EulerDiscreteScheduler,
        prompt_embeds: Tensor,
        dtype: str | torch.dtype | None = None,
        execution_device: torch.device | None = None,
        **conditioning: Tensor | None,
    ) -> None:
        d = unet.config.cross_attention_dim
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1 or prompt_embeds.shape[2] != d:
            raise ValueError(f"prompt_embeds must be (1, tokens, {d}), got {tuple(prompt_embeds.shape)}")
        sigmas = sigmas_from_alphas_cumprod(scheduler.alphas_cumprod)  # (1000,) ascending (conventions.md)
        super().__init__(
            unet,
            vae,
            scheduler,
            sigmas,
            prompt_embeds,
            dtype,
            execution_device=execution_device,
            **conditioning,
        )

    # ---------------------------------------------------------------- construction

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
    ) -> FrozenSDTurbo:
        """Load SD-Turbo from a hub id or a local folder with the diffusers layout.

        Args:
            model: hub id (default ``stabilityai/sd-turbo``) or a folder with ``unet/``, ``vae/``,
                ``scheduler/``, ``text_encoder/``, ``tokenizer/``.
            dtype: weight dtype, see :func:`resolve_dtype` (``"auto"``: fp16 on CUDA, fp32 on CPU).
            prompt: text embedded once with the text encoder (which is then released).
            revision: hub revision; cache_dir: hub cache folder.
            device: where to put the weights (``None``: CPU; Lightning moves the module later).
            latent_channels / cross_attention_dim: the geometry the config expects (what the noise predictor,
                discriminator and latent LPIPS are built for); checked against the loaded model, None: any.

        Raises:
            BackboneWeightsNotFound: the weights are not available locally and the hub is offline/unreachable.
            ValueError: the loaded model's geometry differs from the expected one.
        """
        target = torch.device(device) if device is not None else torch.device("cpu")
        weight_dtype = resolve_dtype(dtype, device)
        folder = resolve_folder(str(model), revision, cache_dir)
        try:
            unet = UNet2DConditionModel.from_pretrained(
                str(folder), subfolder="unet", torch_dtype=weight_dtype
            )
            vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=weight_dtype)
            scheduler = EulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
            prompt_embeds = encode_prompt(folder, prompt, weight_dtype, target)
        except OSError as err:  # diffusers/transformers report missing files as OSError/EnvironmentError
            raise _not_found(str(model), f"files are missing in {folder} ({err})") from err
        backbone = cls(unet, vae, scheduler, prompt_embeds, dtype=weight_dtype).to(target)
        return backbone.check_geometry(latent_channels, cross_attention_dim, source=str(model))

    @classmethod
    def random_sd_turbo(cls, seed: int = 0, dtype: str = "float32") -> FrozenSDTurbo:
        """The exact SD-Turbo UNet/VAE architecture with random weights and a random ``(1, 77, 1024)`` prompt.

        For shape and memory checks without the real weights; slow to build (~1 B parameters).
        """
        return build_from_configs(SD_TURBO_UNET_CONFIG, SD_TURBO_VAE_CONFIG, seed=seed, dtype=dtype)

    # ---------------------------------------------------------------- geometry

    @property
    def latent_multiple(self) -> int:
        """The UNet's spatial factor: 2 ** (number of down blocks - 1) (8 for SD-Turbo, docs/sampling.md)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    # ---------------------------------------------------------------- maths

    def _added_conditions(self, batch: int) -> dict[str, Any]:
        """Extra UNet keyword arguments (SDXL's ``added_cond_kwargs``); none for SD-Turbo."""
        return {}

    def predict_eps(self, z_t: Tensor, index: Tensor | int) -> Tensor:
        """UNet noise prediction for the VE state ``z_t`` (docs/conventions.md, docs/sampling.md).

        Args:
            z_t: ``(B, 4, h, w)`` float VE state ``z + sigma * eps``.
            index: ``(B,)`` int64 diffusion indices (an int or a 0-d/``(1,)`` tensor is broadcast).

        Returns:
            ``(B, 4, h, w)`` float32 ``eps_hat``. Differentiable w.r.t. ``z_t`` (weights are frozen).
        """
        self._check_latent(z_t, "z_t")
        idx = batch_index(index, z_t.shape[0], z_t.device)
        sigma = self.sigma(idx)  # (B,) float32
        x = scale_model_input(z_t.float(), sigma).to(self.dtype)  # VE -> VP input, z / sqrt(1 + sigma^2)
        cond = self._prompt_batch(z_t)
        extra = self._added_conditions(z_t.shape[0])
        eps = self.unet(x, idx, encoder_hidden_states=cond, return_dict=False, **extra)[0]
        return eps.float()

    def predict_x0(self, z_t: Tensor, index: Tensor | int) -> Tensor:
        """``(B, 4, h, w)`` float32 ``x0_hat = z_t - sigma * eps_hat`` (docs/conventions.md)."""
        return self.denoise(z_t, index)[0]

    def start_state(self, z_lq: Tensor, noise: Tensor, index: Tensor | int) -> Tensor:
        """``z_t = z_lq + sigma_t * noise`` (VE form, the paper's Eq. 8 in SD-Turbo's parameterisation)."""
        idx = batch_index(index, z_lq.shape[0], z_lq.device)
        return z_lq.float() + self.sigma(idx).view(-1, 1, 1, 1) * noise.float()

    def denoise(self, z_t: Tensor, index: Tensor | int) -> tuple[Tensor, Tensor]:
        """``(x0_hat, eps_hat)`` with ``x0_hat = z_t - sigma * eps_hat`` (docs/conventions.md)."""
        idx = batch_index(index, z_t.shape[0], z_t.device)
        eps = self.predict_eps(z_t, idx)
        return x0_from_eps(z_t.float(), eps, self.sigma(idx)), eps

    def renoise(self, x0: Tensor, direction: Tensor, index: Tensor | int) -> Tensor:
        """``x0_hat + sigma * eps_hat``: the deterministic Euler step (s_churn 0) to ``index``'s sigma."""
        idx = batch_index(index, x0.shape[0], x0.device)
        return add_noise(x0, direction, self.sigma(idx))


def build_from_configs(
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    scheduler_config: dict[str, Any] | None = None,
) -> FrozenSDTurbo:
    """Randomly initialised backbone from UNet/VAE config dicts (seeded; the global RNG is left untouched).

    Args:
        unet_config / vae_config: ``UNet2DConditionModel`` / ``AutoencoderKL`` constructor kwargs.
        seed: seed for the weights and the random ``(1, 77, cross_attention_dim)`` prompt embedding.
        dtype: weight dtype (see :func:`resolve_dtype`).
        scheduler_config: defaults to SD-Turbo's (docs/conventions.md).
    """
    with seeded(seed):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        dim = unet.config.cross_attention_dim
        prompt_embeds = torch.randn(1, _PROMPT_TOKENS, dim)
    scheduler = build_scheduler(scheduler_config or SD_TURBO_SCHEDULER_CONFIG)
    return FrozenSDTurbo(unet, vae, scheduler, prompt_embeds, dtype=resolve_dtype(dtype))
