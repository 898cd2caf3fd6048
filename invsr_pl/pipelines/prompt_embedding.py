"""FixedPromptEmbedding: a prompt embedding held as a model, the text encoder of backbones without one.

InvSR conditions every UNet call on one fixed prompt embedding (docs/conventions.md). SD-Turbo computes it
with its CLIP text encoder; the tiny twins (``invsr_pl.models.tiny``, ``invsr_pl.models.tiny_trained``) have
no text encoder, only a seeded random ``(1, 77, D)`` embedding. Holding that embedding as a diffusers model
lets :class:`~invsr_pl.pipelines.InvSRPipeline` keep the ``text_encoder`` slot of every pipeline and
round-trip it through ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers finds the loader through it
from torch import Tensor

from invsr_pl.models.strict_pretrained import StrictModelMixin

__all__ = ["FixedPromptEmbedding"]


class FixedPromptEmbedding(StrictModelMixin, ConfigMixin):
    """The embedding of one prompt, ``(1, tokens, dim)``; it is its own output (no tokenizer, no prompt).

    Args:
        tokens: sequence length (77 for CLIP).
        dim: width, the UNet's ``cross_attention_dim``.
    """

    @register_to_config
    def __init__(self, tokens: int = 77, dim: int = 1024) -> None:
        super().__init__()
        self.register_buffer("embeds", torch.zeros(1, tokens, dim))

    @classmethod
    def of(cls, embeds: Tensor) -> FixedPromptEmbedding:
        """Hold ``embeds`` ``(1, tokens, dim)`` (copied, in its dtype)."""
        if embeds.ndim != 3 or embeds.shape[0] != 1:
            raise ValueError(f"prompt embedding must be (1, tokens, dim), got {tuple(embeds.shape)}")
        model = cls(tokens=int(embeds.shape[1]), dim=int(embeds.shape[2]))
        model.embeds = embeds.detach().clone()
        return model.eval()

    def forward(self) -> Tensor:
        """``(1, tokens, dim)`` the embedding, in this model's dtype on its device."""
        return self.embeds
