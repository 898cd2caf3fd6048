"""A bounded load test of ``invsr-demo`` on 127.0.0.1: several gradio_client callers, one abusive request.

Starts ``invsr-demo --backbone tiny --device cpu`` (smoke mode, no download) on a free loopback port, then
``--callers`` threads each send ``--requests`` ``/upscale`` calls with mixed image sizes and chopping; one
call of one caller is the abusive request of issue 20 (all 1000 timesteps). It checks and prints:

- every fair request was answered with a PNG, and the abusive one was refused (and how fast);
- no fair request waited longer than its queue position implies: its latency is at most
  ``(jobs in the system when it arrived + 1) x (slowest job's engine time + --overhead-s)``;
- p50 / p95 / max latency of the fair requests, and the server's resident memory: after start-up and its
  peak over the run (``VmRSS`` / ``VmHWM`` from ``/proc``, Linux), so "memory stays bounded" is a number.

Everything is bounded: the request count, a client-side timeout per request (``--request-timeout``) and one
for the whole run (``--timeout``); the server is stopped at the end whatever happened. Only loopback is used.
Exit code 0 when every check held, 1 otherwise, 2 when the server could not be started.

    python benchmarks/demo_load.py                       # 8 callers x 3 requests
    python benchmarks/demo_load.py --callers 4 --requests 5 --max-job-seconds 60
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HOST = "127.0.0.1"  # loopback only, by design: this is a load test, not a scan
SIZES = [(24, 24), (48, 32), (64, 64), (96, 64), (40, 80)]  # (h, w) of the fair requests, cycled
CHOPPING = [0, 128, 0, 32]  # cycled: whole image, default patches, small patches
ABUSIVE = ",".join(str(t) for t in range(1000, 0, -1))  # issue 20: every timestep, descending
ENGINE_SECONDS = re.compile(r"PNG in ([0-9.]+) s")


@dataclass
class Call:
    caller: int
    index: int
    abusive: bool
    size: tuple[int, int]
    chopping: int
    submitted: float = 0.0
    finished: float = 0.0
    ok: bool = False
    engine_s: float | None = None  # the engine's own time, from the result line
    message: str = ""

    @property
    def latency(self) -> float:
        return self.finished - self.submitted


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _memory_mib(pid: int) -> dict[str, float]:
    """VmRSS / VmHWM of ``pid`` in MiB (empty where /proc is not available)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) / 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def _start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "invsr_pl.cli.demo", "--backbone", "tiny", "--device", "cpu"]
    cmd += ["--host", HOST, "--port", str(port), "--queue-size", str(args.callers * args.requests)]
    cmd += ["--max-job-seconds", str(args.max_job_seconds)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": f"{HOST},localhost"}
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny networks: more threads only add contention
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://{HOST}:{port}/"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"invsr-demo exited with {server.returncode}:\n{log_path.read_text()}")
        try:
            with opener.open(url, timeout=5) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.25)
    server.terminate()
    raise RuntimeError(f"invsr-demo did not serve {url} within {args.startup_timeout} s")


def _caller(url: str, calls: list[Call], images: dict, args: argparse.Namespace, stop_at: float) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    for call in calls:
        call.submitted = time.monotonic()
        if call.submitted > stop_at:
            call.finished, call.message = call.submitted, "not sent: the run's time limit was reached"
            continue
        kwargs = {"chopping_size": call.chopping}
        if call.abusive:
            kwargs["timesteps"] = ABUSIVE
        job = client.submit(handle_file(images[call.size]), api_name="/upscale", **kwargs)
        try:
            _, png, info = job.result(timeout=min(args.request_timeout, max(1.0, stop_at - time.monotonic())))
            call.ok = Path(png).is_file()
            found = ENGINE_SECONDS.search(info)
            call.engine_s = float(found.group(1)) if found else None
            call.message = info
        except Exception as err:  # noqa: BLE001 - every outcome is recorded and judged below
            call.message = str(err).splitlines()[0] if str(err) else type(err).__name__
        call.finished = time.monotonic()
    client.close()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--callers", type=int, default=8, help="concurrent gradio_client callers")
    p.add_argument("--requests", type=int, default=3, help="requests per caller")
    p.add_argument("--max-job-seconds", type=float, default=60.0, help="the server's job time limit")
    p.add_argument("--overhead-s", type=float, default=2.0, help="per-job queue/transfer allowance")
    p.add_argument("--request-timeout", type=float, default=300.0, help="client-side limit per request")
    p.add_argument("--timeout", type=float, default=600.0, help="limit for the whole load phase")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="limit for the server start")
    args = p.parse_args(argv)
    if args.callers < 1 or args.requests < 1:
        p.error("--callers and --requests must be >= 1")

    work = Path(tempfile.mkdtemp(prefix="invsr-demo-load-"))
    rng = np.random.default_rng(0)
    images = {}
    for h, w in SIZES:
        path = work / f"in_{h}x{w}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images[(h, w)] = path
    plan: list[list[Call]] = []
    k = 0
    for c in range(args.callers):
        mine = []
        for i in range(args.requests):
            abusive = c == min(1, args.callers - 1) and i == min(1, args.requests - 1)
            mine.append(Call(c, i, abusive, SIZES[k % len(SIZES)], CHOPPING[k % len(CHOPPING)]))
            k += 1
        plan.append(mine)

    start = time.monotonic()
    try:
        server, url = _start_server(args, work / "server.log")
    except RuntimeError as err:
        print(f"demo_load: error: {err}", file=sys.stderr)
        return 2
    try:
        startup_s = time.monotonic() - start
        idle = _memory_mib(server.pid)
        stop_at = time.monotonic() + args.timeout
        threads = [
            threading.Thread(target=_caller, args=(url, calls, images, args, stop_at), daemon=True)
            for calls in plan
        ]
        load_start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.0, stop_at - time.monotonic()) + args.request_timeout)
        load_s = time.monotonic() - load_start
        peak = _memory_mib(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    calls = [c for mine in plan for c in mine]
    fair = [c for c in calls if not c.abusive]
    abusive = [c for c in calls if c.abusive]
    answered = [c for c in fair if c.ok]
    slowest = max((c.engine_s for c in answered if c.engine_s is not None), default=0.0)
    late = []
    for c in answered:
        ahead = sum(1 for o in calls if o is not c and o.submitted <= c.submitted < o.finished)
        bound = (ahead + 1) * (slowest + args.overhead_s)
        if c.latency > bound:
            late.append((c, ahead, bound))
    latencies = [c.latency for c in answered]

    print(f"invsr-demo --backbone tiny on {HOST}, {os.cpu_count()} CPU(s); started in {startup_s:.1f} s")
    print(
        f"{args.callers} callers x {args.requests} requests ({len(fair)} fair, {len(abusive)} abusive) "
        f"in {load_s:.1f} s"
    )
    print(
        f"fair answered {len(answered)}/{len(fair)}; latency p50 {_percentile(latencies, 50):.2f} s, "
        f"p95 {_percentile(latencies, 95):.2f} s, max {max(latencies, default=float('nan')):.2f} s; "
        f"slowest job's engine time {slowest:.2f} s"
    )
    for c in abusive:
        print(
            f"abusive (1000 timesteps): {'ANSWERED' if c.ok else 'refused'} in {c.latency:.2f} s: {c.message}"
        )
    if idle or peak:
        print(
            f"server memory: {idle.get('VmRSS', float('nan')):.0f} MiB after start-up, "
            f"{peak.get('VmRSS', float('nan')):.0f} MiB after the load, "
            f"peak {peak.get('VmHWM', float('nan')):.0f} MiB"
        )
    for c, ahead, bound in late:
        print(f"LATE: caller {c.caller} request {c.index}: {c.latency:.1f} s > {bound:.1f} s ({ahead} ahead)")
    for c in fair:
        if not c.ok:
            print(f"UNANSWERED: caller {c.caller} request {c.index} {c.size}: {c.message}")
    ok = (
        len(answered) == len(fair)
        and not late
        and all(not c.ok and "1000 timesteps" in c.message for c in abusive)
    )
    print("all checks held" if ok else "some checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
