"""InvSRPipeline: InvSR super-resolution as a diffusers ``DiffusionPipeline`` (docs/sampling.md).

The pipeline holds the system as registered components (``vae``, ``unet``, ``text_encoder``, ``tokenizer``,
``scheduler``, ``noise_predictor``), so ``save_pretrained`` / ``from_pretrained``, ``.to(device, dtype)``,
``enable_model_cpu_offload()`` and ``set_progress_bar_config`` behave as in any diffusers pipeline. A call
runs the project's one sampler (:class:`invsr_pl.sampling.sampler.InvSRSampler`) on a
:class:`~invsr_pl.models.sd_turbo.FrozenSDTurbo` view of the components, image by image, so its output is
bit for bit the sampler's for the same input and seed.

Building one::

    from invsr_pl.pipelines import InvSRPipeline

    # SD-Turbo and a released / exported / trained noise predictor (.pth, export folder, train.py .ckpt)
    pipe = InvSRPipeline.from_sd_turbo("stabilityai/sd-turbo", noise_predictor="noise_predictor_v5.pth")
    pipe = pipe.to("cuda", torch.float16)
    sr = pipe(Image.open("photo.png"), num_inference_steps=1).images[0]

    # an invsr-export folder (the backbone it names is loaded from the hub / its folder)
    pipe = InvSRPipeline.from_pretrained("exports/run1")

    # the tiny twins (tests, smoke mode: offline, CPU, milliseconds)
    from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_noise_predictor
    pipe = InvSRPipeline.from_backbone(build_tiny_sd_turbo(seed=0), tiny_noise_predictor(seed=0))
    pipe = InvSRPipeline.from_sd_turbo("tiny_trained", noise_predictor=None)  # random tiny noise predictor

Backbone names (``from_sd_turbo(base=...)``, the ``base_model`` of an export's ``model_index.json``) are
those ``invsr-sr --backbone`` takes: a hub id or diffusers folder, ``tiny``, ``tiny_trained`` or
``sd_turbo_random``.
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
from diffusers import AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from invsr_pl.models.builtin import BUILTIN_BACKBONES, SD_TURBO_RANDOM, TINY_TRAINED
from invsr_pl.models.loading import load_noise_predictor
from invsr_pl.models.noise_predictor import NoisePredictor
from invsr_pl.models.sd_turbo import (
    DEFAULT_MODEL_ID,
    POSITIVE_PROMPT,
    BackboneWeightsNotFound,
    FrozenSDTurbo,
    embed_prompt,
    resolve_dtype,
    resolve_folder,
)
from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_noise_predictor
from invsr_pl.models.tiny_trained import load_tiny_trained_sd_turbo
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
    "model_index",
]

_BACKBONE_PARTS = ("vae", "unet", "scheduler", "text_encoder", "tokenizer")


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


class _PipelineBackbone(FrozenSDTurbo):
    """``FrozenSDTurbo`` over the pipeline's components whose ``device`` is the pipeline's execution device,
    so the sampler puts its tensors where the networks run also while CPU offload hooks move the weights."""

    def __init__(self, *args: Any, execution_device: torch.device, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._execution_device = execution_device
        # the derived buffers only: moving the module would move (and un-offload) the UNet and VAE
        self.sigmas = self.sigmas.to(execution_device)
        self.prompt_embeds = self.prompt_embeds.to(execution_device)

    @property
    def device(self) -> torch.device:
        return self._execution_device


def model_index(
    base_model: str,
    base_revision: str | None = None,
    prompt: str | None = POSITIVE_PROMPT,
    fixed_prompt: bool | None = None,
) -> dict[str, Any]:
    """The ``model_index.json`` of an InvSR pipeline folder that names its backbone instead of holding it
    (what ``invsr-export`` writes; :meth:`InvSRPipeline.from_pretrained` then loads ``base_model``).

    Args:
        base_model: backbone name (hub id, folder, or one of :data:`BUILTIN_BACKBONES`).
        base_revision: hub revision of ``base_model``.
        prompt: the prompt the noise predictor was trained with (None: the backbone has no text encoder).
        fixed_prompt: the backbone's text encoder is a :class:`FixedPromptEmbedding` (default: the built-in
            backbones are).
    """
    fixed = base_model in BUILTIN_BACKBONES if fixed_prompt is None else fixed_prompt
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
        "prompt": None if fixed else (prompt or POSITIVE_PROMPT),
        "noise_predictor": ["invsr_pl.models.noise_predictor", "NoisePredictor"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": text,
        "tokenizer": [None, None] if fixed else ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _recorded_backbone_config(folder: Path) -> dict[str, Any]:
    """The backbone config an export's provenance file records (plain values), or {} without one."""
    config = ((read_provenance(folder) or {}).get("backbone") or {}).get("config")
    return config if isinstance(config, dict) else {}


def _int(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


def load_base(
    base: str = DEFAULT_MODEL_ID,
    revision: str | None = None,
    cache_dir: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    recorded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The backbone components of ``base``: ``vae``, ``unet``, ``scheduler``, ``text_encoder``, ``tokenizer``.

    Args:
        base: a hub id or diffusers folder (SD-Turbo: its CLIP text encoder and tokenizer are loaded too), or
            one of :data:`BUILTIN_BACKBONES` (text encoder: their fixed prompt embedding, no tokenizer).
        revision / cache_dir: hub revision and cache folder.
        torch_dtype: weight dtype (``None``: float32; ``"auto"``: fp16 where CUDA is available).
        recorded: the backbone config a checkpoint recorded (seed / cross_attention_dim of ``tiny``, seed
            of ``sd_turbo_random``, weights_path of ``tiny_trained``); plain values, nothing instantiated.

    Raises:
        BackboneWeightsNotFound: SD-Turbo is neither a folder nor cached, and the hub is unreachable.
        FileNotFoundError: the tiny trained twin's weight file is missing.
    """
    dtype = resolve_dtype(torch_dtype if torch_dtype is not None else "float32")
    recorded = recorded or {}
    if base in BUILTIN_BACKBONES:
        if base == TINY_TRAINED:
            backbone = load_tiny_trained_sd_turbo(dtype=dtype, weights_path=recorded.get("weights_path"))
        elif base == SD_TURBO_RANDOM:
            backbone = FrozenSDTurbo.random_sd_turbo(seed=_int(recorded, "seed", 0), dtype=dtype)
        else:
            backbone = build_tiny_sd_turbo(
                seed=_int(recorded, "seed", 0),
                dtype=dtype,
                cross_attention_dim=_int(recorded, "cross_attention_dim", 32),
            )
        return _parts(backbone)
    from transformers import CLIPTextModel, CLIPTokenizer  # heavy: only for a real SD-Turbo

    folder = str(resolve_folder(str(base), revision, cache_dir))
    try:
        return {
            "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
            "scheduler": EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler"),
            "text_encoder": CLIPTextModel.from_pretrained(
                folder, subfolder="text_encoder", dtype=dtype
            ).eval(),
            "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        }
    except OSError as err:  # diffusers/transformers report missing files as OSError
        raise BackboneWeightsNotFound(f"SD-Turbo weights in {folder} are incomplete: {err}") from err


def _parts(backbone: FrozenSDTurbo) -> dict[str, Any]:
    return {
        "unet": backbone.unet,
        "vae": backbone.vae,
        "scheduler": backbone.scheduler,
        "text_encoder": FixedPromptEmbedding.of(backbone.prompt_embeds),
        "tokenizer": None,
    }


class InvSRPipeline(DiffusionPipeline):
    """Super-resolve images with a frozen SD-Turbo and a trained noise predictor (docs/sampling.md).

    Args:
        vae: SD-Turbo's ``AutoencoderKL`` (or a tiny twin's).
        unet: SD-Turbo's ``UNet2DConditionModel``.
        text_encoder: the CLIP text model, or a :class:`FixedPromptEmbedding` (backbones without one).
        tokenizer: the CLIP tokenizer; None with a :class:`FixedPromptEmbedding`.
        scheduler: ``EulerDiscreteScheduler`` (its sigma table; the sampler steps itself).
        noise_predictor: :class:`~invsr_pl.models.noise_predictor.NoisePredictor`; its ``scale`` is the
            pipeline's SR factor.
        prompt: the text embedded for every UNet call (the paper's positive prompt); unused with a fixed
            embedding.
        base_model / base_revision: the backbone this pipeline was built from (informative in a complete
            folder; loaded from there when a folder holds only the noise predictor, see
            :meth:`from_pretrained`).
    """

    model_cpu_offload_seq = "text_encoder->noise_predictor->vae->unet"
    _optional_components = ["tokenizer"]

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: EulerDiscreteScheduler,
        noise_predictor: NoisePredictor,
        prompt: str | None = POSITIVE_PROMPT,
        base_model: str | None = None,
        base_revision: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(text_encoder, FixedPromptEmbedding) and tokenizer is None:
            raise ValueError("a CLIP text encoder needs its tokenizer (or pass a FixedPromptEmbedding)")
        self.register_modules(
            vae=vae,
            unet=unet,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            noise_predictor=noise_predictor,
        )
        self.register_to_config(prompt=prompt, base_model=base_model, base_revision=base_revision)
        self._prompt_cache: tuple[tuple[Any, ...], Tensor] | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_backbone(
        cls, backbone: FrozenSDTurbo, noise_predictor: NoisePredictor, base_model: str | None = None
    ) -> InvSRPipeline:
        """A pipeline over a loaded ``FrozenSDTurbo`` (shares its modules) and ``noise_predictor``; the
        backbone's cached prompt embedding becomes the :class:`FixedPromptEmbedding` text encoder."""
        return cls(
            **_parts(backbone), noise_predictor=noise_predictor.eval(), prompt=None, base_model=base_model
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
    ) -> InvSRPipeline:
        """The released pieces: the backbone ``base`` and a noise predictor.

        Args:
            base: hub id or diffusers folder of SD-Turbo, or one of :data:`BUILTIN_BACKBONES`.
            noise_predictor: a ``NoisePredictor``, or a path for
                :func:`invsr_pl.models.loading.load_noise_predictor` (official ``.pth``, export folder or its
                ``.safetensors``, ``train.py`` ``.ckpt`` with EMA weights); None: the random tiny one
                (seed 0), for smoke runs on the tiny backbones.
            revision / cache_dir / torch_dtype: as for :func:`load_base`; the noise predictor stays float32
                until ``.to(dtype)``.
            use_ema: ``.ckpt`` only: its EMA weights.
            prompt: text of the prompt embedding (SD-Turbo only).

        Raises:
            BackboneWeightsNotFound, FileNotFoundError, WeightFileError, RuntimeError: as the loaders.
        """
        parts = load_base(base, revision, cache_dir, torch_dtype)
        if noise_predictor is None:
            model = tiny_noise_predictor(seed=0)
        elif isinstance(noise_predictor, NoisePredictor):
            model = noise_predictor
        else:
            model = load_noise_predictor(noise_predictor, use_ema=use_ema)[0]
        fixed = isinstance(parts["text_encoder"], FixedPromptEmbedding)
        return cls(
            **parts,
            noise_predictor=model.eval(),
            prompt=None if fixed else prompt,
            base_model=str(base),
            base_revision=revision,
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> InvSRPipeline:
        """diffusers' ``from_pretrained``; a local folder that names its backbone (``base_model`` in its
        ``model_index.json``, as ``invsr-export`` writes) without holding it gets the backbone from there.

        Extra keyword arguments: ``revision``/``cache_dir`` of the backbone hub id are the folder's
        ``base_revision`` and diffusers' ``cache_dir``; ``torch_dtype`` applies to the backbone too.
        """
        folder = Path(pretrained_model_name_or_path).expanduser()
        index_path = folder / "model_index.json"
        if folder.is_dir() and index_path.is_file():
            index = json.loads(index_path.read_text())
            base = index.get("base_model")
            missing = [p for p in _BACKBONE_PARTS if p not in kwargs and not (folder / p).is_dir()]
            if base and any(p != "tokenizer" for p in missing):
                parts = load_base(
                    str(base),
                    index.get("base_revision"),
                    kwargs.get("cache_dir"),
                    kwargs.get("torch_dtype"),
                    recorded=_recorded_backbone_config(folder),
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

    def _prompt_embeds(self, prompt: str | None, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``(1, 77, D)`` prompt embedding in the UNet's dtype, cached per prompt / device / dtype."""
        if isinstance(self.text_encoder, FixedPromptEmbedding):
            if prompt is not None:
                raise ValueError(
                    "this pipeline's backbone has a fixed prompt embedding: prompt cannot be set"
                )
            key: tuple[Any, ...] = ("fixed", id(self.text_encoder), device, dtype)
        else:
            prompt = prompt if prompt is not None else (self.config.prompt or POSITIVE_PROMPT)
            key = (prompt, id(self.text_encoder), device, dtype)
        if self._prompt_cache is None or self._prompt_cache[0] != key:
            if isinstance(self.text_encoder, FixedPromptEmbedding):
                embeds = self.text_encoder()
            else:
                embeds = embed_prompt(self.tokenizer, self.text_encoder, prompt)
            self._prompt_cache = (key, embeds.to(device=device, dtype=dtype))
        return self._prompt_cache[1]

    def backbone(self, prompt: str | None = None) -> FrozenSDTurbo:
        """The components as the ``FrozenSDTurbo`` the sampler runs on (shares the UNet and VAE)."""
        device = self._execution_device
        dtype = self.unet.dtype
        embeds = self._prompt_embeds(prompt, device, dtype)
        return _PipelineBackbone(
            self.unet, self.vae, self.scheduler, embeds, dtype=None, execution_device=device
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
