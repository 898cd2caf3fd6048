"""The inference path on the SDXL-Turbo and SD3.5 tiny twins: ``invsr-sr`` smoke mode writes exactly x4, a
``train.py`` checkpoint on each twin exports and ``InvSRPipeline.from_pretrained`` of the export reproduces
``invsr-sr`` on it exactly, a noise predictor for other latents is refused, and the demo's ``/upscale``
serves each twin (in process, through ``gradio_client``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from invsr_pl.cli.export import main as export_main
from invsr_pl.cli.sr import build_models
from invsr_pl.cli.sr import main as sr_main
from invsr_pl.models.builtin import TINY_SD35_TURBO, TINY_SDXL_TURBO
from invsr_pl.pipelines import DEFAULT_SEED, InvSRPipeline
from invsr_pl.utils.images import read_image, write_image

REPO_ROOT = Path(__file__).resolve().parents[2]
TWINS = (TINY_SDXL_TURBO, TINY_SD35_TURBO)
LATENT_CHANNELS = {TINY_SDXL_TURBO: 4, TINY_SD35_TURBO: 16}


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(3, h, w) float image in [0, 1]: a gradient with some noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return (0.8 * torch.stack([yy, xx, (yy + xx) / 2]) + 0.2 * torch.rand(3, h, w, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a 20x12 image and an odd 13x7 one (padded to the sampler's modulus)."""
    folder = tmp_path_factory.mktemp("inputs")
    write_image(folder / "a.png", _image(12, 20))
    write_image(folder / "odd.png", _image(7, 13, seed=1))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``exported(twin)``: a 2-iteration ``train.py experiment=quickstart`` run on the twin, exported by
    ``invsr-export`` (built once per twin)."""
    done: dict[str, Path] = {}

    def _make(name: str) -> Path:
        if name not in done:
            root = tmp_path_factory.mktemp(f"train_{name}")
            cmd = [
                sys.executable, "train.py", "experiment=quickstart", f"model/backbone={name}",
                "model.max_iterations=2", f"paths.output_dir={root / 'run'}",
                f"paths.log_dir={root / 'logs'}",
            ]  # fmt: skip
            env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
            result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
            ckpt = root / "run" / "checkpoints" / "last.ckpt"
            assert export_main([str(ckpt), str(root / "export")]) == 0
            done[name] = root / "export"
        return done[name]

    return _make


def _sizes(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: tuple(read_image(p)[0].shape[-2:]) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("name", TWINS)
def test_smoke_mode_writes_exactly_4x(
    name: str, inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [str(inputs), "--backbone", name, "--device", "cpu", "--no-progress"]
    assert sr_main([*base, "-o", str(tmp_path / "one")]) == 0
    err = capsys.readouterr().err
    assert "smoke mode" in err and f"--backbone {name} without" in err
    assert _sizes(tmp_path / "one") == {"a.png": (48, 80), "odd.png": (28, 52)}
    # three steps in chopped 16-px patches
    assert sr_main([*base, "-o", str(tmp_path / "three"), "--steps", "3", "--chopping-size", "16"]) == 0
    assert _sizes(tmp_path / "three") == {"a.png": (48, 80), "odd.png": (28, 52)}


@pytest.mark.parametrize("name", TWINS)
def test_export_from_pretrained_reproduces_invsr_sr(
    name: str, exported: Callable[[str], Path], inputs: Path, tmp_path: Path
) -> None:
    folder = exported(name)
    # no --backbone: the twin recorded with the export, rebuilt as trained
    args = [str(inputs), "-o", str(tmp_path / "sr"), "--noise-predictor", str(folder), "--device", "cpu"]
    assert sr_main([*args, "--no-progress", "--steps", "3"]) == 0
    pipe = InvSRPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.base_model == name and pipe.noise_predictor.latent_channels == LATENT_CHANNELS[name]
    assert type(pipe.backbone()).__name__ == (
        "FrozenSD35Turbo" if name == TINY_SD35_TURBO else "FrozenSDXLTurbo"
    )
    for src in sorted(inputs.iterdir()):
        image = read_image(src)[0]
        out = pipe(image, num_inference_steps=3, generator=DEFAULT_SEED, output_type="pt").images[0]
        write_image(tmp_path / src.name, out)
        assert torch.equal(read_image(tmp_path / src.name)[0], read_image(tmp_path / "sr" / src.name)[0])
    # the export with the backbone copied in is the same pipeline
    full = tmp_path / "full"
    ckpt = next(folder.parent.glob("run/checkpoints/last.ckpt"))
    assert export_main([str(ckpt), str(full), "--with-backbone"]) == 0
    assert (full / ("transformer" if name == TINY_SD35_TURBO else "unet")).is_dir()
    copy = InvSRPipeline.from_pretrained(full)
    copy.set_progress_bar_config(disable=True)
    lr = read_image(inputs / "a.png")[0]
    assert torch.equal(copy(lr, output_type="pt").images, pipe(lr, output_type="pt").images)


def test_a_noise_predictor_for_other_latents_is_refused(
    exported: Callable[[str], Path], inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sdxl_np = exported(TINY_SDXL_TURBO)  # 4-channel latents
    code = sr_main([
        str(inputs), "-o", str(tmp_path), "--noise-predictor", str(sdxl_np), "--backbone", TINY_SD35_TURBO,
        "--allow-backbone-mismatch", "--device", "cpu",
    ])  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("invsr-sr: error")]
    assert code == 2 and len(lines) == 1, lines
    assert "4-channel latents" in lines[0] and "16 latent channels" in lines[0]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("model_id", "channels", "expected"),
    [
        ("stabilityai/sdxl-turbo", 4, "SDXL-Turbo weights for 'stabilityai/sdxl-turbo' could not be loaded"),
        ("stabilityai/stable-diffusion-3.5-large-turbo", 16, "gated"),
    ],
)
def test_missing_real_weights_name_the_family_model(
    model_id: str,
    channels: int,
    expected: str,
    inputs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from invsr_pl.models.tiny import tiny_noise_predictor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = tmp_path / "np"
    tiny_noise_predictor(seed=0, latent_channels=channels).save_pretrained(weights)
    empty_cache = str(tmp_path / "hf")  # nothing is found locally, and the hub is offline
    args = [str(inputs), "-o", str(tmp_path / "out"), "--noise-predictor", str(weights), "--device", "cpu"]
    code = sr_main([*args, "--backbone", model_id, "--cache-dir", empty_cache])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("invsr-sr: error")]
    assert code == 2 and len(lines) == 1, lines
    assert expected in lines[0] and f"`hf download {model_id} --local-dir weights/" in lines[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", TWINS)
def test_demo_upscale_serves_the_twin(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
    from gradio_client import Client, handle_file

    from invsr_pl.cli import demo as demo_cli
    from invsr_pl.demo.app import build_app, launch
    from invsr_pl.demo.engine import Upscaler

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    args = demo_cli.build_parser().parse_args(["--backbone", name, "--device", "cpu"])
    backbone, noise_predictor, smoke, device = build_models(args)  # what invsr-demo builds
    assert smoke and noise_predictor.latent_channels == backbone.latent_channels == LATENT_CHANNELS[name]
    upscaler = Upscaler(
        backbone, noise_predictor, device, smoke=smoke, backbone_name=name, weights_name="none"
    )
    port = _free_port()
    app = build_app(upscaler, url=f"http://127.0.0.1:{port}/")
    try:
        url = launch(app, port=port, block=False)
        src = tmp_path / "in.png"
        write_image(src, _image(12, 20), torch.full((1, 12, 20), 0.5), bit_depth=16)
        (before, after), png, info = Client(url, verbose=False).predict(
            handle_file(src), chopping_size=0, api_name="/upscale"
        )
        image, alpha, bit_depth = read_image(png)
        assert image.shape == (3, 48, 80) and alpha is not None and bit_depth == 16
        assert "20x12 -> 80x48" in info
    finally:
        app.close()
        upscaler.close()
