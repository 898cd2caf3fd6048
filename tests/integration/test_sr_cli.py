"""``invsr-sr`` end to end on a folder of mixed images with the tiny backbone (offline smoke mode)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tifffile
import torch
from PIL import Image

from invsr_pl.cli.sr import main
from invsr_pl.models.noise_predictor import NoisePredictor
from invsr_pl.models.tiny import TINY_NOISE_PREDICTOR
from invsr_pl.utils.images import read_image


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """RGB jpg (50 px), RGBA, 16-bit RGB PNG, 16-bit gray TIFF, a corrupt file, a text file."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(skimage.data.astronaut()[:50, :50]).save(folder / "astro.jpg", quality=95)
    coffee = skimage.data.coffee()[:60, :90]
    alpha = np.linspace(0, 255, 90, dtype=np.uint8)[None].repeat(60, 0)
    Image.fromarray(np.dstack([coffee, alpha])).save(folder / "rgba.png")
    rgb16 = (skimage.data.astronaut()[100:148, 100:164].astype(np.uint16) * 257)[:, :, ::-1]  # BGR for OpenCV
    import cv2

    cv2.imwrite(str(folder / "deep.png"), np.ascontiguousarray(rgb16))
    tifffile.imwrite(folder / "gray16.tif", skimage.data.camera()[:52, :40].astype(np.uint16) * 257)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / "notes.txt").write_text("ignored")
    return folder


SIZES = {"astro": (50, 50), "rgba": (60, 90), "deep": (48, 64), "gray16": (52, 40)}


def _run_folder(
    folder: Path, out: Path, sizes: dict[str, tuple[int, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [str(folder), "-o", str(out), "--backbone", "tiny", "--chopping-size", "32", "--chopping-batch", "16"]
        + ["--no-progress", "--color-fix", "wavelet"]
    )
    err = capsys.readouterr().err
    assert code == 1  # the corrupt file fails, the others are written
    assert "broken.jpg" in err and "smoke mode" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.png" for name in sizes)
    for name, (h, w) in sizes.items():
        image, alpha, bit_depth = read_image(out / f"{name}.png")
        assert image.shape == (3, 4 * h, 4 * w), name
        assert (alpha is not None) == (name == "rgba"), name
        assert bit_depth == (16 if name in ("deep", "gray16") else 8), name
    _, alpha, _ = read_image(out / "rgba.png")
    assert (
        alpha is not None and alpha[0, :, :8].mean() < 0.05 and alpha[0, :, -8:].mean() > 0.95
    )  # aligned ramp


def test_folder_of_mixed_images(
    mixed_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run_folder(mixed_folder, tmp_path / "out", SIZES, capsys)


@pytest.mark.slow
def test_folder_with_a_700px_image(
    mixed_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a 50 x 700 grey strip: 129 patches at chopping size 32 (~15 s on a loaded 2-core CPU)
    Image.fromarray(np.tile(skimage.data.camera()[:50], (1, 2))[:, :700]).save(mixed_folder / "strip.png")
    _run_folder(mixed_folder, tmp_path / "out", {**SIZES, "strip": (50, 700)}, capsys)


def test_single_file_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "a.png"
    Image.fromarray(skimage.data.coffee()[:40, :36]).save(src)
    args = [
        "--backbone",
        "tiny",
        "--chopping-size",
        "32",
        "--timesteps",
        "200,100",
        "--no-progress",
        "--seed",
        "7",
    ]
    assert main([str(src), "-o", str(tmp_path / "o1"), *args]) == 0
    assert main([str(src), "-o", str(tmp_path / "o2"), *args]) == 0
    first, second = read_image(tmp_path / "o1" / "a.png").image, read_image(tmp_path / "o2" / "a.png").image
    assert first.shape == (3, 160, 144) and torch.equal(first, second)


def test_missing_backbone_weights_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "a.png"
    Image.fromarray(skimage.data.coffee()[:32, :32]).save(src)
    weights = tmp_path / "np"  # a valid (tiny) noise predictor: it is loaded before the backbone
    NoisePredictor(**TINY_NOISE_PREDICTOR).save_pretrained(weights)
    for backbone in (
        str(tmp_path / "no-such-sd-turbo"),
        "stabilityai/sd-turbo",
    ):  # the hub is offline in tests
        code = main(
            [str(src), "-o", str(tmp_path / "out"), "--backbone", backbone, "--noise-predictor", str(weights)]
        )
        err = capsys.readouterr().err
        assert code == 2 and "could not be loaded" in err and "Traceback" not in err
    code = main([str(src), "-o", str(tmp_path / "out"), "--backbone", str(tmp_path / "nowhere")])
    assert code == 2 and "--noise-predictor is required" in capsys.readouterr().err


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path), "-o", str(tmp_path / "o"), "--timesteps", "100,200"])
    assert exc.value.code == 2 and "strictly descending" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "--backbone", "tiny"]) == 2
    assert (
        main([str(tmp_path), "-o", str(tmp_path / "o"), "--backbone", "tiny"]) == 2
    )  # no images in the folder
    err = capsys.readouterr().err
    assert "does not exist" in err and "no images" in err


def test_trained_noise_predictor_folder_is_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    NoisePredictor(**TINY_NOISE_PREDICTOR).save_pretrained(tmp_path / "np")
    src = tmp_path / "a.png"
    Image.fromarray(skimage.data.coffee()[:32, :32]).save(src)
    for weights in (tmp_path / "np", tmp_path / "np" / "diffusion_pytorch_model.safetensors"):
        code = main(
            [str(src), "-o", str(tmp_path / "out"), "--backbone", "tiny", "--noise-predictor", str(weights)]
        )
        assert code == 0 and "smoke mode" not in capsys.readouterr().err
    assert read_image(tmp_path / "out" / "a.png").image.shape == (3, 128, 128)


def test_compile_flag_compiles_the_loaded_networks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import invsr_pl.utils.compile as compile_module

    seen = []
    monkeypatch.setattr(
        compile_module, "compile_for_inference", lambda bb, np_, mode="default": seen.append((bb, np_))
    )
    src = tmp_path / "a.png"
    Image.fromarray(skimage.data.coffee()[:32, :32]).save(src)
    args = [str(src), "-o", str(tmp_path / "out"), "--backbone", "tiny", "--no-progress", "--compile"]
    assert main(args) == 0
    assert len(seen) == 1 and isinstance(seen[0][1], NoisePredictor)


# ---------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        (["--tile", "64"], ["--chopping-size", "64"]),
        (["--chopping_size", "64"], ["--chopping-size", "64"]),
        (["--fp32"], ["--dtype", "float32"]),
        (["--in_path", "in"], ["-i", "in"]),
        (["--out_path", "o"], ["-o", "o"]),
        (["--num_steps", "3"], ["--steps", "3"]),
        (["--chopping_bs", "2"], ["--chopping-batch", "2"]),
        (["--color_fix", "wavelet"], ["--color-fix", "wavelet"]),
        (["--color_fix", ""], ["--color-fix", "none"]),
        (["--sd_path", "weights/sd"], ["--backbone", "weights/sd"]),
        (["--started_ckpt_path", "np.pth"], ["--noise-predictor", "np.pth"]),
        (["-s", "2"], ["--outscale", "2"]),
        (["-t", "200", "100"], ["--timesteps", "200,100"]),
        (["--timesteps", "200,", "100"], ["-t", "200", "100"]),
    ],
)
def test_compatibility_flags_are_the_flags_they_name(alias: list[str], canonical: list[str]) -> None:
    """Real-ESRGAN's and the official InvSR script's spellings give exactly the namespace of ours."""
    from invsr_pl.cli.sr import _settle, build_parser

    def parsed(extra: list[str]) -> dict:
        args = build_parser().parse_args(["-o", "o", *extra])
        _settle(args)
        return vars(args)

    assert parsed(alias) == parsed(canonical)


def test_timesteps_and_steps_must_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The official script takes both ``--num_steps 2 --timesteps 200 100``; a disagreement is refused."""
    src = tmp_path / "a.png"
    Image.fromarray(skimage.data.coffee()[:8, :8]).save(src)
    assert main([str(src), "-o", str(tmp_path / "o"), "--num_steps", "3", "-t", "200", "100"]) == 2
    assert "--steps 3 disagrees with the 2 timesteps" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # INPUT after the timesteps is read as one of them: a clear hint
        main(["-t", "200", "100", str(src), "-o", str(tmp_path / "o")])
    assert "give INPUT before the timesteps" in capsys.readouterr().err


def test_official_script_flags_run_like_ours(tmp_path: Path) -> None:
    src = tmp_path / "a.png"
    Image.fromarray(skimage.data.coffee()[:24, :16]).save(src)
    ours = ["-i", str(src), "-o", str(tmp_path / "ours"), "--backbone", "tiny", "--steps", "2"]
    ours += ["--timesteps", "200,100", "--chopping-size", "16", "--chopping-batch", "2", "--no-progress"]
    theirs = ["--in_path", str(src), "--out_path", str(tmp_path / "theirs"), "--sd_path", "tiny"]
    theirs += ["--num_steps", "2", "-t", "200", "100", "--tile", "16", "--chopping_bs", "2", "--no-progress"]
    assert main(ours) == 0 and main(theirs) == 0
    first, second = (
        read_image(tmp_path / "ours" / "a.png").image,
        read_image(tmp_path / "theirs" / "a.png").image,
    )
    assert first.shape == (3, 96, 64) and torch.equal(first, second)


def test_suffix_and_ext(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--suffix`` names ``<stem>_<suffix>``; ``--ext auto`` keeps each input's format, ``--ext jpg`` writes
    jpg except for images with alpha (png, said on stderr); every image's time and the total are printed."""
    folder = tmp_path / "in"
    folder.mkdir()
    coffee = skimage.data.coffee()[:16, :16]
    Image.fromarray(np.dstack([coffee, np.full((16, 16), 128, np.uint8)])).save(folder / "alpha.png")
    Image.fromarray(coffee).save(folder / "photo.jpg", quality=95)
    tiny = ["--backbone", "tiny", "--chopping-size", "16", "--no-progress"]
    assert main([str(folder), "-o", str(tmp_path / "auto"), "--suffix", "x4", "--ext", "auto", *tiny]) == 0
    err = capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == ["alpha_x4.png", "photo_x4.jpg"]
    assert re.search(r"photo_x4\.jpg: 16x16 -> 64x64 in \d+\.\d\d s", err), err
    assert re.search(r"wrote 2 of 2 image\(s\) to .* in \d+\.\d s in all, \d+\.\d\d s per image", err), err
    assert Image.open(tmp_path / "auto" / "photo_x4.jpg").format == "JPEG"
    assert main([str(folder), "-o", str(tmp_path / "jpg"), "--ext", "jpg", *tiny]) == 0
    assert (
        "alpha.png has an alpha channel, which jpg cannot hold: writing it as png" in capsys.readouterr().err
    )
    assert sorted(p.name for p in (tmp_path / "jpg").iterdir()) == ["alpha.png", "photo.jpg"]
    assert read_image(tmp_path / "jpg" / "alpha.png").alpha is not None


def test_output_name_rule() -> None:
    """The rule the demo shares: ``<stem>[_p<page>][_<suffix>].<ext>``, by default ``<stem>.png``."""
    from invsr_pl.cli.sr import output_name

    assert output_name("a") == "a.png"
    assert output_name("a_jpg", "jpg", "x4", page=2) == "a_jpg_p2_x4.jpg"
    with pytest.raises(SystemExit):
        main(["a.png", "-o", "o", "--suffix", "../up"])  # a suffix never leaves the folder


def test_color_fix_choices_are_the_samplers() -> None:
    from invsr_pl.cli.sr import COLOR_FIX_CHOICES
    from invsr_pl.sampling.color_fix import COLOR_FIX_METHODS

    assert COLOR_FIX_CHOICES == COLOR_FIX_METHODS


def test_help_imports_no_heavy_library() -> None:
    """``invsr-sr --help`` (issue 24: under 5 s) must not wait on torch, diffusers or the models."""
    code = (
        "import sys, contextlib, io\n"
        "from invsr_pl.cli.sr import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--help'])\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'invsr_pl.models.sd_turbo', 'invsr_pl.pipelines')\n"
        "heavy = [m for m in heavy if m in sys.modules]  # (models.builtin, the names only, is torch-free)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_default_seed_is_the_pipelines() -> None:
    """invsr-sr's --seed default and InvSRPipeline's generator=None draw the same noise (one DEFAULT_SEED)."""
    from invsr_pl.cli import sr
    from invsr_pl.utils.seeding import DEFAULT_SEED

    assert sr.build_parser().parse_args(["in.png", "-o", "out"]).seed == DEFAULT_SEED
