"""``invsr-sr`` under name clashes, odd files, bad weight files and out-of-memory (tiny backbone, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tifffile
import torch
from PIL import Image
from reliability_helpers import REPO_ROOT, bad_weight_files

from invsr_pl.cli import sr
from invsr_pl.cli.sr import main
from invsr_pl.models.tiny import tiny_noise_predictor
from invsr_pl.sampling.oom import OutOfMemoryFallbackError, sample_with_fallback
from invsr_pl.utils.images import read_image

TINY = ["--backbone", "tiny", "--chopping-size", "32", "--no-progress"]


def _photo(path: Path, h: int = 24, w: int = 20) -> Path:
    Image.fromarray(skimage.data.astronaut()[100 : 100 + h, 120 : 120 + w]).save(path)
    return path


def _no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("models were loaded before the argument checks")

    monkeypatch.setattr(sr, "build_models", refuse)


# ---------------------------------------------------------------------------------------------- names
def test_output_folder_equal_to_input_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "a.png")
    Image.fromarray(skimage.data.coffee()[:20, :20]).save(folder / "a.jpg")
    _photo(folder / "b.png")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    _no_model_loading(monkeypatch)
    assert main([str(folder), "-o", str(folder), *TINY]) == 2
    err = capsys.readouterr().err
    assert "would overwrite the input" in err and "b.png" in err  # b.png -> b.png is the clash
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written, nothing lost


def test_shared_stems_keep_both_and_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "a.png", 24, 20)
    Image.fromarray(skimage.data.coffee()[:16, :28]).save(folder / "a.jpg")
    out = tmp_path / "out"
    assert main([str(folder), "-o", str(out), *TINY]) == 0
    err = capsys.readouterr().err
    assert "a_png.png" in err and "a_jpg.png" in err
    assert sorted(p.name for p in out.iterdir()) == ["a_jpg.png", "a_png.png"]
    assert read_image(out / "a_png.png").image.shape == (3, 96, 80)
    assert read_image(out / "a_jpg.png").image.shape == (3, 64, 112)


def test_outputs_on_one_name_are_refused_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "a.jpg", "a_jpg.png"):  # a.jpg -> a_jpg.png, and a_jpg.png -> a_jpg.png
        _photo(folder / name)
    _no_model_loading(monkeypatch)
    assert main([str(folder), "-o", str(tmp_path / "out"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "would both be written to" in err and "a_jpg.png" in err
    assert not (tmp_path / "out").exists()


def test_output_pointing_at_a_file_fails_before_models_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _photo(tmp_path / "a.png")
    target = tmp_path / "result.png"
    target.write_bytes(b"keep me")
    _no_model_loading(monkeypatch)
    assert main([str(src), "-o", str(target), *TINY]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me"


# ---------------------------------------------------------------------------------------------- odd files
def test_odd_files_are_read_right_or_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    gray = skimage.data.camera()[200:224, 200:220].astype(np.float32) / 255.0
    tifffile.imwrite(folder / "float_gray.tif", gray)  # Pillow alone reads this as all black
    tifffile.imwrite(folder / "float_hdr.tif", gray * 40.0)  # not [0, 1]: refused, named
    with tifffile.TiffWriter(folder / "pages.tif") as tif:  # three pages of different content
        for k in range(3):
            tif.write(skimage.data.camera()[k * 30 : k * 30 + 16, :24])
    frames = [Image.fromarray(np.full((16, 16, 3), 60 * k, np.uint8)) for k in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])  # not an input type
    os.symlink(folder / "loop_b.png", folder / "loop_a.png")
    os.symlink(folder / "loop_a.png", folder / "loop_b.png")
    out = tmp_path / "out"

    loaded = read_image(folder / "float_gray.tif")
    assert loaded.bit_depth == 16 and torch.allclose(loaded.image[0], torch.from_numpy(gray))
    # the wavelet colour fix carries the LR's low frequencies, so even random tiny networks keep the level
    assert main([str(folder), "-o", str(out), *TINY, "--color-fix", "wavelet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    failed = err.split("failed:")[-1]
    for name in ("float_hdr.tif", "loop_a.png", "loop_b.png"):
        assert name in failed, name
    assert "symbolic-link loop" in failed and "[0, 1]" in failed
    assert "ignored 1 non-image file(s): anim.gif" in err
    assert "pages.tif has 3 frames" in err

    assert sorted(p.name for p in out.iterdir()) == [
        "float_gray.png",
        "pages_p1.png",
        "pages_p2.png",
        "pages_p3.png",
    ]
    result = read_image(out / "float_gray.png")
    assert result.bit_depth == 16 and result.image.shape == (3, 96, 80)
    assert abs(result.image.mean().item() - float(gray.mean())) < 0.1  # not black
    pages = [read_image(out / f"pages_p{k}.png").image for k in (1, 2, 3)]
    assert all(p.shape == (3, 64, 96) for p in pages)
    assert not torch.equal(pages[0], pages[1])  # each page, not the first one three times


def test_outscale_and_input_option(tmp_path: Path) -> None:
    src = _photo(tmp_path / "a.png", 24, 20)
    for scale, (h, w) in {"2": (48, 40), "3": (72, 60), "1.5": (36, 30)}.items():
        out = tmp_path / f"x{scale}"
        assert main(["-i", str(src), "-o", str(out), "--outscale", scale, *TINY]) == 0
        assert read_image(out / "a.png").image.shape == (3, h, w), scale
    with pytest.raises(SystemExit):
        main(["-i", str(src), "-o", str(tmp_path / "o"), "--outscale", "0", *TINY])


def test_scale_comes_from_the_noise_predictor(tmp_path: Path) -> None:
    tiny_noise_predictor(scale=2, seed=0).save_pretrained(tmp_path / "np_x2")
    src = _photo(tmp_path / "a.png", 24, 20)
    args = [str(src), "-o", str(tmp_path / "out"), "--noise-predictor", str(tmp_path / "np_x2"), *TINY]
    assert main(args) == 0
    assert read_image(tmp_path / "out" / "a.png").image.shape == (3, 48, 40)


# ---------------------------------------------------------------------------------------------- weights
def test_bad_noise_predictor_files_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _photo(tmp_path / "a.png")
    for kind, path in bad_weight_files(tmp_path / "w").items():
        code = main([str(src), "-o", str(tmp_path / "out"), "--noise-predictor", str(path), *TINY])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, kind
        assert len(err) == 1 and str(path) in err[0] and "Traceback" not in err[0], (kind, err)
    assert not (tmp_path / "w" / "PWNED").exists()  # the pickle's code never ran
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- OOM
def test_out_of_memory_falls_back_to_smaller_batches_then_patches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.cuda.OutOfMemoryError`` injected into the sampler's network call while the batch of patches
    is larger than 1 or the patches are larger than 32 LR pixels: the run still writes exactly 4x."""
    from invsr_pl.sampling.sampler import InvSRSampler

    original = InvSRSampler.sample_patch
    calls = {"oom": 0}

    def tight_memory(self, patches, *args, **kwargs):
        if patches.shape[0] > 1 or patches.shape[-1] > 32:
            calls["oom"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, patches, *args, **kwargs)

    monkeypatch.setattr(InvSRSampler, "sample_patch", tight_memory)
    src = _photo(tmp_path / "a.png", 40, 56)
    args = [str(src), "-o", str(tmp_path / "out"), "--backbone", "tiny", "--no-progress"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([*args, "--chopping-size", "64", "--chopping-batch", "4"])
    assert code == 0 and calls["oom"] >= 3
    messages = [str(w.message) for w in caught if "out of memory" in str(w.message)]
    assert any("chopping batch 1" in m for m in messages) and any("chopping size 32" in m for m in messages)
    assert read_image(tmp_path / "out" / "a.png").image.shape == (3, 160, 224)


def test_out_of_memory_at_the_smallest_setting_is_reported() -> None:
    class AlwaysOOM:
        chopping_size, chopping_batch, modulus = 32, 1, 16

        def __call__(self, lq, generator=None):
            raise torch.cuda.OutOfMemoryError("injected")

    with pytest.raises(OutOfMemoryFallbackError, match="chopping batch 1"):
        sample_with_fallback(AlwaysOOM(), torch.rand(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- terminal
@pytest.mark.slow
def test_no_dependency_warning_in_the_terminal(tmp_path: Path) -> None:
    """bitsandbytes (pulled in by diffusers/transformers when a real backbone loads) logs a kernel warning."""
    src = _photo(tmp_path / "a.png")
    tiny_noise_predictor(seed=0).save_pretrained(tmp_path / "np")
    cmd = [sys.executable, "-m", "invsr_pl.cli.sr", str(src), "-o", str(tmp_path / "out")]
    cmd += ["--backbone", str(tmp_path / "no-sd-turbo"), "--noise-predictor", str(tmp_path / "np")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "gemm_4bit" not in result.stderr and "kernels-community" not in result.stderr
    assert "could not be loaded" in result.stderr
