"""FrozenSD35Turbo: the frozen Stable Diffusion 3.5 Large Turbo prior, a rectified flow (docs/backbones.md).

Differences from SD-Turbo that InvSR sees:

- the denoiser is an ``SD3Transformer2DModel`` (MMDiT, patch size 2) predicting the velocity
  ``v = eps - z0`` of the straight path ``z_s = (1 - s) z0 + s eps``;
- the VAE has 16 latent channels and a shift: latents are ``(z - 0.0609) * 1.5305``;
- the conditioning is two CLIP encoders' penultimate hidden states (zero-padded to T5's width) followed by
  T5-XXL's, ``(1, 77 + 256, 4096)``, and the two CLIPs' pooled outputs, ``(1, 2048)``; computed once at load.

The paper's Eq. 8 becomes ``z_s = (1 - s) z_lq + s eps_hat`` and ``x0_hat = z_s - s v_hat``; a further step
is ``x0_hat + s_next v_hat`` (the Euler step of the flow, docs/backbones.md). User timesteps index the
SNR-matched flow times of :func:`invsr_pl.models.timesteps.flow_sigmas`; the transformer sees ``1000 s``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor

from invsr_pl.models.backbone import FrozenBackbone, resolve_dtype, seeded
from invsr_pl.models.sd_turbo import POSITIVE_PROMPT
from invsr_pl.models.timesteps import batch_index, flow_sigmas
from invsr_pl.models.weights_folder import WeightsSpec, load_part, not_found, resolve_folder

__all__ = [
    "DEFAULT_MODEL_ID",
    "SD35_LARGE_TRANSFORMER_CONFIG",
    "SD35_SCHEDULER_CONFIG",
    "SD35_VAE_CONFIG",
    "FrozenSD35Turbo",
    "encode_sd3_prompt",
]

DEFAULT_MODEL_ID = "stabilityai/stable-diffusion-3.5-large-turbo"
_CLIP_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_T5_PARTS = ("text_encoder_3", "tokenizer_3")

WEIGHTS = WeightsSpec(
    name="SD3.5 Large Turbo",
    model_id=DEFAULT_MODEL_ID,
    subfolders=("transformer", "vae", "scheduler", *_CLIP_PARTS),
    layout=(
        "transformer/, vae/ (config.json + diffusion_pytorch_model*.safetensors), scheduler/, "
        "text_encoder/ and text_encoder_2/ (CLIP), tokenizer/ and tokenizer_2/, and with use_t5 "
        "text_encoder_3/ + tokenizer_3/ (T5)"
    ),
    hub_patterns=[
        "model_index.json",
        "transformer/*",
        "vae/*",
        "scheduler/*",
        "text_encoder/*",
        "text_encoder_2/*",
        "text_encoder_3/*",
        "tokenizer/*",
        "tokenizer_2/*",
        "tokenizer_3/*",
    ],
    note=(
        "The model is gated: accept its licence on https://huggingface.co/stabilityai/stable-diffusion-3.5-"
        "large-turbo and log in (`hf auth login`) before downloading."
    ),
)

# docs/backbones.md: the MMDiT of stabilityai/stable-diffusion-3.5-large-turbo (8.06 B parameters), written
# out so that the architecture is built without a download (memory estimates).
SD35_LARGE_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,  # T5-XXL width; the CLIP hidden states are zero-padded to it
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,  # CLIP-L (768) + CLIP-G (1280) pooled
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
# docs/backbones.md: the SD3 VAE: x8, 16 channels, latents (z - shift) * scaling; no quant convs.
SD35_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# the released scheduler_config.json (kept with the weights; InvSR steps itself on flow_sigmas)
SD35_SCHEDULER_CONFIG: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
_CLIP_TOKENS = 77
T5_TOKENS = 256  # diffusers' default max_sequence_length for SD3


@torch.no_grad()
def encode_sd3_prompt(
    folder: Path,
    prompt: str,
    dtype: torch.dtype,
    device: torch.device,
    joint_attention_dim: int,
    use_t5: bool = True,
    t5_tokens: int = T5_TOKENS,
) -> tuple[Tensor, Tensor]:
    """SD3's prompt conditioning as diffusers' SD3 pipeline computes it without classifier-free guidance.

    CLIP-L and CLIP-G: the prompt padded to 77 tokens, penultimate hidden states concatenated along the width
    and zero-padded to ``joint_attention_dim``; pooled outputs concatenated. T5: ``t5_tokens`` tokens of
    last hidden state, appended along the sequence (zeros without T5, as diffusers does when it is absent).
    Each encoder runs in fp32 on CPU and is released before the next loads (T5-XXL alone is 4.8 B parameters).

    Returns:
        ``(prompt_embeds (1, 77 + t5_tokens, joint_attention_dim), pooled (1, P_L + P_G))`` in ``dtype``.
    """
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    enc_dtype = dtype if device.type == "cuda" else torch.float32
    hidden, pooled = [], []
    for sub in ("", "_2"):
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), subfolder=f"tokenizer{sub}")
        encoder = load_part(CLIPTextModelWithProjection, folder, f"text_encoder{sub}", dtype, dtype=enc_dtype)
        encoder.to(device).eval()
        ids = tokenizer(
            prompt, padding="max_length", max_length=_CLIP_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
        del encoder
    clip = torch.cat(hidden, dim=-1)
    clip = F.pad(clip, (0, joint_attention_dim - clip.shape[-1]))
    if use_t5:
        from transformers import T5EncoderModel, T5TokenizerFast

        tokenizer = T5TokenizerFast.from_pretrained(str(folder), subfolder="tokenizer_3")
        encoder = load_part(T5EncoderModel, folder, "text_encoder_3", dtype, dtype=enc_dtype)
        encoder.to(device).eval()
        ids = tokenizer(
            prompt, padding="max_length", max_length=t5_tokens, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        t5 = encoder(ids)[0]
        del encoder
    else:
        t5 = clip.new_zeros(1, t5_tokens, joint_attention_dim)
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2).to(dtype), torch.cat(pooled, dim=-1).to(dtype)


class FrozenSD35Turbo(FrozenBackbone):
    """Frozen SD3.5 Large Turbo: 16-channel shifted VAE latents, velocity prediction on the flow times.

    Args:
        transformer: ``SD3Transformer2DModel`` (or a tiny twin).
        vae: ``AutoencoderKL`` with ``shift_factor`` and 16 latent channels.
        scheduler: ``FlowMatchEulerDiscreteScheduler`` (kept with the weights; the noise levels are
            :func:`~invsr_pl.models.timesteps.flow_sigmas`).
        prompt_embeds: ``(1, L, joint_attention_dim)``.
        pooled_prompt_embeds: ``(1, pooled_projection_dim)``.
        dtype: weight dtype (bf16 recommended on GPUs); None keeps the transformer's.
        execution_device: see :class:`~invsr_pl.models.backbone.FrozenBackbone`.
    """

    denoiser_name = "transformer"

    def __init__(
        self,
        transformer: SD3Transformer2DModel,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
        prompt_embeds: Tensor,
        pooled_prompt_embeds: Tensor,
        dtype: str | torch.dtype | None = None,
        execution_device: torch.device | None = None,
    ) -> None:
        config = transformer.config
        if prompt_embeds.shape[-1] != config.joint_attention_dim:
            raise ValueError(
                f"prompt_embeds must be (1, tokens, {config.joint_attention_dim}), "
                f"got {tuple(prompt_embeds.shape)}"
            )
        if pooled_prompt_embeds.shape[-1] != config.pooled_projection_dim:
            raise ValueError(
                f"pooled_prompt_embeds must be (1, {config.pooled_projection_dim}), "
                f"got {tuple(pooled_prompt_embeds.shape)}"
            )
        super().__init__(
            transformer,
            vae,
            scheduler,
            flow_sigmas(),
            prompt_embeds,
            dtype,
            pooled_prompt_embeds=pooled_prompt_embeds,
            execution_device=execution_device,
        )

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
        use_t5: bool = True,
    ) -> FrozenSD35Turbo:
        """Load SD3.5 Large Turbo from a hub id or a local folder with the diffusers layout.

        Args:
            model: hub id (default ``stabilityai/stable-diffusion-3.5-large-turbo``, gated) or a folder.
            dtype: weight dtype (``"auto"``: fp16 on CUDA, fp32 on CPU; ``bf16`` is what SD3.5 is run in).
            prompt: text embedded once with CLIP-L, CLIP-G and T5 (then released).
            revision / cache_dir: hub revision and cache folder.
            device: where to put the weights (None: CPU).
            latent_channels / cross_attention_dim: the geometry the config expects, checked (None: any).
            use_t5: embed with T5-XXL (needs ``text_encoder_3/``, ~9.5 GB fp16 while embedding); False uses
                zeros for its tokens, as diffusers does without T5.

        Raises:
            BackboneWeightsNotFound: the weights are not available locally and the hub is offline/unreachable.
            ValueError: the loaded model's geometry differs from the expected one.
        """
        target = torch.device(device) if device is not None else torch.device("cpu")
        weight_dtype = resolve_dtype(dtype, device)
        folder = resolve_folder(WEIGHTS, str(model), revision, cache_dir)
        if use_t5 and any(not (folder / sub).is_dir() for sub in _T5_PARTS):
            raise not_found(
                WEIGHTS,
                str(model),
                f"{folder} has no text_encoder_3/ + tokenizer_3/ (T5); or set use_t5=false",
            )
        try:
            transformer = load_part(
                SD3Transformer2DModel, folder, "transformer", weight_dtype, torch_dtype=weight_dtype
            )
            vae = load_part(AutoencoderKL, folder, "vae", weight_dtype, torch_dtype=weight_dtype)
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder), subfolder="scheduler")
            prompt_embeds, pooled = encode_sd3_prompt(
                folder, prompt, weight_dtype, target, transformer.config.joint_attention_dim, use_t5
            )
        except OSError as err:  # diffusers/transformers report missing files as OSError
            raise not_found(WEIGHTS, str(model), f"files are missing in {folder} ({err})") from err
        backbone = cls(transformer, vae, scheduler, prompt_embeds, pooled, weight_dtype).to(target)
        return backbone.check_geometry(latent_channels, cross_attention_dim, source=str(model))

    @classmethod
    def from_configs(
        cls,
        transformer_config: dict[str, Any],
        vae_config: dict[str, Any],
        seed: int = 0,
        dtype: str | torch.dtype = "float32",
        prompt_tokens: int = _CLIP_TOKENS + T5_TOKENS,
    ) -> FrozenSD35Turbo:
        """Random weights and a random conditioning from config dicts (seeded; the global RNG is left
        untouched): the tiny twin (``models/tiny.py``) and the full-size architecture for memory checks."""
        with seeded(seed):
            transformer = SD3Transformer2DModel(**transformer_config)
            vae = AutoencoderKL(**vae_config)
            config = transformer.config
            prompt_embeds = torch.randn(1, prompt_tokens, config.joint_attention_dim)
            pooled = torch.randn(1, config.pooled_projection_dim)
        scheduler = FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER_CONFIG)
        return cls(transformer, vae, scheduler, prompt_embeds, pooled, dtype=resolve_dtype(dtype))

    # ---------------------------------------------------------------- geometry

    @property
    def latent_multiple(self) -> int:
        """The transformer's patch size (2): latents are cut into patch x patch tokens."""
        return int(self.transformer.config.patch_size)

    # ---------------------------------------------------------------- maths (docs/backbones.md)

    def predict_velocity(self, z_s: Tensor, index: Tensor | int) -> Tensor:
        """Transformer velocity ``v_hat`` for the flow state ``z_s`` at flow time ``s = sigma(index)``.

        Args:
            z_s: ``(B, 16, h, w)`` float state ``(1 - s) z0 + s eps``; h, w multiples of the patch size.
            index: ``(B,)`` int64 diffusion indices (an int or a 0-d/``(1,)`` tensor is broadcast).

        Returns:
            ``(B, 16, h, w)`` float32; differentiable w.r.t. ``z_s`` (weights are frozen).
        """
        self._check_latent(z_s, "z_s")
        idx = batch_index(index, z_s.shape[0], z_s.device)
        timestep = self.sigma(idx) * self.num_train_timesteps  # the transformer's time: 1000 s, float
        v = self.transformer(
            hidden_states=z_s.to(self.dtype),
            encoder_hidden_states=self._prompt_batch(z_s),
            pooled_projections=self._pooled_batch(z_s),
            timestep=timestep,
            return_dict=False,
        )[0]
        return v.float()

    def start_state(self, z_lq: Tensor, noise: Tensor, index: Tensor | int) -> Tensor:
        """``z_s = (1 - s) z_lq + s eps_hat`` (the paper's Eq. 8 on the flow, docs/backbones.md)."""
        idx = batch_index(index, z_lq.shape[0], z_lq.device)
        s = self.sigma(idx).view(-1, 1, 1, 1)
        return (1.0 - s) * z_lq.float() + s * noise.float()

    def denoise(self, z_t: Tensor, index: Tensor | int) -> tuple[Tensor, Tensor]:
        """``(x0_hat, v_hat)`` with ``x0_hat = z_s - s v_hat``."""
        idx = batch_index(index, z_t.shape[0], z_t.device)
        v = self.predict_velocity(z_t, idx)
        return z_t.float() - self.sigma(idx).view(-1, 1, 1, 1) * v, v

    def renoise(self, x0: Tensor, direction: Tensor, index: Tensor | int) -> Tensor:
        """``x0_hat + s v_hat``: the flow's Euler step to flow time ``s`` (= ``(1 - s) x0 + s eps_hat``)."""
        idx = batch_index(index, x0.shape[0], x0.device)
        return x0 + self.sigma(idx).view(-1, 1, 1, 1) * direction
