"""The Gradio page around an :class:`~invsr_pl.demo.engine.Upscaler`: a single-image view (also the
``/upscale`` API endpoint), a batch view, and the model facts. Settings are shared by both views.

Every visitor's job goes through one queue: both views' events share the concurrency id ``"gpu"`` with limit
``concurrency`` (1 by default), so two visitors never run the networks at once and cannot run the GPU out of
memory together. Requests the engine refuses (:class:`~invsr_pl.demo.engine.RequestError`) come back as
``gr.Error`` messages on the page; the server runs with ``show_error`` so an unexpected error shows its
one-line message, never a traceback.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from invsr_pl.demo.engine import RequestError, Settings, Upscaler
from invsr_pl.sampling.color_fix import COLOR_FIX_METHODS
from invsr_pl.utils.images import IMAGE_EXTENSIONS

__all__ = ["API_NAME", "build_app", "launch"]

API_NAME = "upscale"  # the single-image endpoint: gradio_client's predict(..., api_name="/upscale")
GPU_QUEUE = "gpu"  # concurrency id shared by every event that runs the networks

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

    def upscale(
        image: str | None,
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
        if not image:
            raise gr.Error(
                "Upload an image first (drop a file, click to browse, or paste from the clipboard)."
            )
        try:
            settings = Settings.from_form(steps, timesteps, chopping_size, color_fix, seed)
            result = upscaler.upscale_file(image, settings)
        except RequestError as err:
            raise gr.Error(str(err)) from err
        return (str(result.before), str(result.after)), str(result.path), result.describe()

    def upscale_batch(
        files: list[str] | None,
        steps: float = 1,
        timesteps: str | None = None,
        chopping_size: float = 128,
        color_fix: str = "none",
        seed: float = Settings.seed,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio's way to attach a progress bar
    ) -> tuple[str | None, list[list[str]], str]:
        """Super-resolve several images; returns the zip of PNGs, the failed files with reasons, a summary."""
        if not files:
            raise gr.Error("Upload one or more images first.")
        if len(files) > max_batch_files:
            raise gr.Error(f"{len(files)} files uploaded; one batch may hold at most {max_batch_files}.")
        try:
            settings = Settings.from_form(steps, timesteps, chopping_size, color_fix, seed)
            result = upscaler.upscale_batch(
                files, settings, progress=lambda i, n, name: progress((i, n), desc=name, unit="images")
            )
        except RequestError as err:
            raise gr.Error(str(err)) from err
        rows = [[name, reason] for name, reason in result.failed]
        zip_path = None if result.zip_path is None else str(result.zip_path)
        return zip_path, rows, result.describe()

    queue: dict[str, Any] = {"concurrency_limit": concurrency, "concurrency_id": GPU_QUEUE}
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
                    f"Inputs up to {upscaler.max_megapixels:g} MP; one job runs at a time, others queue."
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
