"""``invsr-demo``: a web page (Gradio) for InvSR super-resolution, with ``invsr-sr``'s model options.

Examples::

    invsr-demo --backbone tiny                       # offline smoke mode: random tiny networks, no download
    invsr-demo --noise-predictor noise_predictor_sd_turbo_v5.pth --port 7860
    invsr-demo --backbone /models/sd-turbo --noise-predictor runs/x/np --host 0.0.0.0 --compile

The models are loaded once at start; the page has a single-image view (also the ``/upscale`` API endpoint for
``gradio_client``) and a batch view. Jobs queue and run one at a time by default (``--concurrency``). Each
image's work is bounded (``--max-steps``, ``--max-patches``, ``--max-work``; defaults follow
``--max-megapixels``) and refused in one line before any work; a job stops when its caller disconnects or
after ``--max-job-seconds``.
Exit codes: 0 server stopped normally, 2 bad arguments, models that cannot be loaded, or a port in use.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence

from invsr_pl.cli.sr import SetupError, add_model_arguments, build_models

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="invsr-demo",
        description="Serve a web page for InvSR super-resolution (single images, batches, /upscale API).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--chopping-batch", type=int, default=8, help="patches per network call")
    server = p.add_argument_group("server")
    server.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: the whole network)"
    )
    server.add_argument("--port", type=int, default=7860, help="port to listen on")
    server.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    server.add_argument("--concurrency", type=int, default=1, help="jobs running at once; the rest queue")
    server.add_argument("--queue-size", type=int, default=20, help="jobs that may wait in the queue")
    server.add_argument("--max-megapixels", type=float, default=4.0, help="largest input image, in MP")
    server.add_argument("--max-upload-mb", type=int, default=50, help="largest upload, in MB")
    server.add_argument("--max-batch-files", type=int, default=50, help="most files in one batch")
    budget = p.add_argument_group("per-request budget (docs: README 'Web demo')")
    budget.add_argument(
        "--max-steps", type=int, default=None, help="most timesteps per image; unset (%(default)s): 10"
    )
    budget.add_argument(
        "--max-patches",
        type=int,
        default=None,
        help="most chopping patches per image; unset (%(default)s): 256 per MP of --max-megapixels",
    )
    budget.add_argument(
        "--max-work",
        type=float,
        default=None,
        help="most work per image in megapixel-steps, patch pixels x steps; unset (%(default)s): 21 per MP "
        "of --max-megapixels, the 5-step schedule at the size limit",
    )
    budget.add_argument(
        "--max-job-seconds",
        type=float,
        default=300.0,
        help="wall-clock limit of one job (image or batch); it is stopped and reported; 0: no limit",
    )
    return p


def _check(args: argparse.Namespace) -> None:
    positive = ("chopping_batch", "concurrency", "queue_size", "max_upload_mb", "max_batch_files")
    for name in positive:
        if getattr(args, name) < 1:
            raise SetupError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "max_patches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SetupError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_megapixels", "max_work"):
        value = getattr(args, name)
        if value is not None and not 0 < value < float("inf"):
            raise SetupError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if not 0 <= args.max_job_seconds < float("inf"):
        raise SetupError(f"--max-job-seconds must be >= 0 (0: no limit), got {args.max_job_seconds}")
    if not 0 < args.port < 65536:
        raise SetupError(f"--port must be in 1..65535, got {args.port}")


def _log_jobs() -> None:
    """Stopped, cancelled and failed jobs (logger ``invsr_pl.demo``) as ``invsr-demo:`` lines on stderr."""
    logger = logging.getLogger("invsr_pl.demo")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("invsr-demo: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # Gradio's server loop closes on it; then the work folder is removed


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; serves until interrupted. Returns the exit code (0 ok, 2 setup error)."""
    args = build_parser().parse_args(argv)
    try:
        _check(args)
        missing = [m for m in ("gradio", "gradio_client") if importlib.util.find_spec(m) is None]
        if missing:  # found before gigabytes of weights are read
            raise SetupError(
                f"{', '.join(missing)} not installed; install the demo extra: pip install 'invsr-pl[demo]'"
            )
        start = time.perf_counter()
        # first, so that build_models quiets dependency warnings before diffusers and gradio are imported
        backbone, noise_predictor, smoke, device = build_models(args)  # once, before serving
        from invsr_pl.demo.app import build_app, launch
        from invsr_pl.demo.engine import Upscaler

        note = getattr(args, "backbone_note", None)  # which tiny backbone smoke mode built
        upscaler = Upscaler(
            backbone,
            noise_predictor,
            device,
            smoke=smoke,
            backbone_name=f"{args.backbone} ({note})" if note else args.backbone,
            weights_name=str(args.noise_predictor) if args.noise_predictor else "random tiny (smoke mode)",
            chopping_batch=args.chopping_batch,
            max_megapixels=args.max_megapixels,
            max_steps=args.max_steps,
            max_patches=args.max_patches,
            max_work=args.max_work,
            max_job_seconds=args.max_job_seconds or None,
        )
    except SetupError as err:
        print(f"invsr-demo: error: {err}", file=sys.stderr)
        return 2
    print(
        f"invsr-demo: libraries and models loaded in {time.perf_counter() - start:.1f} s on {device}",
        file=sys.stderr,
    )
    print(f"invsr-demo: results are kept for an hour under {upscaler.workdir}", file=sys.stderr)
    print(f"invsr-demo: {upscaler.describe_limits()}", file=sys.stderr)
    _log_jobs()
    if smoke:
        print("invsr-demo: smoke mode: tiny networks; the outputs only prove the path runs", file=sys.stderr)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    app = build_app(
        upscaler,
        concurrency=args.concurrency,
        max_batch_files=args.max_batch_files,
        url=f"http://{host}:{args.port}/",
    )
    # the loaded libraries and models live as long as the process: keep them out of every GC pass, including
    # the one at exit (11 of the 14 s a SIGTERM took to stop it on a loaded 2-core machine)
    gc.freeze()
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl+C
    try:
        launch(
            app,
            host=args.host,
            port=args.port,
            share=args.share,
            queue_size=args.queue_size,
            max_upload_mb=args.max_upload_mb,
        )
    except OSError as err:  # the port is taken or the address cannot be bound
        print(
            f"invsr-demo: error: cannot listen on {args.host}:{args.port} ({err}); choose another --port",
            file=sys.stderr,
        )
        return 2
    finally:
        upscaler.close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print("invsr-demo: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
