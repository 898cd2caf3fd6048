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
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from invsr_pl.models.timesteps import (
    SD_TURBO_SCHEDULER_CONFIG,
    batch_index,
    build_scheduler,
    lookup_sigma,
    scale_model_input,
    sigmas_from_alphas_cumprod,
)
from invsr_pl.utils.offline import hub_offline

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

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


class BackboneWeightsNotFound(FileNotFoundError):
    """SD-Turbo weights are in neither the given folder nor the local hub cache; the hub is unreachable."""


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """Weight dtype from a config string.

    Args:
        dtype: ``"auto"`` (fp16 on CUDA, fp32 on CPU), ``"fp32"``/``"float32"``, ``"fp16"``/``"float16"``,
            ``"bf16"``/``"bfloat16"``, or a ``torch.dtype``.
        device: target device for ``"auto"``; ``None`` means CUDA when available (Lightning moves it there).
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported backbone dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    key = str(dtype).lower()
    if key == "auto":
        on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.float16 if on_cuda else torch.float32  # docs/conventions.md: fp16 weights on GPU
    if key not in _DTYPES:
        raise ValueError(f"unknown backbone dtype {dtype!r}; use one of 'auto', {sorted(_DTYPES)}")
    return _DTYPES[key]


def _not_found(model: str, reason: str) -> BackboneWeightsNotFound:
    return BackboneWeightsNotFound(
        f"SD-Turbo weights for {model!r} could not be loaded: {reason}. Download them once where the Hugging "
        f"Face hub is reachable (e.g. `hf download {DEFAULT_MODEL_ID} --local-dir "
        "/path/to/sd-turbo`), then point the config at the folder: `model.backbone.model=/path/to/sd-turbo`. "
        f"The folder must have the diffusers layout: {_EXPECTED_LAYOUT}."
    )


def resolve_folder(model: str, revision: str | None, cache_dir: str | None) -> Path:
    """Local folder with the diffusers layout for ``model`` (a folder path or a hub id); never waits on the
    network when offline: the local cache is tried first, the hub only when it is not disabled."""
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [sub for sub in REQUIRED_SUBFOLDERS if not (path / sub).is_dir()]
        if missing:
            raise _not_found(model, f"the folder {path} lacks the subfolders {missing}")
        return path
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise _not_found(model, f"the folder {path} does not exist")

    from huggingface_hub import snapshot_download

    kwargs = {"revision": revision, "cache_dir": cache_dir, "allow_patterns": _HUB_PATTERNS}
    try:
        return Path(snapshot_download(model, local_files_only=True, **kwargs))
    except Exception as local_err:  # noqa: BLE001 - any cache miss falls through to the hub or a clear error
        if hub_offline():
            raise _not_found(
                model,
                "it is not an existing folder, not in the local Hugging Face cache, and the hub is offline "
                "(HF_HUB_OFFLINE=1)",
            ) from local_err
    try:
        return Path(snapshot_download(model, **kwargs))
    except Exception as err:  # noqa: BLE001 - network/auth errors of several libraries
        raise _not_found(
            model, f"download from the Hugging Face hub failed ({type(err).__name__}: {err})"
        ) from err


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


class FrozenSDTurbo(nn.Module):
    """Frozen SD-Turbo: VAE encode/decode, epsilon and x0 prediction in the VE (Euler) parameterisation.

    Conventions (docs/conventions.md): latents are *scaled* (posterior sample * 0.18215), float32 at the
    edges; ``index`` is the diffusion index (user timestep - 1); ``z_t = z + sigma * eps``.

    Args:
        unet: SD-Turbo's ``UNet2DConditionModel`` (or a tiny twin).
        vae: ``AutoencoderKL`` with ``config.scaling_factor`` set.
        scheduler: ``EulerDiscreteScheduler``; kept only for its config and ``alphas_cumprod``.
        prompt_embeds: ``(1, 77, cross_attention_dim)`` prompt embedding, cached as a buffer.
        dtype: weight dtype (see :func:`resolve_dtype`); ``None`` keeps the UNet's current dtype.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: EulerDiscreteScheduler,
        prompt_embeds: Tensor,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__()
        weight_dtype = next(unet.parameters()).dtype if dtype is None else resolve_dtype(dtype)
        d = unet.config.cross_attention_dim
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1 or prompt_embeds.shape[2] != d:
            raise ValueError(f"prompt_embeds must be (1, tokens, {d}), got {tuple(prompt_embeds.shape)}")
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        # Freeze, eval and cast before anything can wrap the modules (docs/lightning.md).
        self.requires_grad_(False)
        for part in (self.unet, self.vae):
            if any(p.dtype != weight_dtype for p in part.parameters()):
                part.to(weight_dtype)
        super().train(False)
        # Derived data, not weights: kept out of checkpoints (persistent=False) but moved with .to(device).
        sigmas = sigmas_from_alphas_cumprod(scheduler.alphas_cumprod)  # (1000,) ascending (conventions.md)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("prompt_embeds", prompt_embeds.detach().to(weight_dtype), persistent=False)

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
    ) -> FrozenSDTurbo:
        """Load SD-Turbo from a hub id or a local folder with the diffusers layout.

        Args:
            model: hub id (default ``stabilityai/sd-turbo``) or a folder with ``unet/``, ``vae/``,
                ``scheduler/``, ``text_encoder/``, ``tokenizer/``.
            dtype: weight dtype, see :func:`resolve_dtype` (``"auto"``: fp16 on CUDA, fp32 on CPU).
            prompt: text embedded once with the text encoder (which is then released).
            revision: hub revision; cache_dir: hub cache folder.
            device: where to put the weights (``None``: CPU; Lightning moves the module later).

        Raises:
            BackboneWeightsNotFound: the weights are not available locally and the hub is offline/unreachable.
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
        return cls(unet, vae, scheduler, prompt_embeds, dtype=weight_dtype).to(target)

    @classmethod
    def random_sd_turbo(cls, seed: int = 0, dtype: str = "float32") -> FrozenSDTurbo:
        """The exact SD-Turbo UNet/VAE architecture with random weights and a random ``(1, 77, 1024)`` prompt.

        For shape and memory checks without the real weights; slow to build (~1 B parameters).
        """
        return build_from_configs(SD_TURBO_UNET_CONFIG, SD_TURBO_VAE_CONFIG, seed=seed, dtype=dtype)

    # ---------------------------------------------------------------- properties

    @property
    def dtype(self) -> torch.dtype:
        """Weight dtype of the UNet and VAE."""
        return self.unet.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def vae_scale_factor(self) -> int:
        """Spatial factor image -> latent (8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    # ---------------------------------------------------------------- modes

    def train(self, mode: bool = True) -> FrozenSDTurbo:
        """Always eval: the prior is frozen; Lightning's ``model.train()`` must not switch dropout on."""
        return super().train(False)

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint the UNet's blocks; gradients still flow *through* the frozen UNet into the NP."""
        self.unet.enable_gradient_checkpointing()

    # ---------------------------------------------------------------- maths

    def sigma(self, index: Tensor | int) -> Tensor:
        """``(B,)`` float32 VE noise level per diffusion index, on the index's device (conventions.md)."""
        return lookup_sigma(self.sigmas, index)

    def _check_image(self, image: Tensor) -> None:
        f = self.vae_scale_factor
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W) in [0, 1], got {tuple(image.shape)}")
        if image.shape[-2] % f or image.shape[-1] % f:
            raise ValueError(f"image size {tuple(image.shape[-2:])} must be a multiple of {f} (VAE factor)")

    def encode(
        self,
        image: Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Image -> scaled latent.

        Args:
            image: ``(B, 3, H, W)`` float in [0, 1]; H, W multiples of 8.
            generator: for the posterior sample (determinism); ``None`` uses the global RNG.
            sample: posterior *sample* (default, as the official code, docs/deviations.md) or its mean.
            noise: ``(B, 4, H/8, W/8)`` standard normal draw for the posterior sample, used instead of drawing
                one from ``generator`` (the sampler draws it itself so padded rows draw nothing).

        Returns:
            ``(B, 4, H/8, W/8)`` float32 latent, ``z * scaling_factor``.
        """
        self._check_image(image)
        x = image.to(device=self.device, dtype=self.dtype) * 2.0 - 1.0  # VAE works in [-1, 1]
        posterior = self.vae.encode(x).latent_dist
        mean = posterior.mean.float()
        if sample:
            if noise is None:
                # Draw in fp32 so the sample does not depend on the weight dtype's noise resolution.
                noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            elif noise.shape != mean.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(mean.shape)}")
            latent = mean + posterior.std.float() * noise.float()
        else:
            latent = mean
        return latent * self.scaling_factor

    def decode(self, latent: Tensor) -> Tensor:
        """Scaled latent ``(B, 4, h, w)`` float -> image ``(B, 3, 8h, 8w)`` float32 in [0, 1] (clamped)."""
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be (B, {self.latent_channels}, h, w), got {tuple(latent.shape)}")
        z = (latent.float() / self.scaling_factor).to(device=self.device, dtype=self.dtype)
        x = self.vae.decode(z, return_dict=False)[0]
        return (x.float() / 2.0 + 0.5).clamp(0.0, 1.0)  # docs/sampling.md

    def predict_eps(self, z_t: Tensor, index: Tensor | int) -> Tensor:
        """UNet noise prediction for the VE state ``z_t`` (docs/conventions.md, docs/sampling.md).

        Args:
            z_t: ``(B, 4, h, w)`` float VE state ``z + sigma * eps``.
            index: ``(B,)`` int64 diffusion indices (an int or a 0-d/``(1,)`` tensor is broadcast).

        Returns:
            ``(B, 4, h, w)`` float32 ``eps_hat``. Differentiable w.r.t. ``z_t`` (weights are frozen).
        """
        if z_t.ndim != 4 or z_t.shape[1] != self.latent_channels:
            raise ValueError(f"z_t must be (B, {self.latent_channels}, h, w), got {tuple(z_t.shape)}")
        idx = batch_index(index, z_t.shape[0], z_t.device)
        sigma = self.sigma(idx)  # (B,) float32
        x = scale_model_input(z_t.float(), sigma).to(self.dtype)  # VE -> VP input, z / sqrt(1 + sigma^2)
        cond = self.prompt_embeds.to(z_t.device).expand(z_t.shape[0], -1, -1)
        eps = self.unet(x, idx, encoder_hidden_states=cond, return_dict=False)[0]
        return eps.float()

    def predict_x0(self, z_t: Tensor, index: Tensor | int) -> Tensor:
        """``(B, 4, h, w)`` float32 ``x0_hat = z_t - sigma * eps_hat`` (docs/conventions.md)."""
        idx = batch_index(index, z_t.shape[0], z_t.device)
        eps = self.predict_eps(z_t, idx)
        return z_t.float() - self.sigma(idx).view(-1, 1, 1, 1) * eps

    def invert_step(self, z_lq: Tensor, noise: Tensor, index: Tensor | int) -> tuple[Tensor, Tensor]:
        """The one-step inversion of the paper (Sec. 3, Algorithm 1): start state, then one UNet call.

        ``z_t = z_lq + sigma_t * noise`` (the LR latent moved onto the trajectory by the predicted noise),
        ``x0_hat = z_t - sigma_t * eps_hat(z_t, t)``; used by training (every iteration) and by the sampler
        (its first step). Differentiable w.r.t. ``noise`` (weights are frozen).

        Args:
            z_lq: ``(B, 4, h, w)`` scaled latent of the bicubic-upsampled LR image.
            noise: ``(B, 4, h, w)`` start noise (the noise predictor's sample, or N(0, I)).
            index: diffusion index: int or an integer tensor of shape (), (1,) or (B,).

        Returns:
            ``(x0_hat, eps_hat)``, both ``(B, 4, h, w)`` float32; a further Euler step continues from
            ``x0_hat + sigma_next * eps_hat``.
        """
        idx = batch_index(index, z_lq.shape[0], z_lq.device)
        sigma = self.sigma(idx).view(-1, 1, 1, 1)
        z_t = z_lq.float() + sigma * noise.float()
        eps = self.predict_eps(z_t, idx)
        return z_t - sigma * eps, eps


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
        dim = unet.config.cross_attention_dim
        prompt_embeds = torch.randn(1, _PROMPT_TOKENS, dim)
    scheduler = build_scheduler(scheduler_config or SD_TURBO_SCHEDULER_CONFIG)
    return FrozenSDTurbo(unet, vae, scheduler, prompt_embeds, dtype=resolve_dtype(dtype))
