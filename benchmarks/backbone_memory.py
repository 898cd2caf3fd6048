"""Parameters and per-GPU training memory of InvSR on each one-step prior (docs/backbones.md).

For SD-Turbo, SDXL-Turbo and SD3.5 Large Turbo the REAL architectures are built on the ``meta`` device (shapes
and dtypes, no memory, no download) from the config dicts in the model modules, wrapped in the project's own
backbone classes; the paper's noise predictor (conf/model/noise_predictor/default.yaml), the latent
discriminator (conf/model/discriminator/default.yaml) and the latent LPIPS are built with the backbone's
latent channels and prompt width, as the configs do. Printed, per backbone:

- exact parameter counts (denoiser, VAE, NP, D, latent LPIPS; the text encoders separately: they are loaded
  once at start-up to embed the prompt and released, so they count towards a load-time peak only);
- static memory: frozen weights x their dtype (fp16 / bf16; SDXL's VAE fp32), trainable NP + D weights fp32
  + gradients fp32 + Adam(W) states (two fp32 moments) = 16 bytes per trainable parameter;
- activations: the bytes of the tensors saved for backward by one G step (NP -> start state -> denoiser ->
  x0_hat, then L2 + latent LPIPS + D logits, docs/training.md) and by one D step (D on real + fake), at the
  per-device micro-batch, with gradient checkpointing on and off. Measured with
  ``torch.autograd.graph.saved_tensors_hooks``: the sum of ``nbytes`` over unique storages that are not
  weights; with checkpointing the blocks' kept inputs are added (a non-reentrant checkpoint keeps its inputs
  outside the hooks). Meta tensors carry exact shapes and dtypes, so this is bookkeeping, not a guess.

Left out (state it with the figures): allocator fragmentation and the CUDA context (~0.5-1 GB), cuDNN/cuBLAS
workspaces, the transient peak inside backward (recomputed blocks and their gradients, one block at a time
with checkpointing), the VAE encode of the batch under no_grad (transient, before the NP runs) and the
DDP gradient buckets (one more copy of the trainable gradients). Attention is counted as the fused kernels a
GPU runs it with (q, k, v, output, logsumexp), not the N x N matrix of the math fallback.

Precision: the frozen prior always runs in its weight dtype. ``--trainable-dtype fp32`` (default) counts the
NP / D / LPIPS activations in fp32 (``trainer.precision=32-true``, the upper bound); ``bf16`` counts them in
bf16, a lower bound for ``bf16-mixed`` (autocast keeps norms and softmax in fp32).

    python benchmarks/backbone_memory.py                      # all three, micro-batches 16 / 8 / 4
    python benchmarks/backbone_memory.py --backbone sd35_turbo --micro-batch 2 --trainable-dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from diffusers.utils import logging as diffusers_logging  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from invsr_pl.losses.adversarial import clamp_fake, generator_adv_loss, hinge_d_loss  # noqa: E402
from invsr_pl.losses.perceptual import LatentLPIPS  # noqa: E402
from invsr_pl.models.backbone import FrozenBackbone  # noqa: E402
from invsr_pl.models.discriminator import LatentDiscriminator  # noqa: E402
from invsr_pl.models.noise_predictor import NoisePredictor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3
GPUS_GB = (
    24,
    40,
    48,
    80,
    141,
)  # marketed sizes (GB = 1e9 bytes): RTX 4090/A5000, A100-40, L40S/A6000, A100/H100, H200
LOSS_WEIGHTS = dict(l2=1.0, lpips=2.0, gan=0.1)  # the paper recipe (docs/training.md)
GT_PX, SCALE = 512, 4  # GT crop 512 px -> latent 64 x 64; LR 128 px (the paper's x4 recipe)

# Text encoders, written out as transformers configs (the released ones' geometry): only their parameter
# counts are used here (they run once at load, docs/backbones.md).
CLIP_L = dict(  # OpenAI CLIP ViT-L/14 text tower (SDXL's and SD3's first encoder)
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)  # fmt: skip
OPENCLIP_H = dict(  # OpenCLIP ViT-H/14 text tower as SD 2.x ships it (23 of 24 layers: penultimate output)
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
)  # fmt: skip
OPENCLIP_BIGG = dict(  # OpenCLIP ViT-bigG/14 text tower (SDXL's and SD3's second encoder)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)  # fmt: skip
T5_XXL = dict(  # T5 v1.1 XXL encoder (SD3's third encoder)
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
)  # fmt: skip


@dataclass
class Prior:
    """One backbone: how to build it on meta and what it trains with."""

    name: str
    build: Callable[[], FrozenBackbone]
    text_encoders: dict[str, Callable[[], nn.Module]]
    micro_batch: int
    dtype_note: str


def _clip(cfg: dict, projection: bool) -> nn.Module:
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**cfg))


def _build_sd_turbo() -> FrozenBackbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from invsr_pl.models.sd_turbo import SD_TURBO_UNET_CONFIG, SD_TURBO_VAE_CONFIG, FrozenSDTurbo
    from invsr_pl.models.timesteps import build_scheduler

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_TURBO_UNET_CONFIG)
        vae = AutoencoderKL(**SD_TURBO_VAE_CONFIG)
        prompt = torch.empty(1, 77, unet.config.cross_attention_dim)
    return FrozenSDTurbo(unet, vae, build_scheduler(), prompt, dtype=torch.float16)


def _build_sdxl_turbo() -> FrozenBackbone:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from invsr_pl.models.sdxl_turbo import SDXL_TURBO_UNET_CONFIG, SDXL_TURBO_VAE_CONFIG, FrozenSDXLTurbo
    from invsr_pl.models.timesteps import build_scheduler

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_TURBO_UNET_CONFIG)
        vae = AutoencoderKL(**SDXL_TURBO_VAE_CONFIG)
        prompt = torch.empty(1, 77, unet.config.cross_attention_dim)
        pooled = torch.empty(1, OPENCLIP_BIGG["projection_dim"])
    return FrozenSDXLTurbo(unet, vae, build_scheduler(), prompt, pooled, dtype=torch.float16)


def _build_sd35_turbo() -> FrozenBackbone:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from invsr_pl.models.sd35_turbo import (
        SD35_LARGE_TRANSFORMER_CONFIG,
        SD35_SCHEDULER_CONFIG,
        SD35_VAE_CONFIG,
        T5_TOKENS,
        FrozenSD35Turbo,
    )

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD35_LARGE_TRANSFORMER_CONFIG)
        vae = AutoencoderKL(**SD35_VAE_CONFIG)
        prompt = torch.empty(1, 77 + T5_TOKENS, transformer.config.joint_attention_dim)
        pooled = torch.empty(1, transformer.config.pooled_projection_dim)
    scheduler = FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER_CONFIG)
    return FrozenSD35Turbo(transformer, vae, scheduler, prompt, pooled, dtype=torch.bfloat16)


PRIORS = {
    "sd_turbo": Prior(
        "SD-Turbo",
        _build_sd_turbo,
        {"OpenCLIP ViT-H": lambda: _clip(OPENCLIP_H, projection=False)},
        micro_batch=16,
        dtype_note="fp16",
    ),
    "sdxl_turbo": Prior(
        "SDXL-Turbo",
        _build_sdxl_turbo,
        {
            "CLIP ViT-L/14": lambda: _clip(CLIP_L, projection=False),
            "OpenCLIP bigG": lambda: _clip(OPENCLIP_BIGG, projection=True),
        },
        micro_batch=8,
        dtype_note="fp16 (VAE fp32)",
    ),
    "sd35_turbo": Prior(
        "SD3.5 Large Turbo",
        _build_sd35_turbo,
        {
            "CLIP ViT-L/14": lambda: _clip(CLIP_L, projection=True),
            "OpenCLIP bigG": lambda: _clip(OPENCLIP_BIGG, projection=True),
            "T5-XXL encoder": lambda: T5EncoderModel(T5Config(**T5_XXL)),
        },
        micro_batch=4,
        dtype_note="bf16",
    ),
}


def _yaml_kwargs(path: str, **overrides: Any) -> dict[str, Any]:
    """Constructor kwargs of a model config: the yaml minus ``_target_`` and its backbone-derived keys, which
    ``overrides`` sets (what ``oc.select:model.backbone.*`` resolves to for that backbone)."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / path), resolve=False)
    cfg.pop("_target_")
    cfg.update(overrides)
    return cfg


def build_trainables(backbone: FrozenBackbone) -> tuple[NoisePredictor, LatentDiscriminator, LatentLPIPS]:
    """The paper's NP, D and latent LPIPS for ``backbone``'s geometry, on meta, fp32."""
    c = backbone.latent_channels
    with torch.device("meta"):
        np_kwargs = _yaml_kwargs(
            "conf/model/noise_predictor/default.yaml", latent_channels=c, scale=SCALE, vae_scale_factor=8
        )
        noise_predictor = NoisePredictor(**np_kwargs)
        d_kwargs = _yaml_kwargs(
            "conf/model/discriminator/default.yaml",
            in_channels=c,
            cross_attention_dim=backbone.cross_attention_dim,
        )
        discriminator = LatentDiscriminator(**d_kwargs)
        lpips = LatentLPIPS(weights_path=None, random_init=True, in_channels=c)  # the trained file's shapes
    return noise_predictor, discriminator, lpips


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def n_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


# ---------------------------------------------------------------- saved-tensor bookkeeping


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata  # the StorageImpl's address: unique per storage, also on meta


class SavedBytes:
    """Unique storages saved for backward (or kept by a checkpoint), minus the weights' storages."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.storages: dict[int, int] = {}

    def add(self, t: Tensor) -> None:
        key = _storage_key(t)
        if key not in self.exclude:
            self.storages[key] = t.untyped_storage().nbytes()

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def pack(self, t: Tensor) -> Tensor:
        self.add(t)
        return t

    def checkpoint_func(self, module: nn.Module, *args: Any) -> Any:
        """diffusers' checkpointing (non-reentrant) that records the inputs it keeps for the recomputation."""
        for a in args:
            if isinstance(a, Tensor):
                self.add(a)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_: Any):
    """Attention as a fused kernel saves it (q, k, v, out, logsumexp): on meta, F.scaled_dot_product_attention
    falls back to the math path, which saves the N x N weights a GPU never keeps (docs/backbones.md)."""
    if attn_mask is not None:
        return _ORIGINAL_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, scale=scale
    )[0]


_ORIGINAL_SDPA = F.scaled_dot_product_attention


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _ORIGINAL_SDPA


def meta_sigma(backbone: FrozenBackbone) -> None:
    """The sigma table lookup reads index values, which meta tensors do not have; use a float32 meta tensor of
    the lookup's shape instead (values never change a shape, so the bookkeeping is unaffected)."""
    backbone.sigma = lambda index: torch.empty(torch.as_tensor(index).shape, device="meta")


def measure_steps(
    backbone: FrozenBackbone,
    noise_predictor: NoisePredictor,
    discriminator: LatentDiscriminator,
    lpips: LatentLPIPS,
    batch: int,
    trainable_dtype: torch.dtype,
    checkpointing: bool,
) -> dict[str, int]:
    """Bytes saved for backward by one G step and one D step at micro-batch ``batch`` (on meta)."""
    for m in (noise_predictor, discriminator, lpips):
        m.to(trainable_dtype)
    # after the cast: a storage address is unique only while it lives (the weights live through the step)
    exclude = {
        _storage_key(t)
        for m in (backbone, noise_predictor, discriminator, lpips)
        for t in [*m.parameters(), *m.buffers()]
        if t.device.type == "meta"
    }
    lq = torch.empty(batch, 3, GT_PX // SCALE, GT_PX // SCALE, device="meta", dtype=trainable_dtype)
    gt = torch.empty(batch, 3, GT_PX, GT_PX, device="meta")
    index = torch.full((batch,), 199, dtype=torch.long, device="meta")
    prompt = backbone.prompt_embeds.expand(batch, -1, -1).to(trainable_dtype)
    out: dict[str, int] = {}

    g = SavedBytes(exclude)
    if checkpointing:
        backbone.denoiser.enable_gradient_checkpointing(g.checkpoint_func)
        discriminator.enable_gradient_checkpointing(g.checkpoint_func)
    else:
        backbone.denoiser.disable_gradient_checkpointing()
        discriminator.disable_gradient_checkpointing()
    with fused_attention():
        with torch.no_grad():  # the training step encodes both images without gradients
            lq_up = F.interpolate(lq.float(), size=gt.shape[-2:], mode="bicubic", align_corners=False)
            z_lq = backbone.encode(lq_up)
            z_gt = backbone.encode(gt)
        with torch.autograd.graph.saved_tensors_hooks(g.pack, lambda t: t):
            noise = noise_predictor(lq, index).sample()
            out["g_noise_predictor"] = g.total
            x0, _ = backbone.invert_step(z_lq, noise, index)
            out["g_denoiser"] = g.total - out["g_noise_predictor"]
            l2 = (x0 - z_gt).pow(2).mean(dim=(1, 2, 3))
            perceptual = lpips(x0.to(trainable_dtype), z_gt.to(trainable_dtype)).float().view(-1)
            logits = discriminator(clamp_fake(x0).to(trainable_dtype), index, prompt)
            gan = generator_adv_loss(logits).float()
            loss = LOSS_WEIGHTS["l2"] * l2 + LOSS_WEIGHTS["lpips"] * perceptual + LOSS_WEIGHTS["gan"] * gan
        out["g_step"] = g.total
        out["g_losses"] = g.total - out["g_noise_predictor"] - out["g_denoiser"]  # L2, LPIPS, D

        d = SavedBytes(exclude)
        if checkpointing:
            discriminator.enable_gradient_checkpointing(d.checkpoint_func)
        fake = clamp_fake(x0.detach())
        with torch.autograd.graph.saved_tensors_hooks(d.pack, lambda t: t):
            both = torch.cat([z_gt, fake]).to(trainable_dtype)
            logits = discriminator(both, index.repeat(2), prompt.repeat(2, 1, 1))
            d_loss = hinge_d_loss(*zip(*(head.chunk(2) for head in logits), strict=True))
        out["d_step"] = d.total
    assert loss.shape == (batch,) and d_loss.shape == (batch,)
    for m in (noise_predictor, discriminator, lpips):
        m.to(torch.float32)
    return out


def text_encoder_params(prior: Prior) -> dict[str, tuple[int, int]]:
    """{name: (parameters, bytes in the prior's dtype)} of the text encoders, built on meta."""
    dtype = torch.bfloat16 if prior.dtype_note == "bf16" else torch.float16
    result = {}
    for name, build in prior.text_encoders.items():
        with torch.device("meta"):
            encoder = build()
        n = n_params(encoder)
        result[name] = (n, n * torch.empty(0, dtype=dtype).element_size())
    return result


HEADROOM = 0.9  # of a GPU's memory usable for the counted bytes: the rest for context, allocator, workspaces


def fits(total_bytes: int) -> str:
    """GPU sizes whose HEADROOM fraction holds ``total_bytes``."""
    ok = [f"{gb}" for gb in GPUS_GB if total_bytes <= HEADROOM * gb * 1e9]
    return "/".join(ok) + " GB" if ok else "none of " + "/".join(map(str, GPUS_GB)) + " GB"


def gib(b: float) -> str:
    return f"{b / GiB:.1f}"


def report(key: str, micro_batch: int | None, trainable_dtype: torch.dtype) -> dict[str, Any]:
    prior = PRIORS[key]
    batch = micro_batch or prior.micro_batch
    backbone = prior.build()
    meta_sigma(backbone)
    noise_predictor, discriminator, lpips = build_trainables(backbone)
    counts = {
        backbone.denoiser_name: n_params(backbone.denoiser),
        "vae": n_params(backbone.vae),
        "noise_predictor": n_params(noise_predictor),
        "discriminator": n_params(discriminator),
        "latent_lpips": n_params(lpips),
    }
    frozen = n_bytes(backbone.denoiser) + n_bytes(backbone.vae) + n_bytes(lpips)
    trainable = counts["noise_predictor"] + counts["discriminator"]
    static = frozen + 16 * trainable  # fp32 weights + fp32 grads + two fp32 Adam moments
    acts = {
        ckpt: measure_steps(backbone, noise_predictor, discriminator, lpips, batch, trainable_dtype, ckpt)
        for ckpt in (True, False)
    }
    texts = text_encoder_params(prior)

    print(
        f"\n== {prior.name}: latent {backbone.latent_channels} ch, "
        f"prompt width {backbone.cross_attention_dim}, "
        f"frozen weights {prior.dtype_note}, micro-batch {batch}, GT {GT_PX} px / LR {GT_PX // SCALE} px"
    )
    for name, n in counts.items():
        print(f"  {name:<16} {n:>15,d} parameters")
    for name, (n, b) in texts.items():
        print(f"  {name:<16} {n:>15,d} parameters  (load time only: {gib(b)} GiB while embedding)")
    print(f"  frozen weights        {gib(frozen):>6} GiB (denoiser + VAE + latent LPIPS)")
    print(f"  trainable NP + D      {gib(16 * trainable):>6} GiB (fp32 weights + grads + Adam moments)")
    for ckpt in (True, False):
        a = acts[ckpt]
        peak = static + max(a["g_step"], a["d_step"])
        print(f"  checkpointing {'on ' if ckpt else 'off'}: G step {gib(a['g_step']):>6} GiB (NP "
              f"{gib(a['g_noise_predictor'])}, {backbone.denoiser_name} {gib(a['g_denoiser'])}, LPIPS + D "
              f"{gib(a['g_losses'])}), D step {gib(a['d_step']):>5} GiB saved -> static + max = "
              f"{gib(peak):>5} GiB; fits {fits(peak)}")  # fmt: skip
    # from_pretrained embeds the prompt after loading the prior, one text encoder at a time (then released)
    text_peak = frozen + max(b for _, b in texts.values())
    print(f"  load-time peak (prior + its largest text encoder, weight dtype): {gib(text_peak)} GiB")
    return dict(name=prior.name, batch=batch, counts=counts, static=static, acts=acts, text=texts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", choices=sorted(PRIORS), action="append", help="default: all three")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: 16 / 8 / 4 per prior")
    parser.add_argument("--trainable-dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args(argv)
    diffusers_logging.set_verbosity_error()  # the meta casts trigger a dtype notice per module
    trainable_dtype = torch.float32 if args.trainable_dtype == "fp32" else torch.bfloat16
    print(
        f"NP / D / LPIPS activations in {args.trainable_dtype}; GiB = 2^30 bytes, GPU sizes in GB = 1e9 bytes"
    )
    rows = [report(key, args.micro_batch, trainable_dtype) for key in args.backbone or list(PRIORS)]
    print("\n| backbone | micro-batch | static (GiB) | + activations, ckpt on (GiB) | ckpt off (GiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        on, off = (r["static"] + max(r["acts"][c]["g_step"], r["acts"][c]["d_step"]) for c in (True, False))
        print(f"| {r['name']} | {r['batch']} | {gib(r['static'])} | {gib(on)} ({fits(on)}) | "
              f"{gib(off)} ({fits(off)}) |")  # fmt: skip


if __name__ == "__main__":
    main()
