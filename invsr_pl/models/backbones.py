"""The backbone families: which :class:`~invsr_pl.models.backbone.FrozenBackbone` a name, a folder or a set of
pipeline components is, and building it (docs/backbones.md).

Every caller that starts from a name (``invsr-sr --backbone``, the pipeline's ``base_model``, an export's
provenance) or from components (the pipeline) goes through here, so adding a prior means adding it here
once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from invsr_pl.models import tiny as tiny_models
from invsr_pl.models.backbone import FrozenBackbone
from invsr_pl.models.builtin import SD_TURBO_RANDOM, TINY, TINY_SD35_TURBO, TINY_SDXL_TURBO, TINY_TRAINED
from invsr_pl.models.sd35_turbo import DEFAULT_MODEL_ID as SD35_ID
from invsr_pl.models.sd35_turbo import WEIGHTS as SD35_WEIGHTS
from invsr_pl.models.sd35_turbo import FrozenSD35Turbo
from invsr_pl.models.sd_turbo import DEFAULT_MODEL_ID as SD_TURBO_ID
from invsr_pl.models.sd_turbo import WEIGHTS as SD_TURBO_WEIGHTS
from invsr_pl.models.sd_turbo import FrozenSDTurbo
from invsr_pl.models.sdxl_turbo import DEFAULT_MODEL_ID as SDXL_ID
from invsr_pl.models.sdxl_turbo import WEIGHTS as SDXL_WEIGHTS
from invsr_pl.models.sdxl_turbo import FrozenSDXLTurbo
from invsr_pl.models.tiny_trained import load_tiny_trained_sd_turbo
from invsr_pl.models.weights_folder import WeightsSpec

__all__ = [
    "BUILTIN_FAMILIES",
    "FAMILIES",
    "WEIGHTS",
    "build_builtin",
    "family_of",
    "from_components",
    "load_pretrained",
]

# family name (= the conf/model/backbone option of the real model) -> class
FAMILIES: dict[str, type[FrozenBackbone]] = {
    "sd_turbo": FrozenSDTurbo,
    "sdxl_turbo": FrozenSDXLTurbo,
    "sd35_turbo": FrozenSD35Turbo,
}
# what each family's weights folder must hold (the missing-weights message names the model id from here)
WEIGHTS: dict[str, WeightsSpec] = {
    "sd_turbo": SD_TURBO_WEIGHTS,
    "sdxl_turbo": SDXL_WEIGHTS,
    "sd35_turbo": SD35_WEIGHTS,
}
# built-in name (and its conf/model/backbone option) -> the family of the prior it is a twin of
BUILTIN_FAMILIES: dict[str, str] = {
    TINY: "sd_turbo",
    TINY_TRAINED: "sd_turbo",
    SD_TURBO_RANDOM: "sd_turbo",
    TINY_SDXL_TURBO: "sdxl_turbo",
    TINY_SD35_TURBO: "sd35_turbo",
}
_KNOWN_IDS = {SD_TURBO_ID: "sd_turbo", SDXL_ID: "sdxl_turbo", SD35_ID: "sd35_turbo"}
# diffusers' pipeline class in a folder's model_index.json -> family
_PIPELINE_CLASSES = {
    "StableDiffusionPipeline": "sd_turbo",
    "StableDiffusionXLPipeline": "sdxl_turbo",
    "StableDiffusion3Pipeline": "sd35_turbo",
}
# tiny twin -> its builder in models/tiny.py, looked up there at call time (one builder per twin, also when
# the module's attribute is wrapped, e.g. by a test that records the arguments it was called with)
_TINY_BUILDERS = {
    TINY: "build_tiny_sd_turbo",
    TINY_SDXL_TURBO: "build_tiny_sdxl_turbo",
    TINY_SD35_TURBO: "build_tiny_sd35_turbo",
}


def family_of(model: str, choice: str | None = None) -> str:
    """The family of a built-in name, hub id or diffusers folder.

    ``choice`` (the ``model/backbone`` option a checkpoint's provenance records) wins when it names a family
    or a built-in twin, since a folder's name says nothing; else a built-in name's family, a known id, the
    folder's (or the cached hub copy's) ``model_index.json`` pipeline class, its subfolders
    (``transformer/``: SD3, ``text_encoder_2/``: SDXL); SD-Turbo when nothing says otherwise (the project's
    default prior)."""
    if choice in FAMILIES:
        return str(choice)
    if choice in BUILTIN_FAMILIES:
        return BUILTIN_FAMILIES[str(choice)]
    if model in BUILTIN_FAMILIES:
        return BUILTIN_FAMILIES[model]
    if model in _KNOWN_IDS:
        return _KNOWN_IDS[model]
    folder = Path(model).expanduser()
    index = folder / "model_index.json"
    if not folder.is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "model_index.json")
        except Exception:  # noqa: BLE001 - not a valid repo id: the loader gives the clear error
            cached = None
        index = Path(cached) if isinstance(cached, str) else index
        folder = index.parent
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError):
            name = None
        if name in _PIPELINE_CLASSES:
            return _PIPELINE_CLASSES[name]
    if (folder / "transformer").is_dir():
        return "sd35_turbo"
    if (folder / "text_encoder_2").is_dir():
        return "sdxl_turbo"
    return "sd_turbo"


def load_pretrained(model: str, family: str | None = None, **kwargs: Any) -> FrozenBackbone:
    """``from_pretrained`` of ``model``'s family (:func:`family_of` unless ``family`` is given).

    Keyword arguments go to that class's ``from_pretrained`` (dtype, prompt, revision, cache_dir, device).

    Raises:
        BackboneWeightsNotFound: as the family's loader; ValueError: unknown family.
    """
    family = family or family_of(str(model))
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family].from_pretrained(str(model), **kwargs)


def build_builtin(
    name: str, dtype: str | torch.dtype = "float32", recorded: dict[str, Any] | None = None
) -> FrozenBackbone:
    """One of :data:`~invsr_pl.models.builtin.BUILTIN_BACKBONES`, rebuilt from the plain values a checkpoint
    recorded (``seed`` / ``cross_attention_dim`` of a tiny twin, ``seed`` of ``sd_turbo_random``,
    ``weights_path`` of ``tiny_trained``); nothing from a file is ever instantiated.

    Raises:
        ValueError: not a built-in name; FileNotFoundError: the tiny trained twin's weight file is missing.
    """
    recorded = recorded or {}
    dtype_name = str(dtype).removeprefix("torch.")
    if name == TINY_TRAINED:
        return load_tiny_trained_sd_turbo(dtype=dtype_name, weights_path=recorded.get("weights_path"))
    if name == SD_TURBO_RANDOM:
        return FrozenSDTurbo.random_sd_turbo(seed=_int(recorded, "seed", 0), dtype=dtype_name)
    if name in _TINY_BUILDERS:
        kwargs = {
            "seed": _int(recorded, "seed", 0),
            "cross_attention_dim": _int(recorded, "cross_attention_dim", 32),
        }
        if name == TINY_SD35_TURBO:
            kwargs["latent_channels"] = _int(recorded, "latent_channels", 16)
        return getattr(tiny_models, _TINY_BUILDERS[name])(dtype=dtype_name, **kwargs)
    raise ValueError(f"{name!r} is not a built-in backbone")


def from_components(
    vae: nn.Module,
    scheduler: Any,
    prompt_embeds: Tensor,
    pooled_prompt_embeds: Tensor | None = None,
    unet: nn.Module | None = None,
    transformer: nn.Module | None = None,
    execution_device: torch.device | None = None,
) -> FrozenBackbone:
    """The backbone over already-loaded components (shared, not copied; the dtype is kept): SD3.5 with a
    ``transformer``, SDXL-Turbo with a UNet taking added ``text_time`` conditioning, else SD-Turbo."""
    if transformer is not None:
        return FrozenSD35Turbo(
            transformer,
            vae,
            scheduler,
            prompt_embeds,
            pooled_prompt_embeds,
            execution_device=execution_device,
        )
    if unet is None:
        raise ValueError("a backbone needs a unet or a transformer")
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return FrozenSDXLTurbo(
            unet, vae, scheduler, prompt_embeds, pooled_prompt_embeds, execution_device=execution_device
        )
    return FrozenSDTurbo(unet, vae, scheduler, prompt_embeds, execution_device=execution_device)


def _int(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default
