"""The Gradio page around an :class:`~invsr_pl.demo.engine.Upscaler`: a single-image view (also the
``/upscale`` API endpoint), a batch view, and the model facts. Settings are shared by both views.

Every visitor's job goes through one queue: both views' events share the concurrency id ``"gpu"`` with limit
``concurrency`` (1 by default), so two visitors never run the networks at once and cannot run the GPU out of
memory together. Requests the engine refuses (:class:`~invsr_pl.demo.engine.RequestError`: bad settings,
unreadable files, over the size limit or the per-request budget, stopped) come back as ``gr.Error`` one-liners
without server paths; an unexpected error is logged on the server with its traceback and the visitor reads
one line naming its type.

Uploads reach the engine as Gradio stored them (``preprocess=False``): Gradio's image preprocessing would
open the file itself and answer a non-image with its own multi-line error naming the server's upload path;
the engine's header check answers it instead. Gradio still checks that every path is one of its uploads.

A job runs in a worker thread under a :class:`~invsr_pl.demo.stopping.StopSwitch`: it is cancelled when its
caller disconnects (the browser tab closes, the client's event stream drops) or cancels (``job.cancel()``
of gradio_client), and stopped past ``max_job_seconds``; either way the queue moves on within a network call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
from gradio.context import LocalContext

from invsr_pl.demo.engine import RequestError, Settings, Upscaler
from invsr_pl.demo.errors import visitor_message
from invsr_pl.demo.stopping import JobCancelled, JobTimeout, StopSwitch
from invsr_pl.sampling.color_fix import COLOR_FIX_METHODS
from invsr_pl.utils.images import IMAGE_EXTENSIONS

__all__ = ["API_NAME", "build_app", "launch"]

API_NAME = "upscale"  # the single-image endpoint: gradio_client's predict(..., api_name="/upscale")
GPU_QUEUE = "gpu"  # concurrency id shared by every event that runs the networks
POLL_SECONDS = 0.2  # how often a running job looks whether its caller is still connected
log = logging.getLogger("invsr_pl.demo")
T = TypeVar("T")


def _upload_path(value: object) -> Path | None:
    """The stored file of an un-preprocessed upload (Gradio's ``FileData`` as a dict), or None."""
    if isinstance(value, dict):
        value = value.get("path")
    return Path(value) if isinstance(value, str) and value else None


def _running_event(app: gr.Blocks) -> Any:
    """Gradio's queue event of the call being handled (None if not found).

    Gradio (5.x, 6.x) keeps the running events in ``Queue.active_jobs`` and sets an event's ``alive`` to
    False when its client's event stream closes (``Queue.clean_events``), but does not stop a running
    function; the job watches that flag instead. Private attributes, read defensively: when they change,
    disconnects are no longer noticed (tests/integration/test_demo_hostile.py fails) but nothing breaks.
    """
    event_id = LocalContext.event_id.get(None)
    for job in getattr(getattr(app, "_queue", None), "active_jobs", None) or []:
        for event in job or []:
            if getattr(event, "_id", None) == event_id:
                return event
    return None


async def _run_job(app: gr.Blocks, upscaler: Upscaler, work: Callable[[StopSwitch], T]) -> T:
    """``work(switch)`` in a worker thread, cancelled when the caller goes away; returns its result."""
    switch = upscaler.new_switch()
    event = _running_event(app)
    # to_thread copies the context, so gr.Progress still finds its event from the worker thread
    task = asyncio.ensure_future(asyncio.to_thread(work, switch))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=POLL_SECONDS)
            if not task.done() and event is not None and not getattr(event, "alive", True):
                if not switch.cancelled:
                    log.info("caller disconnected after %.1f s: cancelling its job", switch.elapsed())
                switch.cancel()
    except asyncio.CancelledError:  # /cancel (gradio_client's job.cancel()) or the server stopping
        log.info("job cancelled after %.1f s", switch.elapsed())
        switch.cancel()
        await asyncio.wait({task})  # the slot stays taken until the networks are really free
        raise
    return task.result()


def _visitor_error(err: Exception) -> gr.Error:
    """The one line a visitor reads for ``err`` (logged on the server when it is not a refusal)."""
    if isinstance(err, JobCancelled):
        log.info("%s", err)
    elif isinstance(err, JobTimeout):
        log.warning("job %s", err)
    elif not isinstance(err, RequestError):
        log.error("unexpected error in a demo job", exc_info=err)
        return gr.Error(
            f"internal error ({type(err).__name__}); the server log has the details", print_exception=False
        )
    # a refusal is the visitor's business, not a server fault: no traceback on the server's console
    return gr.Error(visitor_message(str(err)), print_exception=False)


CLIENT_EXAMPLE = """```python
from gradio_client import Client, handle_file
client = Client("{url}")
comparison, png_path, info = client.predict(handle_file("photo.jpg"), api_name="/upscale")
```"""


def build_app(
    upscaler: Upscaler, concurrency: int = 1, max_batch_files: int = 50, url: str = "http://127.0.0.1:7860/"
) -> gr.Blocks:
    """The demo page; call :func:`launch` (or ``.queue().launch()``) to serve it.

    Args:
        upscaler: the loaded models.
        concurrency: jobs (single or batch) running at once; the rest wait in the queue.
        max_batch_files: most files one batch may hold.
        url: the address shown in the page's gradio_client example.
    """
    if concurrency < 1 or max_batch_files < 1:
        raise ValueError("concurrency and max_batch_files must be >= 1")

    async def upscale(
        image: dict | str | None,
        steps: float = 1,
        timesteps: str | None = None,
        chopping_size: float = 128,
        color_fix: str = "none",
        seed: float = Settings.seed,
    ) -> tuple[tuple[str, str], str, str]:
        """Super-resolve one image.

        Args:
            image: the low-resolution image file (png, jpg, bmp, webp, tif; alpha and 16-bit are kept).
            steps: sampling steps 1-5 with the paper's schedule.
            timesteps: explicit descending timesteps such as "200,100"; overrides steps when given.
            chopping_size: LR patch size (0: the whole image at once).
            color_fix: none, wavelet, ycbcr or adain.
            seed: seed of the noise draws.

        Returns:
            The (before, after) comparison pair, the exact result PNG and a line with the size, time and
            settings used.
        """
        path = _upload_path(image)
        if path is None:
            raise gr.Error(
                "Upload an image first (drop a file, click to browse, or paste from the clipboard)."
            )
        try:
            settings = Settings.from_form(steps, timesteps, chopping_size, color_fix, seed)
            result = await _run_job(
                app, upscaler, lambda stop: upscaler.upscale_file(path, settings, stop=stop)
            )
        except Exception as err:  # noqa: BLE001 - every error becomes one line for the visitor
            raise _visitor_error(err) from None
        return (str(result.before), str(result.after)), str(result.path), result.describe()

    async def upscale_batch(
        files: list[dict] | list[str] | None,
        steps: float = 1,
        timesteps: str | None = None,
        chopping_size: float = 128,
        color_fix: str = "none",
        seed: float = Settings.seed,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to attach a progress bar
    ) -> tuple[str | None, list[list[str]], str]:
        """Super-resolve several images; returns the zip of PNGs, the failed files with reasons, a summary."""
        paths = [p for p in map(_upload_path, files if isinstance(files, list) else []) if p is not None]
        if not paths:
            raise gr.Error("Upload one or more images first.")
        if len(paths) > max_batch_files:
            raise gr.Error(f"{len(paths)} files uploaded; one batch may hold at most {max_batch_files}.")

        def work(stop: StopSwitch):  # -> BatchResult
            return upscaler.upscale_batch(
                paths,
                settings,
                progress=lambda i, n, name: progress((i, n), desc=name, unit="images"),
                stop=stop,
            )

        try:
            settings = Settings.from_form(steps, timesteps, chopping_size, color_fix, seed)
            result = await _run_job(app, upscaler, work)
        except Exception as err:  # noqa: BLE001 - every error becomes one line for the visitor
            raise _visitor_error(err) from None
        rows = [[name, reason] for name, reason in result.failed]
        zip_path = None if result.zip_path is None else str(result.zip_path)
        return zip_path, rows, result.describe()

    # preprocess=False: the engine reads uploads itself (module docstring)
    queue: dict[str, Any] = {
        "concurrency_limit": concurrency,
        "concurrency_id": GPU_QUEUE,
        "preprocess": False,
    }
    with gr.Blocks(
        title=f"InvSR x{upscaler.scale} super-resolution",
        analytics_enabled=False,  # offline by default: no telemetry, no version check
        delete_cache=(3600, 3600),
    ) as app:
        gr.Markdown(
            f"# InvSR x{upscaler.scale} super-resolution\n"
            "Arbitrary-steps image super-resolution by diffusion inversion (CVPR 2025)."
        )
        gr.Markdown(upscaler.describe(), elem_id="model-info")
        with gr.Row():
            with gr.Column(scale=1, min_width=240):
                gr.Markdown("### Settings")
                steps = gr.Slider(1, 5, value=1, step=1, label="Steps", elem_id="steps")
                timesteps = gr.Textbox(
                    label="Timesteps (optional)",
                    placeholder="e.g. 200,100 (overrides steps)",
                    elem_id="timesteps",
                )
                chopping = gr.Slider(
                    0,
                    1024,
                    value=128,
                    step=upscaler.modulus,
                    label="Chopping size (LR patch; 0 = whole image)",
                    elem_id="chopping-size",
                )
                color_fix = gr.Dropdown(list(COLOR_FIX_METHODS), value="none", label="Colour fix")
                seed = gr.Number(value=Settings.seed, precision=0, label="Seed", elem_id="seed")
                gr.Markdown(
                    f"{upscaler.describe_limits()} One job runs at a time, others queue.",
                    elem_id="limits",
                )
            with gr.Column(scale=3):
                with gr.Tab("Single image"):
                    with gr.Row():
                        image = gr.Image(
                            type="filepath",
                            image_mode=None,  # the file itself reaches read_image: alpha and 16-bit kept
                            sources=["upload", "clipboard"],
                            label="Low-resolution image (drop, click or paste)",
                            height=360,
                            elem_id="lr-image",
                        )
                        comparison = gr.ImageSlider(
                            type="filepath",
                            format="png",
                            label=f"Before (bicubic) / after (InvSR x{upscaler.scale})",
                            interactive=False,
                            elem_id="comparison",
                        )
                    run = gr.Button("Super-resolve", variant="primary", elem_id="run")
                    info = gr.Markdown(elem_id="result-info")
                    result_file = gr.File(label="Result PNG (exact, full size)", elem_id="result-file")
                with gr.Tab("Batch"):
                    files = gr.File(
                        file_count="multiple",
                        file_types=list(IMAGE_EXTENSIONS),
                        label=f"Images (up to {max_batch_files})",
                        elem_id="batch-files",
                    )
                    run_batch = gr.Button("Super-resolve all", variant="primary", elem_id="run-batch")
                    summary = gr.Markdown(elem_id="batch-summary")
                    zip_file = gr.File(label="Results (zip of PNGs)", elem_id="batch-zip")
                    failures = gr.Dataframe(
                        headers=["file", "reason"],
                        label="Failed files",
                        interactive=False,
                        wrap=True,
                        elem_id="batch-failures",
                    )
        with gr.Accordion("Call it from a script", open=False):
            gr.Markdown(CLIENT_EXAMPLE.format(url=url))
        settings = [steps, timesteps, chopping, color_fix, seed]
        run.click(upscale, [image, *settings], [comparison, result_file, info], api_name=API_NAME, **queue)
        run_batch.click(
            upscale_batch,
            [files, *settings],
            [zip_file, failures, summary],
            api_name="upscale_batch",
            **queue,
        )
    return app


def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    queue_size: int = 20,
    max_upload_mb: int = 50,
    block: bool = True,
) -> str:
    """Serve ``app``; returns the local URL (when ``block`` is False the server runs in a thread).

    Args:
        queue_size: jobs that may wait; further visitors are told the queue is full.
        max_upload_mb: uploads above this are refused by the server with a message on the page.
    """
    app.queue(max_size=queue_size)
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=f"{max_upload_mb}mb",
        show_error=True,
        prevent_thread_lock=not block,
    )
    return url
