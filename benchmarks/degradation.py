"""Throughput of the Real-ESRGAN degradation: images/s for batches of GT crops, and each op's share of time.

Usage::

    python benchmarks/degradation.py --device cpu --threads 2 --batch 16 --size 512 --iters 10
    python benchmarks/degradation.py --device cuda

Inputs are realistic photos (scikit-image samples, area-resized and cropped), not noise: JPEG and Poisson
costs depend on content.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections import defaultdict

import torch

from datamodules.degradation import ops, pipeline
from datamodules.degradation.pipeline import RealESRGANDegradation

OPS = ("filter2d", "resize", "add_gaussian_noise", "add_poisson_noise", "jpeg", "quantize_8bit")


def _photos(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """(batch, 3, size, size) float32 in [0, 1]: crops of scikit-image sample photos."""
    try:
        import skimage.data as sd
    except ImportError:  # bare GPU box: a smooth synthetic pattern plus grain stands in for photos
        sd = None
    imgs = []
    for k, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        if sd is None:
            yy, xx = torch.meshgrid(torch.linspace(0, 8, 640), torch.linspace(0, 8, 640), indexing="ij")
            a = torch.stack([(torch.sin(xx * yy / 4 + k) + 1) / 2, (torch.cos(xx + k) + 1) / 2, yy / 8])
            a = (a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(k))).clamp(0, 1)
        else:
            a = torch.from_numpy(getattr(sd, name)()).permute(2, 0, 1).float() / 255.0
        short = min(a.shape[-2:])
        a = torch.nn.functional.interpolate(
            a[None], scale_factor=max(1.0, (size + 64) / short), mode="bicubic"
        )
        imgs.append(a[0].clamp(0, 1))
    out = []
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        a = imgs[i % len(imgs)]
        top = int(torch.randint(a.shape[-2] - size + 1, (1,), generator=g))
        left = int(torch.randint(a.shape[-1] - size + 1, (1,), generator=g))
        out.append(a[:, top : top + size, left : left + size])
    return torch.stack(out).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _instrument(times: dict[str, float], cpu_times: dict[str, float], device: torch.device) -> None:
    """Wrap the ops (module attributes the pipeline calls) with timers; nested calls count once."""
    depth = [0]

    def wrap(mod, name):
        fn = getattr(mod, name)

        @functools.wraps(fn)
        def timed(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0] += 1
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                _sync(device)
                times[name] += time.perf_counter() - t
                cpu_times[name] += time.process_time() - c
                depth[0] -= 1

        setattr(mod, name, timed)

    for name in OPS:
        wrap(ops, name)
    for name in ("build_kernels", "build_sinc_or_delta"):
        wrap(pipeline, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: all cores"
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--iters", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--preset", choices=("train", "imagenet_test"), default="train")
    ap.add_argument("--jpeg-codec", default="auto", choices=ops.JPEG_CODECS)
    ap.add_argument("--no-breakdown", action="store_true", help="skip the per-op timing pass")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA requested but not available")
    if args.preset == "train":
        deg = RealESRGANDegradation(jpeg_codec=args.jpeg_codec)
    else:
        deg = RealESRGANDegradation.imagenet_test(jpeg_codec=args.jpeg_codec)
    gt = _photos(args.batch, args.size, device)
    g = torch.Generator(device=device).manual_seed(0)
    codec = ops.resolve_jpeg_codec(args.jpeg_codec, device)
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch} size={args.size} "
        f"preset={args.preset} jpeg={codec}"
    )

    # Reseed per iteration: parameters are drawn first in forward(), so iteration i always gets the same
    # resize scales (which dominate the batch time) whatever the ops consume from the generator later.
    for i in range(args.warmup):
        deg(gt, g.manual_seed(10_000 + i))
    _sync(device)
    per_batch = []
    cpu0 = time.process_time()
    for i in range(args.iters):
        t = time.perf_counter()
        deg(gt, g.manual_seed(i))
        _sync(device)
        per_batch.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    total = sum(per_batch)
    srt = sorted(per_batch)
    print(
        f"throughput: {args.batch * args.iters / total:.1f} images/s wall  (batch time mean "
        f"{total / args.iters * 1000:.0f} ms, median {srt[len(srt) // 2] * 1000:.0f} ms, "
        f"min {srt[0] * 1000:.0f} ms; batch time depends on the first-stage resize scale drawn)"
    )
    if device.type == "cpu":
        # Other processes on a shared machine stretch wall time but not this process's CPU time; this bound is
        # what the same threads would reach with the cores to themselves (assuming ideal thread scaling).
        n = torch.get_num_threads()
        print(
            f"CPU time {cpu / args.iters * 1000:.0f} ms/batch on {n} thread(s) -> "
            f"{args.batch * args.iters / (cpu / n):.1f} images/s if uncontended; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )

    if args.no_breakdown:
        return
    times: dict[str, float] = defaultdict(float)
    cpu_times: dict[str, float] = defaultdict(float)
    _instrument(times, cpu_times, device)
    t, c = time.perf_counter(), time.process_time()
    for i in range(args.iters):
        deg(gt, g.manual_seed(i))
    _sync(device)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    print("per-op share of time (instrumented pass, synchronised per op; share of wall | share of CPU time):")
    for name, v in sorted(times.items(), key=lambda kv: -kv[1]):
        print(
            f"  {name:20s} {v / wall * 100:5.1f} % | {cpu_times[name] / cpu * 100:5.1f} %  "
            f"{v / args.iters * 1000:7.1f} ms/batch"
        )
    rest = wall - sum(times.values())
    print(f"  {'other':20s} {rest / wall * 100:5.1f} %  {rest / args.iters * 1000:7.1f} ms/batch")


if __name__ == "__main__":
    main()
