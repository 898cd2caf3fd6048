"""InvSRPipeline: InvSR super-resolution as a diffusers ``DiffusionPipeline`` (docs/sampling.md).

The pipeline holds the system as registered components (``vae``, ``unet`` or ``transformer``,
``text_encoder``, ``tokenizer``, ``scheduler``, ``noise_predictor``), so ``save_pretrained`` /
``from_pretrained``, ``.to(device, dtype)``, ``enable_model_cpu_offload()`` and ``set_progress_bar_config``
behave as in any diffusers pipeline. A call runs the project's one sampler
(:class:`invsr_pl.sampling.sampler.InvSRSampler`) on a :class:`~invsr_pl.models.backbone.FrozenBackbone`
view of the components (:func:`invsr_pl.models.backbones.from_components`: SD-Turbo, SDXL-Turbo or SD3.5
Large Turbo, docs/backbones.md), image by image, so its output is bit for bit the sampler's for the same
input and seed.

Which prior: a ``transformer`` is SD3.5 (flow matching); a ``unet`` with SDXL's added ``text_time``
conditioning is SDXL-Turbo, any other ``unet`` SD-Turbo. SD-Turbo keeps its CLIP text encoder and tokenizer
(a call may embed another prompt); SDXL-Turbo and SD3.5 embed their prompt once at load with their several
text encoders, which are released, and the pipeline holds the result as a :class:`FixedPromptEmbedding`
(sequence and pooled embedding), as it does for the tiny twins.

Building one::

    from invsr_pl.pipelines import InvSRPipeline

    # SD-Turbo and a released / exported / trained noise predictor (.pth, export folder, train.py .ckpt)
    pipe = InvSRPipeline.from_sd_turbo("stabilityai/sd-turbo", noise_predictor="noise_predictor_v5.pth")
    pipe = pipe.to("cuda", torch.float16)
    sr = pipe(Image.open("photo.png"), num_inference_steps=1).images[0]

    # any backbone by name (from_sd_turbo is the same builder with SD-Turbo as the default name)
    pipe = InvSRPipeline.from_backbone_name("stabilityai/sdxl-turbo", noise_predictor="runs/sdxl/np")

    # an invsr-export folder (the backbone it names is loaded from the hub / its folder)
    pipe = InvSRPipeline.from_pretrained("exports/run1")

    # the tiny twins (tests, smoke mode: offline, CPU, milliseconds)
    from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_noise_predictor
    pipe = InvSRPipeline.from_backbone(build_tiny_sd_turbo(seed=0), tiny_noise_predictor(seed=0))
    pipe = InvSRPipeline.from_backbone_name("tiny_sd35_turbo")  # random tiny noise predictor (16 channels)

Backbone names (``from_backbone_name(base=...)``, the ``base_model`` of an export's ``model_index.json``) are
those ``invsr-sr --backbone`` takes: a hub id or diffusers folder, or one of
:data:`~invsr_pl.models.builtin.BUILTIN_BACKBONES`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from invsr_pl.models import backbones
from invsr_pl.models.backbone import FrozenBackbone
from invsr_pl.models.builtin import BUILTIN_BACKBONES
from invsr_pl.models.loading import load_noise_predictor
from invsr_pl.models.noise_predictor import NoisePredictor
from invsr_pl.models.sd_turbo import (
    DEFAULT_MODEL_ID,
    POSITIVE_PROMPT,
    BackboneWeightsNotFound,
    embed_prompt,
    resolve_dtype,
    resolve_folder,
)
from invsr_pl.models.tiny import tiny_noise_predictor
from invsr_pl.pipelines.image_io import ImageInput, PipelineImage, from_output, to_pipeline_images
from invsr_pl.pipelines.prompt_embedding import FixedPromptEmbedding
from invsr_pl.sampling.oom import sample_with_fallback
from invsr_pl.sampling.sampler import InvSRSampler
from invsr_pl.utils.images import resize_image
from invsr_pl.utils.provenance import read_provenance
from invsr_pl.utils.seeding import DEFAULT_SEED

__all__ = [
    "BUILTIN_BACKBONES",
    "DEFAULT_SEED",
    "InvSRPipeline",
    "InvSRPipelineOutput",
    "check_noise_predictor",
    "model_index",
]

# every backbone component a pipeline folder may hold (a family uses either unet or transformer)
_BACKBONE_PARTS = ("vae", "unet", "transformer", "scheduler", "text_encoder", "tokenizer")
# family -> (its denoiser component, diffusers class of the denoiser, diffusers class of the scheduler)
_FAMILY_CLASSES = {
    "sd_turbo": ("unet", "UNet2DConditionModel", "EulerDiscreteScheduler"),
    "sdxl_turbo": ("unet", "UNet2DConditionModel", "EulerDiscreteScheduler"),
    "sd35_turbo": ("transformer", "SD3Transformer2DModel", "FlowMatchEulerDiscreteScheduler"),
}


@dataclass
class InvSRPipelineOutput(BaseOutput):
    """What :meth:`InvSRPipeline.__call__` returns.

    Attributes:
        images: the SR images, one per input image, in ``output_type`` (see ``image_io.from_output``);
            3 channels, 4 when the input had alpha (upscaled bicubic and re-attached).
        bit_depths: 8 or 16 per image: the input's (16 for 16-bit and float inputs), for writing files.
    """

    images: list[PIL.Image.Image] | np.ndarray | Tensor | list[np.ndarray] | list[Tensor]
    bit_depths: list[int]


def check_noise_predictor(
    noise_predictor: nn.Module, latent_channels: int, backbone: str = "the backbone"
) -> None:
    """Refuse a noise predictor whose latent channels are not the backbone's (a 4-channel SD-Turbo / SDXL
    noise predictor cannot start an SD3.5 trajectory, 16 channels, and vice versa).

    Raises:
        ValueError: one line naming both channel counts.
    """
    have = getattr(noise_predictor, "latent_channels", None)
    if have is not None and int(have) != int(latent_channels):
        raise ValueError(
            f"the noise predictor predicts {have}-channel latents but {backbone} has {latent_channels} "
            "latent channels: it was trained for another backbone"
        )


def model_index(
    base_model: str,
    base_revision: str | None = None,
    prompt: str | None = POSITIVE_PROMPT,
    fixed_prompt: bool | None = None,
    family: str | None = None,
) -> dict[str, Any]:
    """The ``model_index.json`` of an InvSR pipeline folder that names its backbone instead of holding it
    (what ``invsr-export`` writes; :meth:`InvSRPipeline.from_pretrained` then loads ``base_model``).

    Args:
        base_model: backbone name (hub id, folder, or one of :data:`BUILTIN_BACKBONES`).
        base_revision: hub revision of ``base_model``.
        prompt: the prompt the noise predictor was trained with (embedded at load for the real priors;
            None for the built-in backbones, which have no text prompt).
        fixed_prompt: the text encoder is a :class:`FixedPromptEmbedding` (default: for the built-in
            backbones, SDXL-Turbo and SD3.5; SD-Turbo keeps its CLIP text encoder).
        family: ``sd_turbo`` / ``sdxl_turbo`` / ``sd35_turbo`` (default:
            :func:`~invsr_pl.models.backbones.family_of` ``base_model``); names the denoiser component and
            the scheduler class.
    """
    family = family or backbones.family_of(str(base_model))
    if family not in _FAMILY_CLASSES:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {', '.join(_FAMILY_CLASSES)}")
    builtin = base_model in BUILTIN_BACKBONES
    fixed = (builtin or family != "sd_turbo") if fixed_prompt is None else fixed_prompt
    denoiser, denoiser_class, scheduler_class = _FAMILY_CLASSES[family]
    text = (
        ["invsr_pl.pipelines.prompt_embedding", "FixedPromptEmbedding"]
        if fixed
        else ["transformers", "CLIPTextModel"]
    )
    return {
        "_class_name": InvSRPipeline.__name__,
        "_diffusers_version": diffusers.__version__,
        "base_model": base_model,
        "base_revision": base_revision,
        "base_family": family,
        "prompt": None if builtin or (fixed and family == "sd_turbo") else (prompt or POSITIVE_PROMPT),
        "noise_predictor": ["invsr_pl.models.noise_predictor", "NoisePredictor"],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": text,
        "tokenizer": [None, None] if fixed else ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", denoiser_class] if denoiser == "unet" else [None, None],
        "transformer": ["diffusers", denoiser_class] if denoiser == "transformer" else [None, None],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _recorded_backbone_config(folder: Path) -> dict[str, Any]:
    """The backbone config an export's provenance file records (plain values), or {} without one."""
    config = ((read_provenance(folder) or {}).get("backbone") or {}).get("config")
    return config if isinstance(config, dict) else {}


def load_base(
    base: str = DEFAULT_MODEL_ID,
    revision: str | None = None,
    cache_dir: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    recorded: dict[str, Any] | None = None,
    family: str | None = None,
    prompt: str | None = None,
) -> dict[str, Any]:
    """The backbone components of ``base``: ``vae``, ``unet`` / ``transformer`` (the other one None),
    ``scheduler``, ``text_encoder``, ``tokenizer``.

    Args:
        base: a hub id or diffusers folder, or one of :data:`BUILTIN_BACKBONES`
            (:func:`invsr_pl.models.backbones.build_builtin`; text encoder: their fixed prompt embedding, no
            tokenizer). SD-Turbo: its CLIP text encoder and tokenizer are loaded too; SDXL-Turbo / SD3.5:
            ``from_pretrained`` of their backbone class embeds ``prompt`` once, the text encoder is that
            :class:`FixedPromptEmbedding`.
        revision / cache_dir: hub revision and cache folder.
        torch_dtype: weight dtype (``None``: float32; ``"auto"``: fp16 where CUDA is available).
        recorded: the backbone config a checkpoint recorded (seed / cross_attention_dim / latent_channels of
            a tiny twin, seed of ``sd_turbo_random``, weights_path of ``tiny_trained``); plain values,
            nothing instantiated.
        family: ``sd_turbo`` / ``sdxl_turbo`` / ``sd35_turbo`` of a hub id or folder (default:
            :func:`~invsr_pl.models.backbones.family_of`).
        prompt: text embedded by SDXL-Turbo / SD3.5 (None: the paper's positive prompt).

    Raises:
        BackboneWeightsNotFound: the weights are neither a folder nor cached, and the hub is unreachable.
        FileNotFoundError: the tiny trained twin's weight file is missing.
    """
    dtype = resolve_dtype(torch_dtype if torch_dtype is not None else "float32")
    if base in BUILTIN_BACKBONES:
        return _parts(backbones.build_builtin(base, dtype, recorded))
    family = backbones.family_of(str(base), family)
    if family != "sd_turbo":
        loaded = backbones.load_pretrained(
            str(base),
            family,
            dtype=dtype,
            prompt=prompt or POSITIVE_PROMPT,
            revision=revision,
            cache_dir=cache_dir,
        )
        return _parts(loaded)
    from transformers import CLIPTextModel, CLIPTokenizer  # heavy: only for a real SD-Turbo

    folder = str(resolve_folder(str(base), revision, cache_dir))
    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
            "transformer": None,
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
            "scheduler": EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
            "text_encoder": CLIPTextModel.from_pretrained(
                folder, subfolder="text_encoder", dtype=dtype
            ).eval(),
            "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        }
    except OSError as err:  # diffusers/transformers report missing files as OSError
        raise BackboneWeightsNotFound(f"SD-Turbo weights in {folder} are incomplete: {err}") from err


def _parts(backbone: FrozenBackbone) -> dict[str, Any]:
    """The pipeline components of a loaded backbone (its modules shared; its cached conditioning held as a
    :class:`FixedPromptEmbedding`)."""
    name = backbone.denoiser_name
    return {
        "unet": backbone.denoiser if name == "unet" else None,
        "transformer": backbone.denoiser if name == "transformer" else None,
        "vae": backbone.vae,
        "scheduler": backbone.scheduler,
        "text_encoder": FixedPromptEmbedding.of(backbone.prompt_embeds, backbone.pooled_prompt_embeds),
        "tokenizer": None,
    }


class InvSRPipeline(DiffusionPipeline):
    """Super-resolve images with a frozen one-step prior and a trained noise predictor (docs/sampling.md).

    Args:
        vae: the prior's ``AutoencoderKL`` (or a tiny twin's).
        text_encoder: SD-Turbo's CLIP text model, or a :class:`FixedPromptEmbedding` (SDXL-Turbo, SD3.5 and
            the tiny twins: the conditioning computed at load; with a pooled embedding for SDXL / SD3).
        tokenizer: the CLIP tokenizer; None with a :class:`FixedPromptEmbedding`.
        scheduler: ``EulerDiscreteScheduler`` (SD-Turbo, SDXL-Turbo: its sigma table) or
            ``FlowMatchEulerDiscreteScheduler`` (SD3.5: kept with the weights); the sampler steps itself.
        noise_predictor: :class:`~invsr_pl.models.noise_predictor.NoisePredictor`; its ``scale`` is the
            pipeline's SR factor, its ``latent_channels`` must be the VAE's.
        unet: SD-Turbo's / SDXL-Turbo's ``UNet2DConditionModel`` (None for SD3.5).
        transformer: SD3.5's ``SD3Transformer2DModel`` (None for the UNet priors).
        prompt: the text embedded for every UNet call (SD-Turbo: the paper's positive prompt); with a fixed
            embedding, the one it was computed from (informative, None for the tiny twins).
        base_model / base_revision / base_family: the backbone this pipeline was built from (informative in a
            complete folder; loaded from there when a folder holds only the noise predictor, see
            :meth:`from_pretrained`).
    """

    model_cpu_offload_seq = "text_encoder->noise_predictor->vae->unet->transformer"
    _optional_components = ["tokenizer", "unet", "transformer"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: Any,
        noise_predictor: NoisePredictor,
        unet: UNet2DConditionModel | None = None,
        transformer: SD3Transformer2DModel | None = None,
        prompt: str | None = POSITIVE_PROMPT,
        base_model: str | None = None,
        base_revision: str | None = None,
        base_family: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(text_encoder, FixedPromptEmbedding) and tokenizer is None:
            raise ValueError("a CLIP text encoder needs its tokenizer (or pass a FixedPromptEmbedding)")
        if (unet is None) == (transformer is None):
            raise ValueError("an InvSR pipeline needs exactly one denoiser: a unet or a transformer")
        if noise_predictor is not None and vae is not None:
            check_noise_predictor(noise_predictor, int(vae.config.latent_channels), "the pipeline's VAE")
        self.register_modules(
            vae=vae,
            unet=unet,
            transformer=transformer,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            noise_predictor=noise_predictor,
        )
        self.register_to_config(
            prompt=prompt, base_model=base_model, base_revision=base_revision, base_family=base_family
        )
        self._prompt_cache: tuple[tuple[Any, ...], tuple[Tensor, Tensor | None]] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_backbone(
        cls, backbone: FrozenBackbone, noise_predictor: NoisePredictor, base_model: str | None = None
    ) -> InvSRPipeline:
        """A pipeline over a loaded backbone (shares its modules) and ``noise_predictor``; the backbone's
        cached prompt conditioning becomes the :class:`FixedPromptEmbedding` text encoder.

        Raises:
            ValueError: the noise predictor's latent channels are not the backbone's.
        """
        check_noise_predictor(noise_predictor, backbone.latent_channels, f"the {type(backbone).__name__}")
        return cls(
            **_parts(backbone), noise_predictor=noise_predictor.eval(), prompt=None, base_model=base_model
        )

    @classmethod
    def from_backbone_name(
        cls,
        base: str,
        noise_predictor: str | os.PathLike | NoisePredictor | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        use_ema: bool = True,
        prompt: str = POSITIVE_PROMPT,
        family: str | None = None,
        recorded: dict[str, Any] | None = None,
    ) -> InvSRPipeline:
        """The released pieces: the backbone ``base`` (any family) and a noise predictor.

        Args:
            base: hub id or diffusers folder of SD-Turbo, SDXL-Turbo or SD3.5 Large Turbo, or one of
                :data:`BUILTIN_BACKBONES`.
            noise_predictor: a ``NoisePredictor``, or a path for
                :func:`invsr_pl.models.loading.load_noise_predictor` (official ``.pth``, export folder or its
                ``.safetensors``, ``train.py`` ``.ckpt`` with EMA weights); None: the random tiny one
                (seed 0, the backbone's latent channels), for smoke runs on the tiny backbones.
            revision / cache_dir / torch_dtype / family / recorded: as for :func:`load_base`; the noise
                predictor stays float32 until ``.to(dtype)``.
            use_ema: ``.ckpt`` only: its EMA weights.
            prompt: text of the prompt embedding (SD-Turbo: kept with its text encoder; SDXL-Turbo, SD3.5:
                embedded once at load; the built-in backbones have none).

        Raises:
            BackboneWeightsNotFound, FileNotFoundError, WeightFileError, RuntimeError: as the loaders;
            ValueError: a noise predictor for other latent channels than the backbone's.
        """
        family = None if base in BUILTIN_BACKBONES else backbones.family_of(str(base), family)
        parts = load_base(base, revision, cache_dir, torch_dtype, recorded, family=family, prompt=prompt)
        if noise_predictor is None:
            channels = int(parts["vae"].config.latent_channels)
            model = tiny_noise_predictor(seed=0, latent_channels=channels)
        elif isinstance(noise_predictor, NoisePredictor):
            model = noise_predictor
        else:
            model = load_noise_predictor(noise_predictor, use_ema=use_ema)[0]
        builtin = base in BUILTIN_BACKBONES
        return cls(
            **parts,
            noise_predictor=model.eval(),
            prompt=None if builtin else prompt,
            base_model=str(base),
            base_revision=revision,
            base_family=backbones.family_of(str(base), family),
        )

    @classmethod
    def from_sd_turbo(
        cls,
        base: str = DEFAULT_MODEL_ID,
        noise_predictor: str | os.PathLike | NoisePredictor | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        use_ema: bool = True,
        prompt: str = POSITIVE_PROMPT,
        **kwargs: Any,
    ) -> InvSRPipeline:
        """:meth:`from_backbone_name` with SD-Turbo as the default ``base`` (the name predates the other
        priors; any backbone name works)."""
        return cls.from_backbone_name(
            base, noise_predictor, revision, cache_dir, torch_dtype, use_ema, prompt, **kwargs
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> InvSRPipeline:
        """diffusers' ``from_pretrained``; a local folder that names its backbone (``base_model`` in its
        ``model_index.json``, as ``invsr-export`` writes) without holding it gets the backbone from there.

        Folders written before SD3.5 (no ``transformer`` / ``base_family`` keys) load as before: SD-Turbo
        family, ``unet``. Extra keyword arguments: ``revision``/``cache_dir`` of the backbone hub id are the
        folder's ``base_revision`` and diffusers' ``cache_dir``; ``torch_dtype`` applies to the backbone too.
        """
        folder = Path(pretrained_model_name_or_path).expanduser()
        index_path = folder / "model_index.json"
        if folder.is_dir() and index_path.is_file():
            index = json.loads(index_path.read_text())
            base = index.get("base_model")
            # the components the folder's index names (a null entry is an absent component)
            named = [p for p in _BACKBONE_PARTS if isinstance(index.get(p), list) and index[p][:1] != [None]]
            missing = [p for p in named if p not in kwargs and not (folder / p).is_dir()]
            if base and any(p != "tokenizer" for p in missing):
                parts = load_base(
                    str(base),
                    index.get("base_revision"),
                    kwargs.get("cache_dir"),
                    kwargs.get("torch_dtype"),
                    recorded=_recorded_backbone_config(folder),
                    family=index.get("base_family"),
                    prompt=index.get("prompt"),
                )
                for name in missing:
                    kwargs[name] = parts[name]
        pipe = super().from_pretrained(
            str(folder) if folder.is_dir() else pretrained_model_name_or_path, **kwargs
        )
        pipe.noise_predictor.eval()
        return pipe

    # ------------------------------------------------------------------ properties

    @property
    def scale(self) -> int:
        """SR factor (the noise predictor's)."""
        return int(self.noise_predictor.scale)

    @property
    def denoiser(self) -> nn.Module:
        """The frozen denoiser: the ``transformer`` (SD3.5) or the ``unet``."""
        return self.transformer if self.transformer is not None else self.unet

    def _conditioning(
        self, prompt: str | None, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor | None]:
        """``((1, L, D) prompt embedding, (1, P) pooled embedding or None)`` in the denoiser's dtype, cached
        per prompt / device / dtype."""
        fixed = isinstance(self.text_encoder, FixedPromptEmbedding)
        if fixed:
            if prompt is not None:
                raise ValueError(
                    "this pipeline's backbone has a fixed prompt embedding (computed once at load): prompt "
                    "cannot be set at call time"
                )
            key: tuple[Any, ...] = ("fixed", id(self.text_encoder), device, dtype)
        else:
            prompt = prompt if prompt is not None else (self.config.prompt or POSITIVE_PROMPT)
            key = (prompt, id(self.text_encoder), device, dtype)
        if self._prompt_cache is None or self._prompt_cache[0] != key:
            if fixed:
                embeds, pooled = self.text_encoder(), self.text_encoder.pooled_embeds
            else:
                embeds, pooled = embed_prompt(self.tokenizer, self.text_encoder, prompt), None
            pooled = None if pooled is None else pooled.to(device=device, dtype=dtype)
            self._prompt_cache = (key, (embeds.to(device=device, dtype=dtype), pooled))
        return self._prompt_cache[1]

    def backbone(self, prompt: str | None = None) -> FrozenBackbone:
        """The components as the backbone the sampler runs on
        (:func:`invsr_pl.models.backbones.from_components`; shares the denoiser and VAE); its ``device`` is
        the pipeline's execution device, so the sampler's tensors go where the networks run also while CPU
        offload hooks move the weights. SDXL's time ids are those of the UNet's native size."""
        device = self._execution_device
        embeds, pooled = self._conditioning(prompt, device, self.denoiser.dtype)
        return backbones.from_components(
            self.vae,
            self.scheduler,
            embeds,
            pooled,
            unet=self.unet,
            transformer=self.transformer,
            execution_device=device,
        )

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: int | None = None,
        timesteps: Sequence[int] | None = None,
        chopping_size: int | None = 128,
        chopping_batch_size: int = 8,
        color_fix: str = "none",
        generator: torch.Generator | int | Sequence[torch.Generator] | None = None,
        outscale: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prompt: str | None = None,
        oom_fallback: bool = True,
    ) -> InvSRPipelineOutput | tuple:
        """Super-resolve ``image`` (see :mod:`invsr_pl.pipelines.image_io` for what it may be).

        Args:
            image: a PIL image, numpy array, tensor, or a list of them; any size (reflect-padded /
                chopped into overlapping patches by the sampler), alpha and 16-bit kept.
            num_inference_steps: steps of the paper's schedule (1 by default: ``[200]``).
            timesteps: descending user timesteps (e.g. ``[200, 100, 50]``); win over the schedule, and must
                agree with ``num_inference_steps`` when both are given.
            chopping_size: LR patch size (a multiple of the sampler's modulus, 16 for x4 on SD-Turbo);
                None or 0: the whole image in one pass.
            chopping_batch_size: patches per network call.
            color_fix: ``"none"``, ``"wavelet"``, ``"ycbcr"`` or ``"adain"``.
            generator: an int seed or None (each image gets a fresh generator with that seed, None =
                :data:`DEFAULT_SEED`, as ``invsr-sr --seed``: the result does not depend on the order), one
                ``torch.Generator`` (drawn from image after image), or one generator per image.
            outscale: final size factor (the SR result resized, bicubic, antialiased); None: the model's.
            output_type: ``"pil"``, ``"np"`` or ``"pt"``.
            return_dict: False returns ``(images, bit_depths)``.
            prompt: another prompt than the pipeline's (SD-Turbo text encoders only).
            oom_fallback: on CUDA out-of-memory, retry with fewer / smaller patches
                (:func:`invsr_pl.sampling.oom.sample_with_fallback`).

        Returns:
            :class:`InvSRPipelineOutput` with one image per input image.

        Raises:
            ValueError: bad input, timesteps or options (one line).
        """
        items = to_pipeline_images(image)
        if (
            timesteps is not None
            and num_inference_steps is not None
            and len(timesteps) != num_inference_steps
        ):
            raise ValueError(
                f"num_inference_steps={num_inference_steps} but {len(timesteps)} timesteps were given"
            )
        backbone = self.backbone(prompt)
        sampler = InvSRSampler(
            backbone,
            self.noise_predictor,
            num_steps=num_inference_steps or 1,
            timesteps=timesteps,
            chopping_size=chopping_size or None,
            chopping_batch=chopping_batch_size,
            color_fix=color_fix,
        )
        generators = self._generators(generator, len(items), backbone.device)
        results: list[Tensor] = []
        for item, gen in zip(self.progress_bar(items), generators, strict=True):
            results.append(self._one(sampler, item, gen, outscale, oom_fallback))
        self.maybe_free_model_hooks()
        images = from_output(results, output_type)
        depths = [item.bit_depth for item in items]
        return InvSRPipelineOutput(images=images, bit_depths=depths) if return_dict else (images, depths)

    def _one(
        self,
        sampler: InvSRSampler,
        item: PipelineImage,
        generator: torch.Generator | None,
        outscale: float | None,
        oom_fallback: bool,
    ) -> Tensor:
        """One image: SR of the colour, resized to ``outscale``; alpha upscaled bicubic (no diffusion)."""
        lr = item.rgb[None]
        sr = (
            sample_with_fallback(sampler, lr, generator) if oom_fallback else sampler(lr, generator=generator)
        )
        sr = sr[0]
        scale = outscale or sampler.scale
        size = (round(lr.shape[-2] * scale), round(lr.shape[-1] * scale))
        sr = resize_image(sr, size)
        if item.alpha is None:
            return sr.cpu()
        alpha = resize_image(item.alpha.to(sr.device), size)
        return torch.cat([sr, alpha]).cpu()

    @staticmethod
    def _generators(
        generator: torch.Generator | int | Sequence[torch.Generator] | None, n: int, device: torch.device
    ) -> list[torch.Generator]:
        if isinstance(generator, torch.Generator):
            return [generator] * n
        if generator is None or isinstance(generator, int):
            seed = DEFAULT_SEED if generator is None else int(generator)
            return [torch.Generator(device=device).manual_seed(seed) for _ in range(n)]
        generators = list(generator)
        if len(generators) != n:
            raise ValueError(f"{len(generators)} generators for {n} images: give one per image")
        return generators
