"""FixedPromptEmbedding: a prompt embedding held as a model, the text encoder of backbones without one.

InvSR conditions every denoiser call on one fixed prompt conditioning (docs/conventions.md). SD-Turbo
computes it with its CLIP text encoder; SDXL-Turbo and SD3.5 Large Turbo compute theirs (a sequence and a
pooled embedding) once at load with their several text encoders, which are then released
(docs/backbones.md); the tiny twins (``invsr_pl.models.tiny``, ``invsr_pl.models.tiny_trained``) have no
text encoder, only seeded random embeddings. Holding that conditioning as a diffusers model lets
:class:`~invsr_pl.pipelines.InvSRPipeline` keep the ``text_encoder`` slot of every pipeline and round-trip
it through ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 - diffusers finds the loader through it
from torch import Tensor

from invsr_pl.models.strict_pretrained import StrictModelMixin

__all__ = ["FixedPromptEmbedding"]


class FixedPromptEmbedding(StrictModelMixin, ConfigMixin):
    """The embedding of one prompt, ``(1, tokens, dim)``, and optionally its pooled embedding
    ``(1, pooled_dim)``; it is its own output (no tokenizer, no prompt).

    Args:
        tokens: sequence length (77 for CLIP, 77 + 256 for SD3's CLIP + T5).
        dim: width, the denoiser's ``cross_attention_dim`` / ``joint_attention_dim``.
        pooled_dim: width of the pooled embedding (SDXL: 1280, SD3: 2048); 0: none (SD-Turbo, its twins).
    """

    @register_to_config
    def __init__(self, tokens: int = 77, dim: int = 1024, pooled_dim: int = 0) -> None:
        super().__init__()
        self.register_buffer("embeds", torch.zeros(1, tokens, dim))
        # no buffer at all without one, so that folders saved before pooled embeddings existed load strictly
        self.register_buffer("pooled", torch.zeros(1, pooled_dim) if pooled_dim else None)

    @classmethod
    def of(cls, embeds: Tensor, pooled: Tensor | None = None) -> FixedPromptEmbedding:
        """Hold ``embeds`` ``(1, tokens, dim)`` and ``pooled`` ``(1, pooled_dim)`` or None (copied, in their
        dtype)."""
        if embeds.ndim != 3 or embeds.shape[0] != 1:
            raise ValueError(f"prompt embedding must be (1, tokens, dim), got {tuple(embeds.shape)}")
        if pooled is not None and (pooled.ndim != 2 or pooled.shape[0] != 1 or pooled.shape[1] == 0):
            raise ValueError(f"pooled prompt embedding must be (1, dim), got {tuple(pooled.shape)}")
        pooled_dim = 0 if pooled is None else int(pooled.shape[1])
        model = cls(tokens=int(embeds.shape[1]), dim=int(embeds.shape[2]), pooled_dim=pooled_dim)
        model.embeds = embeds.detach().clone()
        if pooled is not None:
            model.pooled = pooled.detach().clone().to(embeds.dtype)
        return model.eval()

    @property
    def pooled_embeds(self) -> Tensor | None:
        """``(1, pooled_dim)`` the pooled embedding in this model's dtype on its device, or None."""
        return self.pooled

    def forward(self) -> Tensor:
        """``(1, tokens, dim)`` the sequence embedding, in this model's dtype on its device."""
        return self.embeds
