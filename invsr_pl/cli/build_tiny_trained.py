"""``python -m invsr_pl.cli.build_tiny_trained --out FILE``: train the tiny *trained* SD-Turbo twin.

The training recipe of a test asset, kept apart from its loader (:mod:`invsr_pl.models.tiny_trained`).
Same classes and interface as SD-Turbo (``UNet2DConditionModel``, ``AutoencoderKL``, SD-Turbo's
``EulerDiscreteScheduler`` config, a fixed ``(1, 77, 32)`` prompt embedding), trained by :func:`build` from
the built-in sample photos (``datamodules.samples``) in two stages, deterministically from one seed:

1. VAE: started as a linear codec (:func:`_init_vae_as_codec`), then L1 reconstruction on random crops of
   the photos at three scales. Its latent ``scaling_factor`` is then set to 1 / (std of the latents), as
   SD's 0.18215 was chosen, so that the noise levels of the shared sigma table mean what they mean for
   SD-Turbo (sigma(200) = 0.57 against unit-variance latents).
2. UNet: the x0 objective of a one-step denoiser, ``|z_t - sigma * eps_hat - z_0|^2`` with
   ``z_t = z_0 + sigma * eps``, over the InvSR starting timesteps and below (docs/conventions.md), with the
   UNet seeing ``z_t / sqrt(1 + sigma^2)`` exactly as :meth:`FrozenSDTurbo.predict_eps` feeds it.

The weights ship as ``invsr_pl/assets/tiny_sd_turbo.safetensors`` (fp16, with the configs in its metadata)
and are rebuilt with ``python -m invsr_pl.cli.build_tiny_trained --out FILE`` (one CPU thread, ~50 s of CPU
time), bit for bit on the same torch version and CPU kernel family (tests/unit/models/test_tiny_trained.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import Tensor

from datamodules.samples import SAMPLE_PHOTOS, load_sample
from invsr_pl.models.sd_turbo import _PROMPT_TOKENS, SD_TURBO_VAE_CONFIG
from invsr_pl.models.timesteps import lookup_sigma, scale_model_input, sd_turbo_sigmas
from invsr_pl.models.tiny import tiny_unet_config
from invsr_pl.models.tiny_trained import DEFAULT_WEIGHTS

__all__ = [
    "TINY_TRAINED_UNET_CONFIG",
    "TINY_TRAINED_VAE_CONFIG",
    "RECIPE",
    "build",
    "main",
    "save",
]

# The random twin's UNet (two levels, cross-attention width 32: the tiny discriminator's conditioning fits).
TINY_TRAINED_UNET_CONFIG: dict[str, Any] = tiny_unet_config(cross_attention_dim=32)
# SD-Turbo's VAE geometry (factor 8, 4 latent channels) with wider channels than the random twin's (8, 16, 16,
# 16): it reconstructs the validation photos at 19.6-22.8 dB. scaling_factor is measured by build().
TINY_TRAINED_VAE_CONFIG: dict[str, Any] = {
    **SD_TURBO_VAE_CONFIG,
    "block_out_channels": (16, 32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 4,  # >= 3 channels per group: the codec start below needs reference channels
    "sample_size": 64,
}

# The training recipe; recorded in the weight file's metadata.
RECIPE: dict[str, Any] = {
    "seed": 0,
    "photo_scales": [1.0, 0.5, 0.25],  # each photo at full size and downscaled (more texture per crop)
    "vae_steps": 100,  # fine-tunes the codec start; in trials, more steps at a higher lr lost PSNR
    "vae_batch": 8,
    "vae_crop": 32,
    "vae_lr": 2e-4,
    "unet_steps": 200,
    "unet_batch": 16,
    "unet_crop": 64,  # pixels: 8x8 latents, the quick start's training crop
    "unet_lr": 1e-3,
    "max_index": 299,  # diffusion indices 0..299 cover the starting timesteps 100..250 and the later steps
}


# ---------------------------------------------------------------------------------------------- training


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """One CPU thread and a seeded global RNG (for weight initialisation); both restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in a different order change the low bits of every update
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _photo_pool(scales: list[float]) -> list[Tensor]:
    """The sample photos as (3, H, W) float32 [0, 1] at each scale (antialiased bicubic downscaling)."""
    pool = []
    for name in SAMPLE_PHOTOS:
        img = load_sample(name)
        for s in scales:
            if s == 1.0:
                pool.append(img)
                continue
            size = [max(1, round(n * s)) for n in img.shape[-2:]]
            small = F.interpolate(img[None], size=size, mode="bicubic", antialias=True, align_corners=False)
            pool.append(small[0].clamp(0.0, 1.0))
    return pool


def _crops(pool: list[Tensor], batch: int, size: int, gen: torch.Generator) -> Tensor:
    """(batch, 3, size, size) random crops in [-1, 1] with random horizontal flips (the VAE's range)."""
    out = []
    picks = torch.randint(len(pool), (batch,), generator=gen).tolist()
    for i in picks:
        img = pool[i]
        h, w = img.shape[-2:]
        top = int(torch.randint(h - size + 1, (1,), generator=gen))
        left = int(torch.randint(w - size + 1, (1,), generator=gen))
        crop = img[:, top : top + size, left : left + size]
        if bool(torch.rand((), generator=gen) < 0.5):
            crop = crop.flip(-1)
        out.append(crop)
    return torch.stack(out) * 2.0 - 1.0


def _cosine_lr(step: int, total: int, base: float, warmup: int = 25) -> float:
    """Linear warm-up over ``warmup`` steps (Adam's first steps are sign steps: they would wreck the codec
    start), then cosine decay from ``base`` to ``base / 20``."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup))))


_REF = 10.0  # value of the constant reference channel (see _init_vae_as_codec)
_SHIFT = 3.0  # GroupNorm bias before the SiLU: keeps the signal on SiLU's nearly linear part


@torch.no_grad()
def _init_vae_as_codec(vae: AutoencoderKL, pool: list[Tensor], gen: torch.Generator) -> None:
    """Start the VAE as a linear codec (8x8 box-filter encoder, interpolating decoder), then let it learn.

    Trained from random weights, a GroupNorm VAE spends hundreds of steps on colour alone: the GroupNorm
    before each ``conv_out`` removes every group's per-image mean and scale. So the residual branches and the
    attention outputs start at zero (identity blocks, as in zero-init residual training), RGB is carried in
    channels 0-2, and a constant channel (``_REF``) sits next to zero channels in each normalised group, so
    that the normalisation keeps absolute colour (the difference to a zero channel survives it). The two
    ``conv_out`` read-outs are least-squares fits on crops of the photos.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    groups = int(vae.config.norm_num_groups)
    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
            if module.conv_shortcut is not None:
                _route(module.conv_shortcut, range(3), range(3), groups)
        elif isinstance(module, Attention):
            module.to_out[0].weight.zero_()
            module.to_out[0].bias.zero_()
    enc, dec = vae.encoder, vae.decoder
    _route(enc.conv_in, range(3), range(3), groups)
    _route(vae.quant_conv, range(8), range(8))
    _route(vae.post_quant_conv, range(4), range(4))
    _route(dec.conv_in, range(3), range(3), groups)
    tent = torch.tensor([0.25, 0.5, 0.25])
    for sampler in [d for b in enc.down_blocks for d in b.downsamplers or []]:
        sampler.conv.weight.zero_()
        sampler.conv.bias.zero_()
        for c in range(sampler.conv.out_channels):  # 2x2 mean (the stride-2 conv's top-left taps)
            sampler.conv.weight[c, c, :2, :2] = 0.25
    for sampler in [u for b in dec.up_blocks for u in b.upsamplers or []]:
        refs = set(_ref_channels(sampler.conv.out_channels, groups))
        _route(sampler.conv, sorted(refs), sorted(refs))  # references: copied (no zero-padded border)
        for c in set(range(sampler.conv.out_channels)) - refs:  # nearest x2 then a tent: interpolation
            sampler.conv.weight[c, c] = tent[:, None] * tent[None, :]
    # decoder: one GroupNorm group per colour (colour, zeros..., reference)
    last = dec.up_blocks[-1].resnets[0].conv_shortcut
    width = last.out_channels // groups
    _route(last, [width * c for c in range(3)], range(3), groups)
    for norm in (enc.conv_norm_out, dec.conv_norm_out):
        norm.weight.fill_(1.0)
        norm.bias.fill_(_SHIFT)
    # least-squares read-outs: encoder -> 8x8 block means (latent channels 0-2), decoder -> pixels
    x = _crops(pool, 32, 64, gen)
    feats = enc.conv_act(enc.conv_norm_out(_encoder_trunk(enc, x)))  # (B, 64, 8, 8)
    target = F.avg_pool2d(x, 8)  # (B, 3, 8, 8)
    enc.conv_out.weight.zero_()
    enc.conv_out.bias.zero_()
    w, b = _lstsq(feats, target)
    enc.conv_out.weight[:3, :, 1, 1] = w
    enc.conv_out.bias[:3] = b
    enc.conv_out.bias[4:] = -10.0  # log-variance: a nearly deterministic posterior (std 0.007)
    z = vae.encode(x).latent_dist.mean
    feats = dec.conv_act(dec.conv_norm_out(_decoder_trunk(dec, vae.post_quant_conv(z))))
    # the decoder's read-out uses the whole 3x3 kernel: a fitted local filter on top of the interpolation
    patches = F.unfold(feats, 3, padding=1).view(feats.shape[0], -1, *feats.shape[-2:])  # (B, C*9, H, W)
    w, b = _lstsq(patches, x)
    dec.conv_out.weight.copy_(w.view(dec.conv_out.weight.shape))
    dec.conv_out.bias.copy_(b)


def _ref_channels(channels: int, groups: int) -> list[int]:
    """The last channel of every GroupNorm group: where the constant reference lives."""
    width = channels // groups
    return [g * width + width - 1 for g in range(groups)]


def _route(conv: torch.nn.Conv2d, outs, ins, groups: int | None = None) -> None:
    """Make ``conv`` copy input channel ``ins[k]`` to output channel ``outs[k]`` (centre tap), else zero;
    with ``groups``, its bias puts the reference value in the last channel of every group, so that no
    GroupNorm group is all zeros (which would blow tiny weight updates up to unit variance)."""
    conv.weight.zero_()
    conv.bias.zero_()
    k = conv.kernel_size[0] // 2
    for o, i in zip(outs, ins, strict=True):
        conv.weight[o, i, k, k] = 1.0
    if groups is not None:
        conv.bias[_ref_channels(conv.out_channels, groups)] = _REF


def _encoder_trunk(enc, x: Tensor) -> Tensor:
    h = enc.conv_in(x)
    for block in enc.down_blocks:
        h = block(h)
    return enc.mid_block(h)


def _decoder_trunk(dec, z: Tensor) -> Tensor:
    h = dec.mid_block(dec.conv_in(z), None)
    for block in dec.up_blocks:
        h = block(h, None)
    return h


def _lstsq(feats: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares 1x1 read-out: ``target ~ w @ feats + b``; (B, C, H, W) each -> w (T, C), b (T,)."""
    a = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).double()
    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1]).double()
    # ridge-regularised normal equations: constant features make the plain system singular, and neighbouring
    # taps are nearly collinear; without a real ridge the fit cancels weights of +-300 against each other,
    # which breaks in half precision and under the first Adam steps
    ata = a.T @ a
    ridge = 1e-3 * ata.diagonal().mean() * torch.eye(a.shape[1], dtype=a.dtype)
    sol = torch.linalg.solve(ata + ridge, a.T @ y)
    return sol[:-1].T.float(), sol[-1].float()


def _train_vae(vae: AutoencoderKL, pool: list[Tensor], recipe: dict[str, Any], gen: torch.Generator, log):
    opt = torch.optim.Adam(vae.parameters(), lr=recipe["vae_lr"])
    vae.train()
    for step in range(recipe["vae_steps"]):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, recipe["vae_steps"], recipe["vae_lr"])
        x = _crops(pool, recipe["vae_batch"], recipe["vae_crop"], gen)
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(posterior.mean + posterior.std * noise).sample
        # No KL term: under Adam even a tiny KL weight raises the log-variance by ~lr per step (its gradient
        # has a constant sign), and the noisier posterior blurs the decoder; the codec start's std is 0.007.
        loss = (recon - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == recipe["vae_steps"] - 1:
            log(f"vae step {step:4d}  l1 {float(loss.detach()):.4f}")
    vae.eval()


@torch.no_grad()
def _latent_std(vae: AutoencoderKL, pool: list[Tensor], gen: torch.Generator) -> float:
    """Std of posterior samples over 64 random 64-px crops (how SD's scaling factor was measured)."""
    x = _crops(pool, 64, 64, gen)
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
    return float(z.std())


def _train_unet(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    prompt: Tensor,
    pool: list[Tensor],
    recipe: dict[str, Any],
    gen: torch.Generator,
    log,
) -> None:
    sigmas = sd_turbo_sigmas()
    scaling = float(vae.config.scaling_factor)
    opt = torch.optim.Adam(unet.parameters(), lr=recipe["unet_lr"])
    unet.train()
    b = recipe["unet_batch"]
    cond = prompt.expand(b, -1, -1)
    for step in range(recipe["unet_steps"]):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, recipe["unet_steps"], recipe["unet_lr"])
        with torch.no_grad():
            posterior = vae.encode(_crops(pool, b, recipe["unet_crop"], gen)).latent_dist
            z0 = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)) * scaling
        index = torch.randint(recipe["max_index"] + 1, (b,), generator=gen)
        sigma = lookup_sigma(sigmas, index).view(-1, 1, 1, 1)
        z_t = z0 + sigma * torch.randn(z0.shape, generator=gen)  # VE state (docs/conventions.md)
        eps = unet(scale_model_input(z_t, sigma.view(-1)), index, encoder_hidden_states=cond).sample
        loss = (z_t - sigma * eps - z0).pow(2).mean()  # x0 objective: what one InvSR step returns
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == recipe["unet_steps"] - 1:
            log(f"unet step {step:4d}  x0 mse {float(loss.detach()):.4f}")
    unet.eval()


def build(recipe: dict[str, Any] | None = None, log=print) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Train the tiny twin from the sample photos; deterministic for a given recipe (one CPU thread).

    Args:
        recipe: overrides of :data:`RECIPE` (e.g. ``{"seed": 1}``).
        log: progress printer (``print`` by default).

    Returns:
        ``(tensors, metadata)`` as stored by :func:`save`: ``unet.*``, ``vae.*`` float16 weights and
        ``prompt_embeds`` ``(1, 77, 32)``; metadata holds the UNet/VAE configs and the recipe as JSON.
    """
    recipe = {**RECIPE, **(recipe or {})}
    unknown = set(recipe) - set(RECIPE)
    if unknown:
        raise ValueError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(RECIPE)}")
    with _deterministic(int(recipe["seed"])):
        gen = torch.Generator().manual_seed(int(recipe["seed"]))
        unet = UNet2DConditionModel(**TINY_TRAINED_UNET_CONFIG)
        vae = AutoencoderKL(**TINY_TRAINED_VAE_CONFIG)
        prompt = torch.randn(1, _PROMPT_TOKENS, unet.config.cross_attention_dim, generator=gen)
        pool = _photo_pool(list(recipe["photo_scales"]))
        _init_vae_as_codec(vae, pool, gen)
        _train_vae(vae, pool, recipe, gen, log)
        # SD's recipe: scale latents to unit variance (rounded so the config stays readable)
        scaling = float(f"{1.0 / _latent_std(vae, pool, gen):.5g}")
        vae.register_to_config(scaling_factor=scaling)
        log(f"vae scaling_factor {scaling}")
        with torch.no_grad():  # eps_hat = 0 at the start: x0_hat = z_t, the identity the noise predictor
            unet.conv_out.weight.zero_()  # can already learn against
            unet.conv_out.bias.zero_()
        _train_unet(unet, vae, prompt, pool, recipe, gen, log)
    # stored in float16 (3.4 MiB instead of 6.8): the reconstructions and denoised latents are the same to
    # 0.03 dB, and the ridge in _lstsq keeps the read-outs well conditioned enough for half precision
    tensors = {f"unet.{k}": v.detach().half().contiguous() for k, v in unet.state_dict().items()}
    tensors |= {f"vae.{k}": v.detach().half().contiguous() for k, v in vae.state_dict().items()}
    tensors["prompt_embeds"] = prompt.half().contiguous()
    metadata = {
        "unet_config": json.dumps(_plain(TINY_TRAINED_UNET_CONFIG)),
        "vae_config": json.dumps(_plain({**TINY_TRAINED_VAE_CONFIG, "scaling_factor": scaling})),
        "recipe": json.dumps(recipe),
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "diffusers_version": diffusers.__version__,  # its UNet's numerics are part of the recipe too
    }
    return tensors, metadata


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


# ---------------------------------------------------------------------------------------------- files


def save(tensors: dict[str, Tensor], metadata: dict[str, str], path: str | Path) -> Path:
    """Write the weight file atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m invsr_pl.cli.build_tiny_trained --out FILE [--seed N]``: train, write the weight file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_WEIGHTS, help=f"weight file (default {DEFAULT_WEIGHTS})"
    )
    parser.add_argument("--seed", type=int, default=RECIPE["seed"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tensors, metadata = build({"seed": args.seed})
    path = save(tensors, metadata, args.out)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
