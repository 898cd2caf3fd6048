"""invsr-demo under hostile requests (issue 20): the per-request budget, seed range, upload messages without
server paths, cancel on disconnect and the job time limit.

One tiny-backbone demo is served in this process on 127.0.0.1 (``launch(block=False)``), so a test can make
the engine slow: ``slow_unet`` puts a sleep before every UNet call. Callers are ``gradio_client`` and, for the
disconnect, a bare HTTP client that joins the queue and drops its event stream, as a closed browser tab does.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from invsr_pl.cli import demo as demo_cli
from invsr_pl.demo.budget import RequestBudget, request_cost
from invsr_pl.demo.engine import SEED_MAX, RequestError, Settings, Upscaler, batch_names
from invsr_pl.demo.errors import visitor_message
from invsr_pl.demo.stopping import JobCancelled, JobTimeout, StopSwitch
from invsr_pl.utils.images import write_image

pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")

SLOW_S = 0.3  # seconds slept before each UNet call by slow_unet
THOUSAND = ",".join(str(t) for t in range(1000, 0, -1))  # the request: every timestep
ABSOLUTE_PATH = re.compile(r"(^|[\s'\"(])(/|[A-Za-z]:\\)\w")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(path: Path, h: int, w: int) -> Path:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    write_image(path, torch.stack([yy, xx, (yy + xx) / 2]))
    return path


@dataclass
class Served:
    upscaler: Upscaler
    app: object
    url: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from invsr_pl.cli.sr import build_models
    from invsr_pl.demo.app import build_app, launch

    saved = os.environ.get("NO_PROXY")
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"  # loopback only, whatever proxy the machine has
    backbone, noise_predictor, smoke, device = build_models(
        demo_cli.build_parser().parse_args(["--backbone", "tiny", "--device", "cpu"])
    )
    upscaler = Upscaler(
        backbone,
        noise_predictor,
        device,
        smoke=smoke,
        workdir=tmp_path_factory.mktemp("demo_work"),
        max_job_seconds=None,
    )
    app = build_app(upscaler)
    url = launch(app, host="127.0.0.1", port=_free_port(), block=False)
    yield Served(upscaler, app, url)
    app.close()
    upscaler.close()
    if saved is None:
        os.environ.pop("NO_PROXY", None)
    else:
        os.environ["NO_PROXY"] = saved


@pytest.fixture(scope="module")
def client(served: Served):
    from gradio_client import Client

    return Client(served.url, verbose=False)


class CallCounter:
    """Counts (and optionally slows) the calls of one network."""

    def __init__(self, module: torch.nn.Module, sleep_s: float = 0.0) -> None:
        self.calls = 0
        self.sleep_s = sleep_s
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: object) -> None:
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)

    def remove(self) -> None:
        self._handle.remove()


@pytest.fixture
def noise_predictor_calls(served: Served) -> Iterator[CallCounter]:
    counter = CallCounter(served.upscaler.noise_predictor)
    yield counter
    counter.remove()


@pytest.fixture
def slow_unet(served: Served) -> Iterator[CallCounter]:
    counter = CallCounter(served.upscaler.backbone.unet, sleep_s=SLOW_S)
    yield counter
    counter.remove()


# ---------------------------------------------------------------------------------------------- engine


def test_cost_counts_the_patches_the_sampler_runs(served: Served, tmp_path: Path) -> None:
    up = served.upscaler
    seen: list[int] = []
    handle = up.noise_predictor.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    try:
        for (h, w), chop in [((40, 72), 32), ((20, 20), 0), ((24, 56), 16)]:
            seen.clear()
            up.upscale_file(_image(tmp_path / "in.png", h, w), Settings(chopping_size=chop), previews=False)
            cost = request_cost(w, h, 1, chop, up.modulus)
            assert sum(seen) == cost.patches, (h, w, chop)
    finally:
        handle.remove()
    # the default budget admits the 5-step schedule at the size limit and not the 1000 timesteps
    budget = RequestBudget.for_size_limit(4.0)
    assert budget.refusal(request_cost(2000, 2000, 5, 128, 16)) is None
    assert budget.refusal(request_cost(4000, 1000, 5, 128, 16)) is None
    assert "1000 timesteps requested" in budget.refusal(request_cost(64, 64, 1000, 128, 16))
    assert "patches" in budget.refusal(request_cost(2000, 2000, 1, 16, 16))
    assert "megapixel-steps" in budget.refusal(request_cost(2000, 2000, 10, 128, 16))


def test_seed_range_and_odd_values_are_refused_in_one_line() -> None:
    assert Settings.from_form(seed=SEED_MAX).seed == SEED_MAX
    assert Settings.from_form(seed="42").seed == 42
    for bad in (1e30, -1, SEED_MAX + 1, float("inf"), float("nan"), "abc", None, True):
        with pytest.raises(RequestError, match=r"^seed must be a whole number"):
            Settings.from_form(seed=bad)
    with pytest.raises(RequestError, match="from 0 to 18446744073709551615, got 1e\\+30"):
        Settings.from_form(seed=1e30)
    for bad in (float("inf"), 1e300):
        with pytest.raises(RequestError, match="chopping size"):
            Settings.from_form(chopping_size=bad)
    with pytest.raises(RequestError, match="1001 values given"):
        Settings.from_form(timesteps=",".join(["1"] * 1001))


def test_outputs_are_named_as_invsr_sr_names_them() -> None:
    # issue 24: <stem>.png by default; a stem shared across extensions keeps its extension, as in invsr-sr
    paths = [Path(p) for p in ("in/a.jpg", "in/a.PNG", "x/b.png", "y/b.png", "y/B.png", "c.webp")]
    assert batch_names(paths) == ["a_jpg.png", "a_png.png", "b.png", "b_2.png", "B_3.png", "c.png"]


def test_visitor_messages_keep_file_names_only() -> None:
    assert (
        visitor_message("cannot read image /tmp/gradio/9f3a/photo.png: truncated\nTraceback (most recent)")
        == "cannot read image photo.png: truncated"
    )
    assert (
        visitor_message("cannot identify image file 'C:\\Temp\\x\\a.png'")
        == "cannot identify image file 'a.png'"
    )
    assert visitor_message("ratio 1/2 at 5 MB/s") == "ratio 1/2 at 5 MB/s"


def test_stop_switch_cancel_and_deadline(served: Served, tmp_path: Path) -> None:
    up = served.upscaler
    src = _image(tmp_path / "in.png", 16, 16)
    cancelled = StopSwitch()
    cancelled.cancel()
    with pytest.raises(JobCancelled):
        up.upscale_file(src, Settings(chopping_size=0), stop=cancelled)
    with pytest.raises(JobTimeout, match="at most 1e-06 s"):
        up.upscale_file(src, Settings(chopping_size=0), stop=StopSwitch(1e-6))
    assert not any(tmp_path.glob("**/in_*.png"))  # nothing half-done was written
    up.upscale_file(src, Settings(chopping_size=0), previews=False)  # the next job runs normally


# ---------------------------------------------------------------------------------------------- served


def _app_error(client, *args, api_name: str = "/upscale", **kwargs) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        client.predict(*args, api_name=api_name, **kwargs)
    return str(err.value)


def test_the_1000_timestep_request_is_refused_before_any_work(
    client, noise_predictor_calls: CallCounter, tmp_path: Path
) -> None:
    from gradio_client import handle_file

    src = handle_file(_image(tmp_path / "photo.png", 24, 24))
    message = _app_error(client, src, timesteps=THOUSAND)
    assert (
        message
        == "photo.png: 1000 timesteps requested; this demo runs at most 10 per image (the paper uses 1 to 5)"
    )
    message = _app_error(client, src, chopping_size=16 * 1024)  # a tiny image padded to a huge patch
    assert "megapixel-steps of work" in message
    _, failed, summary = client.predict([src], timesteps=THOUSAND, api_name="/upscale_batch")
    assert summary.startswith("0 of 1") and "1000 timesteps requested" in failed["data"][0][1]
    assert noise_predictor_calls.calls == 0  # refused from the header and the settings alone


def test_seed_1e30_is_refused_not_overflowed(client, tmp_path: Path) -> None:
    from gradio_client import handle_file

    message = _app_error(client, handle_file(_image(tmp_path / "a.png", 8, 8)), seed=1e30)
    assert message == "seed must be a whole number from 0 to 18446744073709551615, got 1e+30"


def test_upload_errors_are_the_demos_one_liners_without_paths(client, tmp_path: Path) -> None:
    from gradio_client import handle_file

    junk = tmp_path / "notes.png"
    junk.write_bytes(b"this is a text file, not a PNG\n" * 4)
    message = _app_error(client, handle_file(junk))
    assert message == "notes.png is not a readable image (png, jpg, bmp, webp, tif)"
    good = _image(tmp_path / "cut.png", 64, 64)
    Image.open(good).convert("RGB").save(tmp_path / "cut.jpg", quality=95)
    data = (tmp_path / "cut.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # a truncated JPEG
    message = _app_error(client, handle_file(tmp_path / "cut.jpg"), chopping_size=0)
    assert message.startswith("cannot read image cut.jpg") and "\n" not in message
    _, failed, _ = client.predict([handle_file(junk)], api_name="/upscale_batch")
    assert failed["data"] == [["notes.png", "notes.png is not a readable image (png, jpg, bmp, webp, tif)"]]
    for text in (message, failed["data"][0][1]):
        assert ABSOLUTE_PATH.search(text) is None and "Traceback" not in text, text


def test_a_job_past_max_job_seconds_is_stopped_and_reported(
    served: Served, client, slow_unet: CallCounter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradio_client import handle_file

    monkeypatch.setattr(served.upscaler, "max_job_seconds", 2.0)
    src = handle_file(
        _image(tmp_path / "big.png", 128, 128)
    )  # 225 patches of 16 px: ~9 s of slept UNet calls
    start = time.perf_counter()
    message = _app_error(client, src, chopping_size=16)
    assert message.startswith("stopped after 2 s: this demo runs a job for at most 2 s")
    assert time.perf_counter() - start < 2 + 10 * SLOW_S + 5  # stopped at the next call, not at the end
    slow_unet.sleep_s = 0.0
    (_, _), png, _ = client.predict(
        handle_file(_image(tmp_path / "ok.png", 8, 8)), chopping_size=0, api_name="/upscale"
    )
    assert Path(png).is_file()  # the queue moved on


def _join_and_drop(url: str, fn_index: int, image: Path, chopping_size: int) -> None:
    """What a closed browser tab does: upload, join the queue, read the stream until the job starts, go."""
    import httpx

    session = "hostile-" + os.urandom(4).hex()
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as http:
        uploaded = http.post(
            "gradio_api/upload", files=[("files", (image.name, image.read_bytes(), "image/png"))]
        )
        uploaded.raise_for_status()
        file_data = {
            "path": uploaded.json()[0],
            "orig_name": image.name,
            "meta": {"_type": "gradio.FileData"},
        }
        body = {
            "data": [file_data, 1, "", chopping_size, "none", 1],
            "fn_index": fn_index,
            "session_hash": session,
            "event_data": None,
            "trigger_id": None,
        }
        http.post("gradio_api/queue/join", json=body).raise_for_status()
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_starts":
                    return  # closing the stream and the connection is the disconnect
    pytest.fail("the job never started")


def test_a_job_whose_caller_disconnected_is_cancelled(
    served: Served, client, slow_unet: CallCounter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gradio_client import handle_file

    fn_index = next(i for i, fn in served.app.fns.items() if fn.api_name == "upscale")
    caplog.set_level(logging.INFO, logger="invsr_pl.demo")
    # 961 patches of 16 px, 121 UNet calls: over 36 s of sleep alone if it ran to the end
    _join_and_drop(served.url, fn_index, _image(tmp_path / "slow.png", 256, 256), chopping_size=16)
    deadline = time.monotonic() + 40
    while "caller disconnected" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "caller disconnected" in caplog.text
    calls = slow_unet.calls
    time.sleep(4 * SLOW_S)
    assert slow_unet.calls <= calls + 1 < 121  # it stopped at its next network call, long before its end
    slow_unet.sleep_s = 0.0
    start = time.perf_counter()
    (_, _), png, _ = client.predict(
        handle_file(_image(tmp_path / "next.png", 8, 8)), chopping_size=0, api_name="/upscale"
    )
    assert Path(png).is_file() and time.perf_counter() - start < 30  # the queue is free again


def test_an_unexpected_error_names_its_type_only(
    served: Served, client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gradio_client import handle_file

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("unsupported operand in /srv/invsr/secret/engine.py line 3")

    monkeypatch.setattr(served.upscaler, "upscale_file", broken)
    caplog.set_level(logging.ERROR, logger="invsr_pl.demo")
    message = _app_error(client, handle_file(_image(tmp_path / "a.png", 8, 8)))
    assert message == "internal error (TypeError); the server log has the details"
    assert "secret/engine.py" in caplog.text  # the details are on the server, not on the page


def test_a_job_cancelled_by_its_client_stops(
    served: Served, client, slow_unet: CallCounter, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gradio_client import handle_file
    from gradio_client.utils import Status

    caplog.set_level(logging.INFO, logger="invsr_pl.demo")
    job = client.submit(
        handle_file(_image(tmp_path / "slow.png", 256, 256)), chopping_size=16, api_name="/upscale"
    )
    deadline = time.monotonic() + 40
    while slow_unet.calls == 0 and time.monotonic() < deadline:  # running, not just queued
        time.sleep(0.1)
    assert job.status().code in (Status.PROCESSING, Status.ITERATING) or slow_unet.calls > 0
    job.cancel()  # gradio_client's /cancel
    while "job cancelled" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "job cancelled" in caplog.text
    calls = slow_unet.calls
    time.sleep(4 * SLOW_S)
    assert slow_unet.calls <= calls + 1 < 121


def test_budget_options_are_checked_and_their_help_states_the_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from invsr_pl.demo.budget import DEFAULT_MAX_STEPS

    help_text = " ".join(demo_cli.build_parser().format_help().split())
    assert f"most timesteps per image; unset (None): {DEFAULT_MAX_STEPS}" in help_text
    for flag, value, message in [
        ("--max-steps", "0", "--max-steps must be >= 1"),
        ("--max-patches", "0", "--max-patches must be >= 1"),
        ("--max-work", "0", "--max-work must be > 0"),
        ("--max-work", "inf", "--max-work must be > 0"),
        ("--max-job-seconds", "-1", "--max-job-seconds must be >= 0"),
    ]:
        assert demo_cli.main(["--backbone", "tiny", flag, value]) == 2  # before any model is built
        assert message in capsys.readouterr().err
