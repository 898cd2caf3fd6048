"""Seconds per InvSR training iteration (G + D step): InvSRLitModule under a Trainer vs a bare PyTorch loop,
or (``--compile``) the module eager vs the module with ``model.compile`` (NP, UNet and D compiled in place).

All paths run the same work on the same models, batch and optimisers (docs/training.md, adversarial term on:
``dis_warmup_steps=0``); the ratio module / bare is the framework overhead (target <= 1.10). Time per
iteration = wall time from the start of the first timed iteration to the end of the last, over their number
(so the Trainer's between-batch work counts); p95 over the timed iterations' own durations. Peak memory: CUDA
``max_memory_allocated``, else sampled RSS (the process's, so later paths include earlier ones).

    python benchmarks/train_step.py --threads 1                 # tiny models, CPU, LQ 16 -> GT 64
    python benchmarks/train_step.py --device cuda --real-arch --precision 16-mixed   # paper size, LQ 128
    python benchmarks/train_step.py --device cuda --real-arch --precision bf16-mixed --batch-size 16 --compile
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

WEIGHTS = dict(l2=1.0, lpips=2.0, gan=0.1)  # the paper recipe's loss weights (docs/training.md)
TIMESTEPS = (250, 200, 150, 100)  # starting timesteps drawn per sample (docs/training.md)


def build_parts(args: argparse.Namespace, device: torch.device) -> dict:
    """backbone, noise_predictor, discriminator, lpips (all on ``device``), built from a fixed seed."""
    from invsr_pl.losses.perceptual import LatentLPIPS
    from invsr_pl.models.discriminator import LatentDiscriminator
    from invsr_pl.models.noise_predictor import NoisePredictor
    from invsr_pl.models.sd_turbo import FrozenSDTurbo, resolve_dtype

    dtype = str(resolve_dtype(args.backbone_dtype, device)).removeprefix("torch.")
    torch.manual_seed(args.seed)
    if args.real_arch:
        backbone = FrozenSDTurbo.random_sd_turbo(seed=args.seed, dtype=dtype)
        noise_predictor, discriminator = NoisePredictor(), LatentDiscriminator()
    else:
        from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_discriminator, tiny_noise_predictor

        backbone = build_tiny_sd_turbo(seed=args.seed, dtype=dtype)
        noise_predictor, discriminator = tiny_noise_predictor(), tiny_discriminator()
    if args.grad_ckpt:
        backbone.enable_gradient_checkpointing()
    parts = dict(backbone=backbone, noise_predictor=noise_predictor, discriminator=discriminator)
    parts["lpips"] = LatentLPIPS(random_init=True)
    return {k: v.to(device) for k, v in parts.items()}


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    gt_size = args.gt_size or (512 if args.real_arch else 64)
    g = torch.Generator().manual_seed(args.seed)
    gt = torch.rand(args.batch_size, 3, gt_size, gt_size, generator=g)
    lq = F.interpolate(gt, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
    return {"lq": lq, "gt": gt}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    """Current resident set size (psutil), or the process peak from getrusage where psutil is missing."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Meter:
    """Iteration start/stop times and peak memory; the first ``warmup`` iterations are not timed."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup, self.starts, self.stops, self.peak_rss = device, warmup, [], [], 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def start(self) -> None:
        sync(self.device)
        self.starts.append(time.perf_counter())

    def stop(self) -> None:
        sync(self.device)
        self.stops.append(time.perf_counter())
        if self.device.type != "cuda":
            self.peak_rss = max(self.peak_rss, _rss_bytes())

    def summary(self) -> tuple[float, float, float]:
        """(seconds per timed iteration, p95 of the timed iterations' durations, peak memory in GiB)."""
        first = min(self.warmup, len(self.starts) - 1)
        per_iter = (self.stops[-1] - self.starts[first]) / (len(self.stops) - first)
        timed = zip(self.starts[first:], self.stops[first:], strict=True)
        durations = torch.tensor([b - a for a, b in timed])
        p95 = float(torch.quantile(durations.double(), 0.95))
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else self.peak_rss
        return per_iter, p95, peak / 2**30


def run_module(
    parts: dict, batch: dict, args: argparse.Namespace, device: torch.device, compile: bool = False
) -> Meter:
    import lightning as L

    from invsr_pl.systems.invsr import InvSRLitModule

    meter = Meter(device, args.warmup)

    class Timer(L.Callback):
        def on_train_batch_start(self, *_args) -> None:
            meter.start()

        def on_train_batch_end(self, *_args) -> None:
            meter.stop()

    module = InvSRLitModule(
        **parts,
        optimizer_g=partial(torch.optim.AdamW, lr=5e-5, weight_decay=0.0),
        optimizer_d=partial(torch.optim.Adam, lr=5e-5, weight_decay=1e-3),
        dis_warmup_steps=0,
        lr_warmup_steps=0,
        gradient_checkpointing=args.grad_ckpt,
        val_lpips=False,
        compile={"mode": args.compile_mode} if compile and args.compile_mode else compile,
    )
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=args.precision, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Timer()], num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader([batch] * (args.warmup + args.steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return meter


def run_bare(parts: dict, batch: dict, args: argparse.Namespace, device: torch.device) -> Meter:
    """The same G + D iteration written as a plain PyTorch loop (autocast + one GradScaler for "16-mixed")."""
    from invsr_pl.losses.adversarial import clamp_fake, generator_adv_loss, hinge_d_loss

    backbone, np_, disc, lpips = (
        parts["backbone"],
        parts["noise_predictor"],
        parts["discriminator"],
        parts["lpips"],
    )
    np_.train(), disc.train()
    opt_g = torch.optim.AdamW(np_.parameters(), lr=5e-5, weight_decay=0.0)
    opt_d = torch.optim.Adam(disc.parameters(), lr=5e-5, weight_decay=1e-3)
    amp_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed" and device.type == "cuda")
    indices = torch.tensor(TIMESTEPS, device=device) - 1
    meter = Meter(device, args.warmup)
    for k in range(args.warmup + args.steps):
        meter.start()
        lq, gt = batch["lq"].to(device), batch["gt"].to(device)
        gen = torch.Generator(device=device).manual_seed(k)
        index = indices[torch.randint(len(TIMESTEPS), (lq.shape[0],), generator=gen, device=device)]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            with torch.no_grad():
                z_lq = backbone.encode(F.interpolate(lq, size=gt.shape[-2:], mode="bicubic"), generator=gen)
                z_gt = backbone.encode(gt, generator=gen)
            sigma = backbone.sigma(index).view(-1, 1, 1, 1)
            x0 = backbone.predict_x0(z_lq + sigma * np_(lq, index).sample(generator=gen).float(), index)
            prompt = backbone.prompt_embeds.expand(lq.shape[0], -1, -1).float()
            disc.requires_grad_(False)
            loss = (
                WEIGHTS["l2"] * (x0 - z_gt).pow(2).mean(dim=(1, 2, 3))
                + WEIGHTS["lpips"] * lpips(x0, z_gt).float()
                + WEIGHTS["gan"] * generator_adv_loss(disc(clamp_fake(x0), index, prompt))
            ).mean()
        opt_g.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt_g)
        scaler.update()
        disc.requires_grad_(True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = disc(torch.cat([z_gt, clamp_fake(x0.detach())]), index.repeat(2), prompt.repeat(2, 1, 1))
            real, fake = zip(*(h.chunk(2) for h in logits), strict=True)
            d_loss = hinge_d_loss(list(real), list(fake)).mean()
        opt_d.zero_grad()
        scaler.scale(d_loss).backward()
        scaler.step(opt_d)
        scaler.update()
        if not torch.isfinite(loss + d_loss):  # one sync per iteration, like the module's non-finite guard
            raise RuntimeError("non-finite loss")
        meter.stop()
    return meter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"])
    parser.add_argument("--real-arch", action="store_true", help="paper-size models (random weights), LQ 128")
    parser.add_argument("--gt-size", type=int, default=None, help="GT crop (default 512 real-arch, 64 tiny)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per path and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--rounds", type=int, default=2, help="alternate module/bare this many times")
    parser.add_argument("--backbone-dtype", default="auto", help="auto = fp16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="no UNet checkpointing"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile", action="store_true", help="compare the module eager vs compiled (model.compile)"
    )
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default: its default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = build_parts(args, device)
    batch = make_batch(args)
    paths = {"module": run_module, "bare": run_bare}
    if args.compile:
        paths = {"eager": run_module, "compiled": partial(run_module, compile=True)}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, run in paths.items():
            parts = {k: copy.deepcopy(v) for k, v in base.items()}  # same initial weights for both paths
            results[name].append(run(parts, batch, args, device).summary())
            del parts
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # best round: least disturbed by other processes (its p95 with it)
    best = {k: min(v) for k, v in results.items()}
    per_iter = {k: b[0] for k, b in best.items()}
    peak = {k: max(m for _, _, m in v) for k, v in results.items()}
    gt = batch["gt"].shape[-1]
    size = f"LQ {gt // 4} -> GT {gt}, {'paper' if args.real_arch else 'tiny'} models"
    print(f"device {device} ({torch.get_num_threads()} threads), precision {args.precision}, "
          f"batch {args.batch_size}, {size}, UNet checkpointing {args.grad_ckpt}, "
          f"torch {torch.__version__}")  # fmt: skip
    for name in paths:
        print(f"{name:>8}: mean {per_iter[name]:.4f} s/iter  p95 {best[name][1]:.4f} s  "
              f"{args.batch_size / per_iter[name]:.2f} images/s  "
              f"peak {'CUDA' if device.type == 'cuda' else 'RSS'} {peak[name]:.2f} GiB  "
              f"rounds {[round(t, 4) for t, _, _ in results[name]]}")  # fmt: skip
    if args.compile:
        print(f"  speed-up compiled/eager: {per_iter['eager'] / per_iter['compiled']:.3f}x")
    else:
        print(f"  ratio module/bare: {per_iter['module'] / per_iter['bare']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
