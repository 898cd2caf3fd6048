"""Inference speed options: the noise predictor in half precision, ``channels_last`` and ``torch.compile``.

All three change modules *in place* and keep their ``state_dict`` keys unchanged (``nn.Module.compile``
compiles the module's call without wrapping it, so no ``_orig_mod.`` prefix appears in checkpoints or
exports). They are meant for inference-only callers (the SR command, the demo, evaluation); training
compiles its own networks. See docs/sampling.md (precision, speed).

Shapes: the compiled graphs are specialised to fixed shapes (``dynamic=False``). The sampler keeps shapes
fixed while chopping: every patch has the chopping size, and when the networks are compiled it pads a short
last batch of patches (see ``InvSRSampler``), so a folder of photos compiles a handful of graphs, not one per
image. Other input sizes (no chopping) compile a new graph each, up to torch's recompile limit, after which
torch runs that shape eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["COMPILE_MODES", "compile_for_inference", "is_compiled", "prepare_for_inference"]

# torch.compile modes; "reduce-overhead" adds CUDA graphs (GPU only), which removes the kernel-launch
# overhead that dominates the 1-step path at batch 1 (docs/sampling.md).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compiled_parts(backbone: nn.Module, noise_predictor: nn.Module | None) -> list[nn.Module]:
    """The pure-tensor bodies that compile as one graph each: NP encoder, denoiser, VAE encoder and decoder.

    The thin outer methods (input checks, the Gaussian, the posterior draw) stay eager; they cost nothing.
    """
    parts = [backbone.denoiser, backbone.vae.encoder, backbone.vae.decoder]
    if noise_predictor is not None:
        parts.insert(0, getattr(noise_predictor, "encoder", noise_predictor))
    return parts


def compile_for_inference(
    backbone: nn.Module, noise_predictor: nn.Module | None, mode: str = "default", backend: str = "inductor"
) -> None:
    """``nn.Module.compile`` the noise predictor, UNet, VAE encoder and VAE decoder in place.

    Each is compiled separately with ``fullgraph=True`` (one graph, no Python fall-backs) and
    ``dynamic=False`` (kernels specialised to the patch shape). Compilation happens lazily at the first call
    for each shape: the first image is slow (seconds on CPU, about a minute for SD-Turbo on a GPU).

    Args:
        backbone: a ``FrozenBackbone``: ``.denoiser`` (UNet or transformer) and ``.vae`` (encoder, decoder).
        noise_predictor: ``NoisePredictor`` (its ``.encoder`` body is compiled) or ``None``.
        mode: one of :data:`COMPILE_MODES`. ``"reduce-overhead"`` captures CUDA graphs (GPU only); do not keep
            a network output across the next call of the same network (the sampler never does).
        backend: torch.compile backend; ``"inductor"`` generates the fast kernels, ``"aot_eager"`` only
            captures the graphs (quick: checks that everything compiles as one graph, no speed-up).

    Raises:
        ValueError: unknown ``mode``. At the first call, torch raises when no C++ compiler is installed (CPU).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    for part in _compiled_parts(backbone, noise_predictor):
        if backend == "inductor":
            part.compile(mode=mode, fullgraph=True, dynamic=False)
        else:  # the other backends take no mode
            part.compile(backend=backend, fullgraph=True, dynamic=False)


def is_compiled(module: object) -> bool:
    """True when ``module`` (an ``nn.Module``) or one of its submodules was compiled in place with
    ``nn.Module.compile``; False for anything else (``None``, stand-ins)."""
    if not isinstance(module, nn.Module):
        return False
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def prepare_for_inference(
    backbone: nn.Module,
    noise_predictor: nn.Module | None,
    half_noise_predictor: bool = True,
    channels_last: bool = False,
    compile: bool = False,
    compile_mode: str = "default",
) -> None:
    """Apply the inference speed options in place (networks frozen in eval mode; weights unchanged in value).

    Args:
        backbone: a ``FrozenBackbone`` in its weight dtype (fp16 on GPUs by default).
        noise_predictor: ``NoisePredictor`` (fp32 weights) or ``None``.
        half_noise_predictor: cast the noise predictor to the backbone's dtype when that is fp16/bf16, so it
            runs in half precision without autocast's per-call weight casts; its output stays within the
            tolerance stated in docs/sampling.md of the fp32 one. No effect with an fp32 backbone.
        channels_last: NHWC weights for the convolutions (faster tensor-core convolutions on GPUs; usually no
            gain on CPU).
        compile: :func:`compile_for_inference` with ``compile_mode`` (last, after the casts).
    """
    half = backbone.dtype in (torch.float16, torch.bfloat16)
    if noise_predictor is not None:
        noise_predictor.eval()
        if half_noise_predictor and half:
            noise_predictor.to(dtype=backbone.dtype)
    if channels_last:
        for module in (backbone.denoiser, backbone.vae, noise_predictor):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if compile:
        compile_for_inference(backbone, noise_predictor, mode=compile_mode)
