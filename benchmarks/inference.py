"""Per-image InvSR inference latency for 1..5 steps, per-stage breakdown (docs/sampling.md).

Stages: noise predictor, VAE encode, UNet steps, VAE decode, blending (padding, patch split/merge, crop) and
colour fix, from ``InvSRSampler.timings`` (CUDA synchronised around each stage). The end-to-end time is
measured separately with timings off, so the stage probes cost it nothing. ``overhead`` = share of the
end-to-end time spent outside the four networks (target < 10 %); ``e2e/sum`` = end-to-end time / sum of all
measured stages.

    python benchmarks/inference.py                                   # tiny backbone, CPU, 128 -> 512
    python benchmarks/inference.py --real-arch --device cuda         # SD-Turbo architecture, random weights
    python benchmarks/inference.py --size 256 --chopping-size 128    # tiled path (3 x 3 patches)
    python benchmarks/inference.py --compile --half-np --steps 1     # eager vs compiled, side by side

With ``--compile`` (and/or ``--half-np``) a second table compares the paths in one run, each on the same
weights and inputs: ``eager`` (today's path: fp32 noise predictor under autocast), ``eager+halfNP`` (noise
predictor cast to the backbone's half dtype) and ``compiled`` (``invsr_pl.utils.compile``, after the casts):
latency mean and p95 per call, images/s, peak memory (CUDA: allocated; CPU: the process's peak RSS, a
high-water mark over the whole run) and the compile (first-call) time.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from invsr_pl.sampling.sampler import STAGES, InvSRSampler  # noqa: E402
from invsr_pl.utils.compile import COMPILE_MODES, compile_for_inference, prepare_for_inference  # noqa: E402

NETWORK_STAGES = ("noise_predictor", "vae_encode", "unet", "vae_decode")


def build(args: argparse.Namespace, device: torch.device):  # -> (backbone, noise_predictor)
    from invsr_pl.models.noise_predictor import NoisePredictor
    from invsr_pl.models.sd_turbo import FrozenSDTurbo, resolve_dtype

    dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    torch.manual_seed(args.seed)
    if args.real_arch:
        backbone = FrozenSDTurbo.random_sd_turbo(seed=args.seed, dtype=dtype)
        noise_predictor = NoisePredictor()  # paper configuration, fp32 (docs/sampling.md)
    else:
        from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_noise_predictor

        backbone = build_tiny_sd_turbo(seed=args.seed, dtype=dtype)
        noise_predictor = tiny_noise_predictor(seed=args.seed)
    return backbone.to(device), noise_predictor.to(device).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    sampler: InvSRSampler, lr: torch.Tensor, steps: int, args: argparse.Namespace
) -> dict[str, float]:
    device = lr.device
    for _ in range(args.warmup):
        sampler(lr, num_steps=steps, generator=args.seed)
    sync(device)
    e2e: list[float] = []
    stage_runs: list[dict[str, float]] = []
    for _ in range(args.repeats):  # interleaved, so that load drift hits both measurements alike
        sampler.timings = None
        start = time.perf_counter()
        sampler(lr, num_steps=steps, generator=args.seed)
        sync(device)
        e2e.append(time.perf_counter() - start)
        sampler.timings = {}
        sampler(lr, num_steps=steps, generator=args.seed)
        stage_runs.append(sampler.timings)
    sampler.timings = None
    result = {"e2e": statistics.median(e2e)}
    for stage in STAGES:
        result[stage] = statistics.median(run.get(stage, 0.0) for run in stage_runs)
    networks = sum(result[s] for s in NETWORK_STAGES)
    result["networks"] = networks
    result["overhead"] = max(result["e2e"] - networks, 0.0) / result["e2e"]
    result["e2e_over_sum"] = result["e2e"] / sum(result[s] for s in STAGES)
    return result


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def latency(
    sampler: InvSRSampler, lr: torch.Tensor, steps: int, args: argparse.Namespace
) -> dict[str, float]:
    """End-to-end seconds per call (timings off): mean, p95, images/s, first-call (compile) time, peak."""
    device = lr.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    sampler(lr, num_steps=steps, generator=args.seed)  # the first call compiles, when compiled
    sync(device)
    first = time.perf_counter() - start
    for _ in range(max(args.warmup - 1, 0)):
        sampler(lr, num_steps=steps, generator=args.seed)
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        sampler(lr, num_steps=steps, generator=args.seed)
        sync(device)
        runs.append(time.perf_counter() - start)
    runs.sort()
    mean = statistics.fmean(runs)
    p95 = runs[min(len(runs) - 1, round(0.95 * (len(runs) - 1)))]
    return {"mean": mean, "p95": p95, "images_per_s": lr.shape[0] / mean, "first": first,
            "peak_gib": peak_memory_gib(device)}  # fmt: skip


def noise_predictor_half_error(backbone, noise_predictor, lr: torch.Tensor, chopping: int) -> float | None:
    """Max |mean difference| of the noise predictor in the backbone's half dtype vs fp32 on one patch."""
    if backbone.dtype not in (torch.float16, torch.bfloat16):
        return None
    x = lr[..., :chopping, :chopping].float()
    x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
    with torch.no_grad():
        ref = noise_predictor(x, 199).mean
        half = copy.deepcopy(noise_predictor).to(backbone.dtype)(x, 199).mean  # the original stays fp32
    return float((half - ref).abs().max())


def compare_paths(sampler: InvSRSampler, lr: torch.Tensor, args: argparse.Namespace) -> dict:
    """eager / eager+halfNP / compiled side by side (the modules are changed in place, in that order)."""
    backbone, noise_predictor = sampler.backbone, sampler.noise_predictor
    variants = [("eager", None)]
    if args.half_np:
        variants.append(("eager+halfNP", "half"))
    if args.compile:
        variants.append(("compiled" + ("+halfNP" if args.half_np else ""), "compile"))
    out: dict = {"paths": {}}
    if args.half_np:
        out["np_half_max_abs_error"] = noise_predictor_half_error(
            backbone, noise_predictor, lr, sampler.chopping_size
        )
    for name, change in variants:
        if change == "half":
            prepare_for_inference(backbone, noise_predictor, half_noise_predictor=True,
                                  channels_last=args.channels_last)  # fmt: skip
        elif change == "compile":
            if not args.half_np:
                prepare_for_inference(backbone, noise_predictor, half_noise_predictor=False,
                                      channels_last=args.channels_last)  # fmt: skip
            compile_for_inference(backbone, noise_predictor, mode=args.compile_mode)
            sampler.pad_batches = True  # as a sampler built after compiling would
        out["paths"][name] = {steps: latency(sampler, lr, steps, args) for steps in args.steps}
    return out


def print_comparison(comparison: dict, args: argparse.Namespace) -> None:
    header = ["path", "steps", "mean ms", "p95 ms", "images/s", "peak GiB", "1st call s", "speed-up"]
    widths = [16, 6, 10, 10, 10, 10, 11, 9]
    print("".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
    base = comparison["paths"]["eager"]
    for name, per_steps in comparison["paths"].items():
        for steps, r in per_steps.items():
            cells = [name, str(steps), f"{1000 * r['mean']:.1f}", f"{1000 * r['p95']:.1f}",
                     f"{r['images_per_s']:.2f}", f"{r['peak_gib']:.2f}", f"{r['first']:.1f}",
                     f"{base[steps]['mean'] / r['mean']:.2f}x"]  # fmt: skip
            print("".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)), flush=True)
    if comparison.get("np_half_max_abs_error") is not None:
        print(f"noise predictor in half vs fp32: max |mean diff| = {comparison['np_half_max_abs_error']:.2e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--real-arch", action="store_true", help="SD-Turbo UNet/VAE + paper NP with random weights"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument(
        "--dtype", default="auto", help="backbone weights: auto (fp16 on CUDA), float32, float16, bfloat16"
    )
    p.add_argument("--size", type=int, default=128, help="LR size (square); SR is 4x")
    p.add_argument(
        "--chopping-size", type=int, default=None, help="LR patch size (default: --size, one patch)"
    )
    p.add_argument("--chopping-batch", type=int, default=8)
    p.add_argument("--color-fix", default="none")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1, help="images per sampler call")
    p.add_argument("--compile", action="store_true", help="also run the compiled path, side by side")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    p.add_argument("--half-np", action="store_true", help="also run the NP in the backbone's half dtype")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights for the compared paths")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage table")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    t0 = time.perf_counter()
    backbone, noise_predictor = build(args, device)
    build_s = time.perf_counter() - t0
    chopping = args.chopping_size or args.size
    sampler = InvSRSampler(
        backbone,
        noise_predictor,
        chopping_size=chopping,
        chopping_batch=args.chopping_batch,
        color_fix=args.color_fix,
    )
    g = torch.Generator().manual_seed(args.seed)
    lr = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    arch = "SD-Turbo architecture (random weights)" if args.real_arch else "tiny"
    hr = 4 * args.size
    print(
        f"device: {name} | backbone: {arch} {backbone.dtype} | batch {args.batch} "
        f"| LR {args.size}x{args.size} -> {hr}x{hr} "
        f"| chopping {chopping} | median of {args.repeats} after {args.warmup} warm-up "
        f"| build {build_s:.1f} s"
    )
    results = {}
    if not args.no_stages:
        header = [
            "steps",
            "e2e ms",
            "NP",
            "VAE enc",
            "UNet",
            "VAE dec",
            "blend",
            "colour",
            "e2e/sum",
            "overhead",
        ]
        print("".join(f"{h:>10}" for h in header))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for steps in args.steps:
            r = measure(sampler, lr, steps, args)
            results[steps] = r
            ms = [r["e2e"], *(r[s] for s in STAGES)]
            cells = [f"{steps:>10d}", *(f"{1000 * v:>10.1f}" for v in ms), f"{r['e2e_over_sum']:>10.3f}"]
            print("".join(cells) + f"{100 * r['overhead']:>9.1f}%", flush=True)
        if device.type == "cuda":
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    comparison = None
    if args.compile or args.half_np:
        print(f"\npaths side by side (mean/p95 of {args.repeats} calls of {args.batch} image(s) after "
              f"{args.warmup} warm-up, compile mode {args.compile_mode!r}):")  # fmt: skip
        comparison = compare_paths(sampler, lr, args)
        print_comparison(comparison, args)
    if args.json:
        report = {"device": name, "args": vars(args) | {"json": str(args.json)}, "results": results,
                  "comparison": comparison}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
