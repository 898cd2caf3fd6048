"""Start-up and smoke-mode wall times of the commands a new user types first (issue 24).

Each figure is the wall time of a fresh subprocess (so it includes Python's and every library's import),
the median of ``--repeat`` runs, next to its CPU time (user + system of the child: far less sensitive to
other work on a shared machine; on an idle machine wall <= CPU for these mostly single-threaded runs):

- ``invsr-sr --help``, ``python train.py --cfg job``, ``python evaluate.py --cfg job``: start-up only.
- ``invsr-sr --backbone tiny`` on one 176-px photo and on ``--copies`` copies of it: ``total`` is the
  one-image run; ``per image`` = (copies run - one-image run) / (copies - 1), i.e. the image's own time
  after start-up; ``start-up`` = total - per image.
- ``import <module>``: the import of the modules the entry points import (``python -X importtime`` gives
  the breakdown by module).
- ``invsr-demo --backbone tiny``: seconds from the start until its page answers (one run; ``--skip-demo``
  leaves it out; needs the ``demo`` extra).

Usage::

    python benchmarks/startup.py                  # all figures, 3 runs each
    python benchmarks/startup.py --repeat 1 --copies 3

Machine noise matters: state the machine (cores, other load) with the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS = ("invsr_pl.cli.sr", "invsr_pl.cli.demo", "invsr_pl.systems.invsr", "invsr_pl.systems.evaluation")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wall(cmd: list[str], repeat: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``cmd`` (run from the repository root); raises if it fails."""
    walls, cpus = [], []
    for _ in range(repeat):
        start, cpu = time.perf_counter(), _children_cpu()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        cpus.append(_children_cpu() - cpu)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n" + "\n".join(tail))
    return statistics.median(walls), statistics.median(cpus)


def _demo_to_page(port: int, limit: float = 300.0) -> float:
    """Wall seconds from starting ``invsr-demo --backbone tiny`` until ``http://127.0.0.1:port/`` answers."""
    import urllib.request

    exe = shutil.which("invsr-demo")
    cmd = [exe] if exe else [sys.executable, "-m", "invsr_pl.cli.demo"]
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "--backbone", "tiny", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - start < limit:
            if proc.poll() is not None:
                raise RuntimeError(f"invsr-demo exited {proc.returncode} before serving its page")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as reply:
                    if reply.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"invsr-demo served no page within {limit:.0f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _photo(path: Path, size: int) -> None:
    """A ``size``-px square crop of scikit-image's astronaut photo, written as PNG."""
    import numpy as np
    import skimage.data
    from PIL import Image

    img = Image.fromarray(np.asarray(skimage.data.astronaut())).resize((size, size), Image.BICUBIC)
    img.save(path)


def _sr_cli() -> list[str]:
    exe = shutil.which("invsr-sr")
    return [exe] if exe else [sys.executable, "-m", "invsr_pl.cli.sr"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--copies", type=int, default=3, help="images in the per-image run (>= 2)")
    parser.add_argument("--size", type=int, default=176, help="side of the test photo (px)")
    parser.add_argument("--skip-imports", action="store_true", help="leave out the 'import <module>' rows")
    parser.add_argument("--skip-demo", action="store_true", help="leave out invsr-demo's time to its page")
    parser.add_argument("--port", type=int, default=7987, help="a free port for the demo")
    args = parser.parse_args(argv)
    if args.copies < 2:
        parser.error("--copies must be >= 2")

    rows: list[tuple[str, tuple[float, float]]] = []
    sr = _sr_cli()
    rows.append(("invsr-sr --help", _wall([*sr, "--help"], args.repeat)))
    py = sys.executable
    rows.append(("python train.py --cfg job", _wall([py, "train.py", "--cfg", "job"], args.repeat)))
    rows.append(("python evaluate.py --cfg job", _wall([py, "evaluate.py", "--cfg", "job"], args.repeat)))
    if not args.skip_imports:
        for module in IMPORTS:
            rows.append((f"import {module}", _wall([py, "-c", f"import {module}"], args.repeat)))

    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp, "one"), Path(tmp, "many")
        one.mkdir()
        many.mkdir()
        _photo(one / "photo.png", args.size)
        for k in range(args.copies):
            shutil.copy(one / "photo.png", many / f"photo{k}.png")
        base = [*sr, "--backbone", "tiny", "--no-progress", "-o"]
        total = _wall([*base, str(Path(tmp, "out1")), str(one)], args.repeat)
        total_many = _wall([*base, str(Path(tmp, "outn")), str(many)], args.repeat)
    per_image = tuple(max(0.0, (m - o) / (args.copies - 1)) for m, o in zip(total_many, total, strict=True))
    label = f"invsr-sr --backbone tiny, one {args.size}-px image"
    rows.append((f"{label}: total", total))
    rows.append((f"{label}: per image (after start-up)", per_image))
    rows.append((f"{label}: start-up", (total[0] - per_image[0], total[1] - per_image[1])))

    if not args.skip_demo and importlib.util.find_spec("gradio") is not None:
        page = _demo_to_page(args.port)  # CPU time: not measured (the server is stopped, not waited for)
        rows.append(("invsr-demo --backbone tiny: time to its page", (page, float("nan"))))

    load = os.getloadavg()[0]
    print(f"# {os.cpu_count()} CPU(s), load average {load:.1f} at the end; median of {args.repeat} run(s)")
    width = max(len(name) for name, _ in rows)
    print(f"{'':<{width}}  {'wall':>8}  {'CPU':>8}")
    for name, (wall, cpu) in rows:
        print(f"{name:<{width}}  {wall:6.2f} s  {cpu:6.2f} s")
    if total[0] < per_image[0]:
        print("# the load changed between the one- and many-image runs: per-image wall figures are void")
    return 0


if __name__ == "__main__":
    sys.exit(main())
