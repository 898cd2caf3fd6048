"""The tiny *trained* SD-Turbo twin: loading its shipped weights (``assets/tiny_sd_turbo.safetensors``).

A CPU-sized backbone whose VAE reconstructs photos and whose UNet denoises their latents, so that a CPU run
shows super-resolution (the random twin of :mod:`invsr_pl.models.tiny` only tests wiring). Same classes and
interface as SD-Turbo (``UNet2DConditionModel``, ``AutoencoderKL``, SD-Turbo's ``EulerDiscreteScheduler``
config, a fixed ``(1, 77, 32)`` prompt embedding). The weight file (fp16, the UNet/VAE configs and the
training recipe in its metadata) is the output of a training recipe that lives apart from this loader,
:mod:`invsr_pl.cli.build_tiny_trained` (``python -m invsr_pl.cli.build_tiny_trained --out FILE``: one CPU
thread, ~50 s of CPU time, bit for bit on the same torch version and CPU kernel family).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, safe_open

from invsr_pl.models.sd_turbo import FrozenSDTurbo
from invsr_pl.models.timesteps import build_scheduler

__all__ = ["DEFAULT_WEIGHTS", "load_tiny_trained_sd_turbo", "read_metadata"]

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "tiny_sd_turbo.safetensors"


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_tiny_trained_sd_turbo(
    dtype: str | torch.dtype = "float32", weights_path: str | Path | None = None
) -> FrozenSDTurbo:
    """The tiny trained twin as a frozen, eval-mode ``FrozenSDTurbo`` with SD-Turbo's scheduler.

    Args:
        dtype: weight dtype (see ``sd_turbo.resolve_dtype``); the file holds float16, cast on load.
        weights_path: a file written by :func:`save`; ``None`` = the shipped :data:`DEFAULT_WEIGHTS`.

    Raises:
        FileNotFoundError: the weight file is missing (the message says how to rebuild it).
    """
    path = Path(weights_path) if weights_path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"tiny trained SD-Turbo weights not found at {path}; rebuild them with "
            f"`python -m invsr_pl.cli.build_tiny_trained --out {path}`"
        )
    meta = read_metadata(path)
    tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    unet = UNet2DConditionModel(**json.loads(meta["unet_config"]))
    vae = AutoencoderKL(**json.loads(meta["vae_config"]))
    for name, module in (("unet", unet), ("vae", vae)):
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    return FrozenSDTurbo(unet, vae, build_scheduler(), tensors["prompt_embeds"], dtype=dtype)
