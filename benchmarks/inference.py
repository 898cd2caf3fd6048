"""Per-image InvSR inference latency for 1..5 steps, per-stage breakdown (INVSR_REFERENCE §5, §7.6).

Stages: noise predictor, VAE encode, UNet steps, VAE decode, blending (padding, patch split/merge, crop) and
colour fix, from ``InvSRSampler.timings`` (CUDA synchronised around each stage). The end-to-end time is
measured separately with timings off, so the stage probes cost it nothing. ``overhead`` = share of the
end-to-end time spent outside the four networks (target < 10 %); ``e2e/sum`` = end-to-end time / sum of all
measured stages.

    python benchmarks/inference.py                                   # tiny backbone, CPU, 128 -> 512
    python benchmarks/inference.py --real-arch --device cuda         # SD-Turbo architecture, random weights
    python benchmarks/inference.py --size 256 --chopping-size 128    # tiled path (3 x 3 patches)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from invsr_pl.sampling.sampler import STAGES, InvSRSampler  # noqa: E402

NETWORK_STAGES = ("noise_predictor", "vae_encode", "unet", "vae_decode")
TINY_NOISE_PREDICTOR = {
    "block_out_channels": (32, 32),
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "layers_per_block": 1,
}


def build(args: argparse.Namespace, device: torch.device):  # -> (backbone, noise_predictor)
    from invsr_pl.models.noise_predictor import NoisePredictor
    from invsr_pl.models.sd_turbo import FrozenSDTurbo, resolve_dtype

    dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    torch.manual_seed(args.seed)
    if args.real_arch:
        backbone = FrozenSDTurbo.random_sd_turbo(seed=args.seed, dtype=dtype)
        noise_predictor = NoisePredictor()  # paper configuration, fp32 (INVSR_REFERENCE §5.7)
    else:
        from invsr_pl.models.tiny import build_tiny_sd_turbo

        backbone = build_tiny_sd_turbo(seed=args.seed, dtype=dtype)
        noise_predictor = NoisePredictor(**TINY_NOISE_PREDICTOR)
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
    lr = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    arch = "SD-Turbo architecture (random weights)" if args.real_arch else "tiny"
    hr = 4 * args.size
    print(
        f"device: {name} | backbone: {arch} {backbone.dtype} | LR {args.size}x{args.size} -> {hr}x{hr} "
        f"| chopping {chopping} | median of {args.repeats} after {args.warmup} warm-up "
        f"| build {build_s:.1f} s"
    )
    header = ["steps", "e2e ms", "NP", "VAE enc", "UNet", "VAE dec", "blend", "colour", "e2e/sum", "overhead"]
    print("".join(f"{h:>10}" for h in header))
    results = {}
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
    if args.json:
        report = {"device": name, "args": vars(args) | {"json": str(args.json)}, "results": results}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
