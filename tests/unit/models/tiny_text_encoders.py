"""Offline CLIP tokenizers and text encoders for the tiny diffusers folders of the loader tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def clip_tokenizer(folder: Path, sub: str) -> int:
    """An offline CLIP tokenizer (letters only) saved under ``folder/sub``; returns its vocabulary size."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    ).save_pretrained(folder / sub)
    return len(vocab)


def clip_encoder(
    folder: Path,
    sub: str,
    vocab: int,
    hidden: int,
    projection: int | None,
    seed: int,
    intermediate: int | None = None,
    layers: int = 2,
    heads: int = 2,
) -> None:
    """A seeded random CLIP text model (a projection head when ``projection`` is set) in ``folder/sub``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection or hidden,
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(config) if projection is None else CLIPTextModelWithProjection(config)
    model.save_pretrained(folder / sub)
