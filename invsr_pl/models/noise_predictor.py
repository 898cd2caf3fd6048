"""NoisePredictor: LR image (+ diffusion index) -> Gaussian over the inversion noise (docs/method.md).

The only trained generator of InvSR. A time-aware convolutional encoder, assembled from upstream diffusers
blocks (``Timesteps``, ``TimestepEmbedding``, ``get_down_block("AttnDownBlock2D")``, ``UNetMidBlock2D``), maps
the LR image at its native resolution to ``2 * latent_channels`` maps (mean, logvar) on the SD latent grid of
the SR image. Attribute names follow the released checkpoint so that ``noise_predictor_sd_turbo_v5.pth``
(164 tensors, keys ``encoder.*``) loads with strict key matching.

A diffusers model (``ModelMixin`` + ``ConfigMixin``): ``save_pretrained(folder)`` writes ``config.json`` +
``diffusion_pytorch_model.safetensors``, ``NoisePredictor.from_pretrained(folder_or_hub_id, subfolder=...)``
reads them (docs/checkpoints.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - how diffusers pipelines find the loader
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import Tensor, nn

from invsr_pl.models.strict_pretrained import StrictModelMixin
from invsr_pl.models.timesteps import batch_index
from invsr_pl.utils.checkpoint import read_state_dict

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "NoisePredictor", "down_stages"]

CONFIG_NAME = "config.json"  # diffusers' names for what save_pretrained writes
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_NORM_EPS = 1e-6  # docs/method.md: GroupNorm eps 1e-6 everywhere (resnets, attention, head)


class _TimeAwareEncoder(nn.Module):
    """The encoder body; attribute names match the official ``TimeAwareEncoder`` (docs/method.md)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: Sequence[int],
        layers_per_block: Sequence[int],
        attention_head_dim: int,
        norm_num_groups: int,
        temb_channels: int,
        mid_block_add_attention: bool,
        down_block_types: Sequence[str],
    ) -> None:
        super().__init__()
        # docs/method.md: sinusoid width max(128, C0) (256 for the paper), flip_sin_to_cos, shift 0.
        proj_dim = max(128, block_out_channels[0])
        self.time_proj = Timesteps(proj_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(proj_dim, temb_channels)
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)

        self.down_blocks = nn.ModuleList()
        prev = block_out_channels[0]
        blocks = zip(block_out_channels, layers_per_block, down_block_types, strict=True)
        for i, (width, layers, block_type) in enumerate(blocks):
            is_final = i == len(block_out_channels) - 1
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers,
                    in_channels=prev,
                    out_channels=width,
                    temb_channels=temb_channels,
                    add_downsample=not is_final,
                    resnet_eps=_NORM_EPS,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim,
                    # docs/method.md: padding 0 = zero-pad (0,1,0,1) then a stride-2 3x3 conv.
                    downsample_padding=0,
                    resnet_time_scale_shift="default",
                )
            )
            prev = width

        self.mid_block = UNetMidBlock2D(
            in_channels=prev,
            temb_channels=temb_channels,
            resnet_eps=_NORM_EPS,
            resnet_act_fn="silu",
            output_scale_factor=1.0,
            resnet_time_scale_shift="default",
            attention_head_dim=attention_head_dim,
            resnet_groups=norm_num_groups,
            add_attention=mid_block_add_attention,
        )
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, prev, eps=_NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(prev, out_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor, index: Tensor) -> Tensor:
        """``x`` (B, C_in, h, w) in [-1, 1], ``index`` (B,) int64 -> (B, out_channels, h/2^s, w/2^s)."""
        # The sinusoid is float32; cast to the MLP's dtype as the official does (docs/method.md).
        t_feat = self.time_proj(index).to(self.time_embedding.linear_1.weight.dtype)
        temb = self.time_embedding(t_feat)  # (B, temb_channels); enters only through the resnets
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h, temb)  # residuals are for a UNet decoder, unused here (docs/method.md)
        h = self.mid_block(h, temb)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


def down_stages(scale: int, vae_scale_factor: int) -> int:
    """Number of x2 downsamplers taking the LR grid onto the SD latent grid of the x``scale`` SR image."""
    for name, value in (("scale", scale), ("vae_scale_factor", vae_scale_factor)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    ratio = vae_scale_factor / scale
    stages = round(math.log2(ratio)) if ratio >= 1 else -1
    if stages < 0 or 2**stages * scale != vae_scale_factor:
        raise ValueError(
            f"scale={scale} does not line up with vae_scale_factor={vae_scale_factor}: the LR image must "
            f"reach the latent grid (SR size / {vae_scale_factor}) by x2 downsampling, so "
            "vae_scale_factor / scale must be a power of two >= 1 (scale 1, 2, 4 or 8 for an SD VAE)"
        )
    return stages


class NoisePredictor(StrictModelMixin, ConfigMixin):
    """Predicts the noise that inverts the LR image onto the diffusion trajectory (docs/method.md).

    Defaults are the paper's configuration (33,837,576 parameters). The number of x2 downsampling stages is
    ``log2(vae_scale_factor / scale)`` (x4: 1, x2: 2, x8: 0); ``block_out_channels`` needs one width per stage
    plus one.

    Args:
        in_channels: image channels (3).
        latent_channels: SD latent channels (4); the network outputs twice that (mean, logvar).
        block_out_channels: width of each AttnDownBlock2D; length must be ``stages + 1``.
        layers_per_block: resnet+attention pairs per block (an int for all blocks, or one per block).
        attention_head_dim: channels per attention head (every width must be divisible by it).
        norm_num_groups: GroupNorm groups (every width must be divisible by it).
        temb_channels: width of the timestep embedding.
        mid_block_add_attention: self-attention in the mid block.
        scale: super-resolution factor (SR size = scale * LR size).
        vae_scale_factor: spatial factor of the backbone VAE (8 for SD).
        down_block_types: diffusers block type per width, ``"AttnDownBlock2D"`` (the paper, the default for
            every block) or ``"DownBlock2D"`` (no self-attention: the tiny twins, whose first block would
            otherwise attend over every LR pixel).
    """

    _supports_gradient_checkpointing = True  # the diffusers blocks recompute their resnets / attentions

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: Sequence[int] = (256, 512),
        layers_per_block: int | Sequence[int] = 3,
        attention_head_dim: int = 64,
        norm_num_groups: int = 32,
        temb_channels: int = 512,
        mid_block_add_attention: bool = True,
        scale: int = 4,
        vae_scale_factor: int = 8,
        down_block_types: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        stages = down_stages(scale, vae_scale_factor)
        widths = [int(c) for c in block_out_channels]
        if len(widths) != stages + 1:
            raise ValueError(
                f"block_out_channels has {len(widths)} entries {widths}, but scale={scale} with "
                f"vae_scale_factor={vae_scale_factor} needs {stages} downsampling stage(s), "
                f"i.e. {stages + 1} widths"
            )
        if isinstance(layers_per_block, int):
            layers = [layers_per_block] * len(widths)
        else:
            layers = [int(n) for n in layers_per_block]
        if len(layers) != len(widths) or any(n < 1 for n in layers):
            raise ValueError(
                f"layers_per_block {layers_per_block} must be a positive int or one positive int per block "
                f"({len(widths)} blocks)"
            )
        types = ["AttnDownBlock2D"] * len(widths) if down_block_types is None else list(down_block_types)
        allowed = ("AttnDownBlock2D", "DownBlock2D")
        if len(types) != len(widths) or any(t not in allowed for t in types):
            raise ValueError(
                f"down_block_types {types} must hold one of {allowed} per block ({len(widths)} blocks)"
            )
        for w in widths:
            if w % norm_num_groups or w % attention_head_dim:
                raise ValueError(
                    f"block width {w} must be divisible by norm_num_groups={norm_num_groups} and "
                    f"attention_head_dim={attention_head_dim}"
                )
        # the config (config.json, the checkpoint's noise_predictor_config) holds plain lists, not tuples
        self.register_to_config(
            block_out_channels=widths,
            layers_per_block=layers if not isinstance(layers_per_block, int) else layers_per_block,
            down_block_types=None if down_block_types is None else types,
        )
        self.scale = scale
        self.num_down_stages = stages
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.encoder = _TimeAwareEncoder(
            in_channels=in_channels,
            out_channels=2 * latent_channels,  # docs/method.md: double_z -> mean and logvar
            block_out_channels=widths,
            layers_per_block=layers,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            temb_channels=temb_channels,
            mid_block_add_attention=mid_block_add_attention,
            down_block_types=types,
        )

    def forward(self, lr: Tensor, index: int | Tensor) -> DiagonalGaussianDistribution:
        """Gaussian over the start noise for the LR image at diffusion index ``index``.

        Args:
            lr: ``(B, in_channels, h, w)`` float LR image in [0, 1]; ``h`` and ``w`` divisible by
                ``2 ** num_down_stages`` (2 for x4).
            index: diffusion index (user timestep - 1, e.g. 199 for t=200): int, 0-d tensor, or ``(B,)`` /
                ``(1,)`` integer tensor; broadcast to the batch.

        Returns:
            diffusers ``DiagonalGaussianDistribution`` with float32 ``mean``/``logvar``/``std`` of shape
            ``(B, latent_channels, h * scale / vae_scale_factor, w * scale / vae_scale_factor)``; logvar
            clamped to [-30, 20]. ``.sample(generator)`` is the reparameterised (differentiable) draw.
        """
        if lr.ndim != 4 or lr.shape[1] != self.in_channels:
            raise ValueError(f"lr must be (B, {self.in_channels}, h, w), got {tuple(lr.shape)}")
        factor = 2**self.num_down_stages
        if lr.shape[-2] % factor or lr.shape[-1] % factor:
            raise ValueError(
                f"LR size {tuple(lr.shape[-2:])} must be divisible by {factor} (2 ** {self.num_down_stages} "
                f"downsampling stages for scale={self.scale}); pad the LR image first"
            )
        idx = batch_index(index, lr.shape[0], lr.device)
        x = lr.to(self.encoder.conv_in.weight.dtype) * 2.0 - 1.0  # docs/method.md: centre [0,1] -> [-1,1]
        moments = self.encoder(x, idx)  # (B, 2 * latent_channels, h', w')
        # fp32 moments so that std/sample are exact even under autocast; logvar clamp happens in the class.
        return DiagonalGaussianDistribution(moments.float())

    # ---------------------------------------------------------------- checkpoints

    def load_checkpoint(self, path: str | Path) -> NoisePredictor:
        """Load a released ``.pth`` or a ``.safetensors`` file with strict key and shape matching.

        Raises:
            RuntimeError: missing, unexpected or wrongly shaped keys (the message lists them and the config).
        """
        state = read_state_dict(path, "noise predictor checkpoint")
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        mismatched = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own
            if k in state and state[k].shape != own[k].shape
        ]
        if missing or unexpected or mismatched:

            def head(items: list[str]) -> str:
                return ", ".join(items[:5]) + (f" ... (+{len(items) - 5} more)" if len(items) > 5 else "")

            raise RuntimeError(
                f"checkpoint {path} does not match NoisePredictor({_public(self.config)}): "
                f"{len(missing)} missing [{head(missing)}], "
                f"{len(unexpected)} unexpected [{head(unexpected)}], "
                f"{len(mismatched)} shape mismatches [{head(mismatched)}]"
            )
        self.load_state_dict(state, strict=True)
        return self

    @classmethod
    def from_official(cls, path: str | Path, **ctor_kwargs: Any) -> NoisePredictor:
        """Build with ``ctor_kwargs`` (paper config by default) and load a released checkpoint strictly.

        Args:
            path: e.g. ``noise_predictor_sd_turbo_v5.pth`` (fp32 OrderedDict, 164 tensors ``encoder.*``).
        """
        return cls(**ctor_kwargs).load_checkpoint(path)


def _public(config: Any) -> dict[str, Any]:
    """The constructor arguments of a diffusers config (without its ``_``-prefixed bookkeeping keys)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}
