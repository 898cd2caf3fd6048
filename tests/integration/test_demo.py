"""invsr-demo: the engine (settings, limits, exact PNGs, batches) directly, then the served page end to end.

The served tests start ``invsr-demo --backbone tiny`` as a subprocess on a free localhost port (one server for
the module, stopped at teardown) and talk to it from a headless Chromium (Playwright driving the system
``chromium``; ``browser`` marker, skipped only when no browser is installed) and from ``gradio_client``.
Set ``INVSR_DEMO_SCREENSHOT=docs/demo.png`` to save the page after the browser test's run.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from invsr_pl.cli import demo as demo_cli
from invsr_pl.demo.engine import RequestError, Settings, Upscaler
from invsr_pl.utils.images import read_image, write_image

pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")

SCALE = 4  # the tiny smoke-mode noise predictor is x4
STARTUP_TIMEOUT_S = 300  # imports + tiny models on a loaded 2-core machine
REQUEST_TIMEOUT_MS = 180_000


def _gradient(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(3, h, w) float image in [0, 1] with structure (not flat, not pure noise)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([yy, xx, (yy + xx) / 2])
    return (0.8 * base + 0.2 * torch.rand(3, h, w, generator=g)).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def upscaler() -> Iterator[Upscaler]:
    from invsr_pl.cli.sr import build_models

    # the demo parser carries invsr-sr's model options, read back by the same builder
    args = demo_cli.build_parser().parse_args(["--backbone", "tiny"])
    backbone, noise_predictor, smoke, device = build_models(args)
    up = Upscaler(backbone, noise_predictor, device, smoke=smoke, backbone_name="tiny", weights_name="none")
    yield up
    up.close()
    assert not up.workdir.exists()


def test_settings_from_form_parses_and_refuses() -> None:
    s = Settings.from_form(3, " 250, 100 ", 64.0, "wavelet", 7.0)
    assert s == Settings(3, (250, 100), 64, "wavelet", 7)
    assert Settings.from_form(2, "", 0, None, 1).timesteps is None
    for bad, match in [
        (dict(timesteps="200,abc"), "timesteps"),
        (dict(timesteps="100,200"), "timesteps"),  # must descend
        (dict(steps=6), "from 1 to 5"),
        (dict(chopping_size=-16), "from 0 to"),
        (dict(seed=1.5), "whole number"),
        (dict(color_fix="sepia"), "colour fix"),
    ]:
        with pytest.raises(RequestError, match=match):
            Settings.from_form(**bad)


def test_upscale_file_keeps_alpha_16_bit_and_previews(upscaler: Upscaler, tmp_path: Path) -> None:
    src = tmp_path / "rgba16.png"
    write_image(src, _gradient(10, 14), torch.linspace(0, 1, 140).reshape(1, 10, 14), bit_depth=16)
    result = upscaler.upscale_file(src, Settings(chopping_size=0, seed=3))
    image, alpha, bit_depth = read_image(result.path)
    assert result.path.name == "rgba16.png"  # invsr-sr's default name (issue 24)
    assert image.shape == (3, 40, 56) and alpha is not None and bit_depth == 16
    assert result.output_size == (56, 40) and result.input_size == (14, 10)
    assert result.after == result.path  # small enough: the slider shows the exact file
    with Image.open(result.before) as before:
        assert before.size == (56, 40) and before.mode == "RGBA"
    again = upscaler.upscale_file(src, Settings(chopping_size=0, seed=3))
    assert torch.equal(read_image(again.path).image, image)  # same seed, same output
    assert "14x10 -> 56x40 16-bit RGBA" in result.describe() and "seed 3" in result.describe()


def test_previews_are_capped_but_the_download_is_not(upscaler: Upscaler, tmp_path: Path) -> None:
    src = tmp_path / "wide.jpg"
    Image.fromarray((_gradient(12, 24).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(src)
    capped = Upscaler(
        upscaler.backbone,
        upscaler.noise_predictor,
        upscaler.device,
        preview_max_side=48,
        workdir=tmp_path / "w",
    )
    result = capped.upscale_file(src, Settings(chopping_size=0))
    with Image.open(result.path) as out, Image.open(result.before) as b, Image.open(result.after) as a:
        assert out.size == (96, 48) and b.size == a.size == (48, 24)
    capped.close()
    assert (tmp_path / "w").exists()  # a given workdir is the caller's


def test_old_request_folders_are_pruned_and_nothing_else(upscaler: Upscaler, tmp_path: Path) -> None:
    engine = Upscaler(upscaler.backbone, upscaler.noise_predictor, "cpu", workdir=tmp_path, keep_seconds=60)
    old_request, fresh_request = engine.new_request_dir(), engine.new_request_dir()
    not_ours = tmp_path / "notes"
    not_ours.mkdir()
    an_hour_ago = time.time() - 3600
    for folder in (old_request, not_ours):
        os.utime(folder, (an_hour_ago, an_hour_ago))
    engine.new_request_dir()
    assert not old_request.exists() and fresh_request.exists() and not_ours.exists()
    engine.close()  # its stop hooks off the shared networks


def test_size_limit_and_bad_files_are_one_line_messages(upscaler: Upscaler, tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    small_limit = Upscaler(
        upscaler.backbone, upscaler.noise_predictor, upscaler.device, max_megapixels=0.05, workdir=tmp_path
    )
    with pytest.raises(
        RequestError, match=r"big.png is 300x200 \(0.1 MP\); this demo accepts images up to 0.05"
    ):
        small_limit.upscale_file(big, Settings())
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(RequestError, match="junk.png is not a readable image"):
        upscaler.upscale_file(junk, Settings())
    with pytest.raises(RequestError, match=f"multiple of {upscaler.modulus}"):
        upscaler.upscale_file(big, Settings(chopping_size=upscaler.modulus + 2))
    small_limit.close()


def test_batch_zips_results_and_lists_failures(upscaler: Upscaler, tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    files = [tmp_path / "a.png", tmp_path / "x" / "a.png", tmp_path / "broken.png", tmp_path / "b.bmp"]
    write_image(files[0], _gradient(8, 8, 1))
    write_image(files[1], _gradient(8, 12, 2))
    files[2].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    write_image(files[3], _gradient(12, 8, 3))
    seen: list[tuple[int, int, str]] = []
    result = upscaler.upscale_batch(files, Settings(chopping_size=0), progress=lambda *a: seen.append(a))
    # every file's header is checked first: the broken one is listed before any work and never runs
    assert seen == [(0, 3, "a.png"), (1, 3, "a.png"), (2, 3, "b.bmp")]
    assert [name for name, _ in result.failed] == ["broken.png"]
    assert "not a readable image" in result.failed[0][1]
    with zipfile.ZipFile(result.zip_path) as zf:
        assert sorted(zf.namelist()) == ["a.png", "a_2.png", "b.png"]
        with zf.open("a_2.png") as f, Image.open(f) as im:
            assert im.size == (48, 32)
    assert result.describe().startswith("3 of 4 image(s)") and "1 failed" in result.describe()
    nothing = upscaler.upscale_batch([files[2]], Settings(chopping_size=0))
    assert nothing.zip_path is None and len(nothing.failed) == 1


def test_out_of_memory_falls_back_as_invsr_sr_does(
    upscaler: Upscaler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from invsr_pl.sampling.sampler import InvSRSampler

    real_call = InvSRSampler.__call__

    def small_gpu(self: InvSRSampler, lr: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if self.chopping_batch > 2:  # pretend that only two patches per call fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_call(self, lr, **kwargs)

    src = tmp_path / "in.png"
    write_image(src, _gradient(16, 24))
    two = Upscaler(
        upscaler.backbone, upscaler.noise_predictor, "cpu", chopping_batch=2, workdir=tmp_path / "w"
    )
    expected = read_image(two.upscale_file(src, Settings(chopping_size=8)).path).image
    two.close()
    monkeypatch.setattr(InvSRSampler, "__call__", small_gpu)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        result = upscaler.upscale_file(src, Settings(chopping_size=8))
    # the retry starts from the same generator state: the image of a run that started at batch 2
    assert torch.equal(read_image(result.path).image, expected)


def test_scale_follows_the_noise_predictor(upscaler: Upscaler, tmp_path: Path) -> None:
    from invsr_pl.models.tiny import tiny_noise_predictor

    x2 = Upscaler(upscaler.backbone, tiny_noise_predictor(scale=2, seed=0), "cpu", workdir=tmp_path / "w")
    src = tmp_path / "in.png"
    write_image(src, _gradient(8, 12))
    result = x2.upscale_file(src, Settings(chopping_size=0))
    assert x2.scale == 2 and result.output_size == (24, 16) and result.path.name == "in.png"
    assert "**Scale** x2" in x2.describe()
    x2.close()


def test_one_queue_for_both_views(upscaler: Upscaler) -> None:
    from invsr_pl.demo.app import API_NAME, GPU_QUEUE, build_app

    app = build_app(upscaler, concurrency=1)
    events = {fn.api_name: fn for fn in app.fns.values() if fn.api_name}
    assert set(events) == {API_NAME, "upscale_batch"}
    for fn in events.values():  # single and batch jobs share one limit: never two jobs on the GPU
        assert fn.concurrency_id == GPU_QUEUE and fn.concurrency_limit == 1
    info = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "model-info")
    assert "Smoke mode" in info.value and "**Device** `cpu`" in info.value  # stated on the page


def test_cli_setup_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert demo_cli.main(["--backbone", "tiny", "--max-megapixels", "0"]) == 2
    assert "--max-megapixels must be > 0" in capsys.readouterr().err
    assert (
        demo_cli.main(["--backbone", "tiny", "--noise-predictor", str(tmp_path / "missing.safetensors")]) == 2
    )
    assert "missing.safetensors" in capsys.readouterr().err
    assert demo_cli.main(["--backbone", "stabilityai/sd-turbo"]) == 2  # a real backbone needs its weights
    assert "--noise-predictor is required" in capsys.readouterr().err


def test_cli_port_in_use_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert demo_cli.main(["--backbone", "tiny", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- served


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoServer:
    """``invsr-demo --backbone tiny`` in a subprocess; ``url`` once the page is served."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = workdir / "demo.log"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",  # tiny networks: extra threads only add contention (tests/conftest.py)
            "HF_HUB_OFFLINE": "1",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        cmd = [sys.executable, "-m", "invsr_pl.cli.demo", "--backbone", "tiny", "--device", "cpu"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*cmd, "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir
            )
        self.startup_s = self._wait_until_served()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_until_served(self) -> float:
        start = time.perf_counter()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while time.perf_counter() - start < STARTUP_TIMEOUT_S:
            if self.process.poll() is not None:
                pytest.fail(f"invsr-demo exited with {self.process.returncode}:\n{self.log()}")
            try:
                with opener.open(self.url, timeout=5) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.25)
        self.stop()
        pytest.fail(f"invsr-demo did not serve {self.url} within {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoServer]:
    server = DemoServer(tmp_path_factory.mktemp("demo_server"))
    yield server
    server.stop()
    assert server.process.returncode == 0, server.log()  # SIGTERM stops it cleanly...
    workdir = re.search(r"results are kept for an hour under (\S+)", server.log())
    assert workdir and not Path(workdir.group(1)).exists()  # ...and removes its work folder


def _chromium() -> str | None:
    found = os.environ.get("INVSR_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return found if found and Path(found).exists() else None


@pytest.fixture
def chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the demo extra)")
    path = _chromium()
    if path is None:
        pytest.skip(
            "no Chromium found (apt-get install chromium, or set INVSR_CHROMIUM); .ci/run installs it"
        )
    return path


@pytest.mark.slow
@pytest.mark.browser
def test_browser_uploads_runs_and_downloads_a_4x_png(
    demo_server: DemoServer, chromium: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    h, w = 28, 40
    src = tmp_path / "upload.png"
    write_image(src, _gradient(h, w))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            elsewhere: list[str] = []  # offline by default: the page loads nothing from other hosts
            page.on("request", lambda r: None if _local(r.url, demo_server) else elsewhere.append(r.url))
            page.goto(demo_server.url)
            expect(page.locator("#model-info")).to_contain_text("Smoke mode")
            expect(page.locator("#model-info")).to_contain_text("Device cpu")
            page.locator("#lr-image input[type=file]").set_input_files(src)
            expect(page.locator("#lr-image img")).to_have_count(1)  # the upload is shown
            chopping = page.locator("#chopping-size input[type=number]")
            chopping.fill("32")  # small patches: a fast run on CPU
            chopping.press("Enter")
            page.locator("#run").click()
            link = page.locator("#result-file a[download]")
            link.wait_for(timeout=REQUEST_TIMEOUT_MS)
            expect(page.locator("#result-info")).to_contain_text(f"{w}x{h} -> {SCALE * w}x{SCALE * h}")
            expect(page.locator("#result-info")).to_contain_text("chopping 32")
            expect(page.locator("#comparison img")).to_have_count(2)  # before/after slider
            with page.expect_download() as download_info:
                link.click()
            download = download_info.value
            saved = tmp_path / download.suggested_filename
            download.save_as(saved)
            with Image.open(saved) as im:
                assert im.format == "PNG" and im.size == (SCALE * w, SCALE * h)
            assert saved.name == "upload.png"
            shot = os.environ.get("INVSR_DEMO_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=True)
            assert elsewhere == []
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.browser
def test_browser_batch_zips_results_and_lists_failures(
    demo_server: DemoServer, chromium: str, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    good, junk = tmp_path / "good.png", tmp_path / "junk.png"
    write_image(good, _gradient(12, 16))
    junk.write_bytes(b"not a png")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.goto(demo_server.url)
            page.get_by_role("tab", name="Batch").click()
            page.locator("#batch-files input[type=file]").set_input_files([good, junk])
            expect(page.locator("#batch-files")).to_contain_text("junk")  # both uploads listed
            chopping = page.locator("#chopping-size input[type=number]")
            chopping.fill("0")
            chopping.press("Enter")
            page.locator("#run-batch").click()
            link = page.locator("#batch-zip a[download]")
            link.wait_for(timeout=REQUEST_TIMEOUT_MS)
            expect(page.locator("#batch-summary")).to_contain_text("1 of 2 image(s)")
            expect(page.locator("#batch-failures")).to_contain_text("junk.png")
            expect(page.locator("#batch-failures")).to_contain_text("not a readable image")
            with page.expect_download() as download_info:
                link.click()
            saved = tmp_path / "results.zip"
            download_info.value.save_as(saved)
            with zipfile.ZipFile(saved) as zf:
                assert zf.namelist() == ["good.png"]
                with zf.open("good.png") as f, Image.open(f) as im:
                    assert im.size == (SCALE * 16, SCALE * 12)
        finally:
            browser.close()


def _local(url: str, server: DemoServer) -> bool:
    return url.startswith((server.url, "data:", "blob:"))


@pytest.mark.slow
def test_gradio_client_calls_upscale_and_the_batch_endpoint(demo_server: DemoServer, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(demo_server.url, verbose=False)
    src = tmp_path / "alpha16.png"
    write_image(src, _gradient(12, 20), torch.full((1, 12, 20), 0.5), bit_depth=16)
    # the README's three-line example, plus one setting: no chopping keeps the CPU run short
    (before, after), png, info = client.predict(handle_file(src), chopping_size=0, api_name="/upscale")
    image, alpha, bit_depth = read_image(png)
    assert image.shape == (3, SCALE * 12, SCALE * 20) and alpha is not None and bit_depth == 16
    assert "20x12 -> 80x48 16-bit RGBA" in info
    with Image.open(before) as b, Image.open(after) as a:
        assert b.size == a.size == (80, 48)

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a png")
    with pytest.raises(AppError) as err:
        client.predict(handle_file(junk), api_name="/upscale")
    assert "junk" in str(err.value) and "Traceback" not in str(err.value)
    big = tmp_path / "big.png"
    Image.new("RGB", (2100, 2000)).save(big)  # 4.2 MP > the default 4 MP limit, a few kB on disk
    with pytest.raises(AppError, match="accepts images up to 4 MP"):
        client.predict(handle_file(big), api_name="/upscale")

    zip_path, failed, summary = client.predict(
        [handle_file(src), handle_file(junk)], chopping_size=0, api_name="/upscale_batch"
    )
    assert summary.startswith("1 of 2 image(s)")
    assert [row[0] for row in failed["data"]] == ["junk.png"]
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.namelist() == ["alpha16.png"]
