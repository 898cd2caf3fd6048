"""LatentDiscriminator: InvSR's timestep- and text-conditioned UNet discriminator on SD latents.

The network is an SD-style UNet (docs/method.md) composed from upstream diffusers blocks, with three
changes: no output head, a second "multi-in" stem whose features are re-injected before every down block,
and four "multi-out" logit heads (one on the mid block, one after each up block). The paper configuration is
the constructor default and has the state-dict layout of the released ``discriminator_sd_turbo_v5.pth``, so
``LatentDiscriminator.from_official(path)`` loads it strictly. A diffusers model (``ModelMixin`` +
``ConfigMixin``): ``save_pretrained`` / ``from_pretrained`` (strict) and diffusers' gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TextTimeEmbedding, TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - how diffusers pipelines find the loader
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_mid_block, get_up_block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from invsr_pl.models.strict_pretrained import StrictModelMixin
from invsr_pl.models.timesteps import batch_index
from invsr_pl.utils.checkpoint import read_state_dict

__all__ = ["LatentDiscriminator"]


def _per_block(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """Broadcast an int to one value per block, or check a sequence has one value per block."""
    values = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) != n:
        raise ValueError(f"{name} needs one value per block ({n}), got {len(values)}: {values}")
    return values


def _logit_head(channels: int, norm_num_groups: int, norm_eps: float) -> nn.Sequential:
    """GroupNorm-SiLU-Conv3x3(C->C)-GroupNorm-SiLU-Conv3x3(C->1), indices 0..5 as released (method.md)."""
    groups = min(norm_num_groups, channels // 4)  # docs/method.md: min(32, C/4) groups
    return nn.Sequential(
        nn.GroupNorm(groups, channels, eps=norm_eps),
        nn.SiLU(),
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.GroupNorm(groups, channels, eps=norm_eps),
        nn.SiLU(),
        nn.Conv2d(channels, 1, kernel_size=3, padding=1),
    )


def _checkpoint(module: nn.Module, *args):
    """diffusers' default checkpointing function (non-reentrant), through this module's ``checkpoint``."""
    return checkpoint(module.__call__, *args, use_reentrant=False)


class LatentDiscriminator(StrictModelMixin, ConfigMixin):
    """Multi-scale UNet discriminator on scaled SD latents, conditioned on timestep index and prompt.

    Paper configuration (docs/method.md) = constructor defaults: 112,082,532 parameters, state-dict keys
    and shapes identical to the released ``discriminator_sd_turbo_v5.pth``. A CPU-sized twin:
    ``invsr_pl.models.tiny.tiny_discriminator()``.

    Args:
        in_channels: latent channels (4 for SD).
        block_out_channels: widths of the down blocks; the up path mirrors them.
        layers_per_block: resnets per down block (int or one per block); up blocks get one more each.
        down_block_types: diffusers down-block class names, one per block.
        mid_block_type: diffusers mid-block class name.
        up_block_types: diffusers up-block class names, one per block.
        num_attention_heads: attention heads per down block (int or one per block); the up path uses them
            reversed, the mid block the last one. The official YAML calls this ``attention_head_dim``
            [8, 16, 16] (a diffusers naming quirk: it is really the number of heads, docs/method.md).
        transformer_layers_per_block: transformer layers inside each cross-attention block.
        cross_attention_dim: width D of ``encoder_hidden_states`` (1024 for SD-Turbo's OpenCLIP-H prompt).
        norm_num_groups: GroupNorm groups; also the channel count of the multi-in stem ``feature_in``
            (docs/method.md), so every width in ``block_out_channels`` must be a multiple of it.
        norm_eps: GroupNorm epsilon.
        act_fn: resnet activation.
        downsample_padding: padding of the strided downsampling convolutions.
        use_linear_projection: transformer ``proj_in``/``proj_out`` as Linear instead of 1x1 conv.
        flip_sin_to_cos: sinusoidal timestep embedding layout (cos first when True).
        freq_shift: ``downscale_freq_shift`` of the sinusoidal timestep embedding.
        addition_embed_type: ``"text"`` adds the pooled prompt to the time embedding; None disables.
        addition_embed_type_num_heads: heads of that attention pooling (must divide ``cross_attention_dim``).
        center_input_sample: map the input with ``2 * x - 1`` first (off for InvSR).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        block_out_channels: Sequence[int] = (128, 256, 512),
        layers_per_block: int | Sequence[int] = (1, 2, 2),
        down_block_types: Sequence[str] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type: str = "UNetMidBlock2DCrossAttn",
        up_block_types: Sequence[str] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        num_attention_heads: int | Sequence[int] = (8, 16, 16),
        transformer_layers_per_block: int = 1,
        cross_attention_dim: int = 1024,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        act_fn: str = "silu",
        downsample_padding: int = 1,
        use_linear_projection: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        addition_embed_type: str | None = "text",
        addition_embed_type_num_heads: int = 64,
        center_input_sample: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(int(c) for c in block_out_channels)
        n = len(widths)
        down_block_types, up_block_types = tuple(down_block_types), tuple(up_block_types)
        layers = _per_block(layers_per_block, n, "layers_per_block")
        heads = _per_block(num_attention_heads, n, "num_attention_heads")
        self._check_geometry(
            widths, down_block_types, up_block_types, heads, norm_num_groups, cross_attention_dim
        )
        if addition_embed_type not in (None, "text"):
            raise ValueError(f"addition_embed_type must be 'text' or None, got {addition_embed_type!r}")
        if addition_embed_type == "text" and cross_attention_dim % addition_embed_type_num_heads:
            raise ValueError(
                f"addition_embed_type_num_heads ({addition_embed_type_num_heads}) must divide "
                f"cross_attention_dim ({cross_attention_dim})"
            )
        self.in_channels = in_channels
        self.cross_attention_dim = cross_attention_dim
        self.center_input_sample = center_input_sample
        # as in diffusers' UNet2DConditionModel: a model-level flag beside the blocks' own, which
        # enable_gradient_checkpointing sets together (the blocks then recompute their resnets/transformers)
        self.gradient_checkpointing = False

        # Stems: the usual conv_in plus the multi-in stem with norm_num_groups channels (docs/method.md).
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        self.feature_in = nn.Conv2d(in_channels, norm_num_groups, kernel_size=3, padding=1)

        # Time: sinusoid(C0) -> MLP to 4*C0, as in the SD UNet (docs/method.md).
        time_embed_dim = widths[0] * 4
        self.time_proj = Timesteps(widths[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(widths[0], time_embed_dim, act_fn=act_fn)
        # Text: attention-pooled prompt added to temb (docs/method.md). Key name `add_embedding` as released.
        self.add_embedding = (
            TextTimeEmbedding(cross_attention_dim, time_embed_dim, num_heads=addition_embed_type_num_heads)
            if addition_embed_type == "text"
            else None
        )

        common = {
            "temb_channels": time_embed_dim,
            "resnet_eps": norm_eps,
            "resnet_act_fn": act_fn,
            "resnet_groups": norm_num_groups,
            "transformer_layers_per_block": transformer_layers_per_block,
            "cross_attention_dim": cross_attention_dim,
            "use_linear_projection": use_linear_projection,
        }
        self.down_blocks = nn.ModuleList()
        out_ch = widths[0]
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, widths[i]
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers[i],
                    # docs/method.md: the multi-in features join every down-block input (160/160/288 ch).
                    in_channels=in_ch + norm_num_groups,
                    out_channels=out_ch,
                    add_downsample=i < n - 1,
                    num_attention_heads=heads[i],
                    attention_head_dim=heads[i],
                    downsample_padding=downsample_padding,
                    **common,
                )
            )
        self.mid_block = get_mid_block(
            mid_block_type, in_channels=widths[-1], num_attention_heads=heads[-1], **common
        )
        self.up_blocks = nn.ModuleList()
        rev_widths, rev_layers, rev_heads = widths[::-1], layers[::-1], heads[::-1]
        out_ch = rev_widths[0]
        for i, block_type in enumerate(up_block_types):
            prev_ch, out_ch = out_ch, rev_widths[i]
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=rev_layers[i] + 1,
                    in_channels=rev_widths[min(i + 1, n - 1)],
                    out_channels=out_ch,
                    prev_output_channel=prev_ch,
                    add_upsample=i < n - 1,
                    resolution_idx=i,
                    num_attention_heads=rev_heads[i],
                    attention_head_dim=rev_heads[i],
                    **common,
                )
            )
        self.num_upsamplers = n - 1
        # Multi-out heads (docs/method.md): head 0 on the mid output, heads 1..n after each up block.
        self.out_blocks = nn.ModuleList(
            [_logit_head(c, norm_num_groups, norm_eps) for c in (widths[-1], *rev_widths)]
        )

    @staticmethod
    def _check_geometry(
        widths: tuple[int, ...],
        down_block_types: tuple[str, ...],
        up_block_types: tuple[str, ...],
        heads: tuple[int, ...],
        groups: int,
        cross_attention_dim: int,
    ) -> None:
        n = len(widths)
        if n < 1 or len(down_block_types) != n or len(up_block_types) != n:
            raise ValueError(
                f"need one down and one up block type per width: {n} widths, {len(down_block_types)} down, "
                f"{len(up_block_types)} up"
            )
        for c in widths:
            # GroupNorm on (C + groups) channels and the heads' min(groups, C/4) groups must divide evenly.
            if c % groups or c % min(groups, max(c // 4, 1)):
                raise ValueError(
                    f"every block_out_channels entry must be a multiple of norm_num_groups ({groups}) so "
                    f"that the GroupNorms of blocks (C + {groups} ch) and heads divide evenly; got {widths}"
                )
        for c, h, kind in zip(widths, heads, down_block_types, strict=True):
            if "CrossAttn" in kind and c % h:
                raise ValueError(f"num_attention_heads {h} must divide block width {c} ({kind})")
        if cross_attention_dim <= 0:
            raise ValueError(f"cross_attention_dim must be positive, got {cross_attention_dim}")

    @classmethod
    def from_official(cls, path: str | Path, **kwargs) -> LatentDiscriminator:
        """Build with ``kwargs`` (paper config by default) and strictly load a released checkpoint.

        Args:
            path: ``discriminator_sd_turbo_v5.pth`` (pickled state dict) or a ``.safetensors`` file; a
                ``state_dict`` wrapper and ``module.``/``_orig_mod.`` prefixes are accepted.
            **kwargs: constructor arguments, when the file is not in the paper configuration.
        """
        model = cls(**kwargs)
        model.load_state_dict(read_state_dict(path, "discriminator checkpoint"), strict=True)
        return model

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """diffusers' mechanism: every resnet and transformer of the down, mid and up blocks is recomputed in
        backward (the official checkpoints whole blocks and skips the mid; the gradients are the same)."""
        super().enable_gradient_checkpointing(gradient_checkpointing_func or _checkpoint)

    def forward(self, latent: Tensor, index: Tensor | int, encoder_hidden_states: Tensor) -> list[Tensor]:
        """Score latents as real (large logits) or fake (small logits) at four scales.

        Args:
            latent: (B, C_in, h, w) float scaled SD latents (VAE sample * 0.18215, roughly [-4, 4] for real
                images). Fakes should be clamped to [-LATENT_BOUND, LATENT_BOUND] = [-10, 10] by the caller
                (``invsr_pl.losses.adversarial.clamp_fake``, docs/method.md).
            index: 0-based diffusion index (user timestep - 1, e.g. 249/199/149/99): an int or an integer
                tensor of shape (), (1,) or (B,) (``timesteps.batch_index``).
            encoder_hidden_states: (B, L, cross_attention_dim) prompt embeddings (L = 77 for SD).

        Returns:
            list of 1 + len(block_out_channels) logit maps (B, 1, *, *) in the compute dtype:
            [mid, up0, up1, ...].
            For the paper config and a 64x64 latent: 16x16, 32x32, 64x64, 64x64.
        """
        if latent.ndim != 4 or latent.shape[1] != self.in_channels:
            raise ValueError(f"latent must be (B, {self.in_channels}, h, w), got {tuple(latent.shape)}")
        batch = latent.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states must be (B, L, {self.cross_attention_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        if encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} != latent batch {batch}"
            )
        index = batch_index(index, batch, latent.device)

        # Inputs follow the weights' dtype (e.g. fp16 prompt embeddings from a half-precision backbone);
        # under autocast the layers recast anyway.
        dtype = self.conv_in.weight.dtype
        latent, encoder_hidden_states = latent.to(dtype), encoder_hidden_states.to(dtype)
        if self.center_input_sample:
            latent = 2 * latent - 1.0
        # Sinusoids are computed in fp32; cast to the compute dtype as the SD UNet does.
        emb = self.time_embedding(self.time_proj(index).to(latent.dtype))  # (B, 4*C0)
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(encoder_hidden_states)
        extra = self.feature_in(latent)  # (B, groups, h, w) multi-in features
        sample = self.conv_in(latent)  # (B, C0, h, w)

        skips: tuple[Tensor, ...] = (sample,)
        for block in self.down_blocks:
            # docs/method.md: the multi-in features, bicubic-resized to the block's size, concatenated after.
            extra_here = F.interpolate(extra, size=sample.shape[-2:], mode="bicubic")
            sample = torch.cat([sample, extra_here], dim=1)
            if getattr(block, "has_cross_attention", False):
                sample, res = block(sample, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, res = block(sample, emb)
            skips += res

        if getattr(self.mid_block, "has_cross_attention", False):
            sample = self.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = self.mid_block(sample, emb)
        logits = [self.out_blocks[0](sample)]

        # As in the SD UNet: give the upsampler the skip size when h, w are not multiples of 2**n_upsamplers.
        factor = 2**self.num_upsamplers
        odd_size = any(s % factor for s in latent.shape[-2:])
        for i, block in enumerate(self.up_blocks):
            n_res = len(block.resnets)
            res, skips = skips[-n_res:], skips[:-n_res]
            size = skips[-1].shape[2:] if odd_size and i < len(self.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    sample, res, emb, encoder_hidden_states=encoder_hidden_states, upsample_size=size
                )
            else:
                sample = block(sample, res, emb, upsample_size=size)
            logits.append(self.out_blocks[i + 1](sample))
        return logits
