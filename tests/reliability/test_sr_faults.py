"""``invsr-sr`` under name clashes, odd files, bad weight files and out-of-memory (tiny backbone, CPU)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import skimage.data
import tifffile
import torch
from PIL import Image
from reliability_helpers import REPO_ROOT, bad_weight_files, forged_png

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


# ---------------------------------------------------------------------------------------------- size limits
def test_bomb_and_oversize_images_fail_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 20: a 40000x40000 PNG (a few hundred bytes) beside good images used to sink the whole batch
    with a DecompressionBombError traceback; now it, and anything above --max-megapixels, fails by name."""
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "good.png", 24, 20)  # 480 pixels
    _photo(folder / "large.png", 40, 56)  # 2240 pixels: above the 0.002 MP limit below
    forged_png(folder / "bomb.png", 40000, 40000)
    out = tmp_path / "out"
    assert main([str(folder), "-o", str(out), *TINY, "--max-megapixels", "0.002"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DecompressionBombError" not in err
    failed = err.split("2 failed:")[-1]
    assert "bomb.png is 40000x40000 (1600 MP), above the limit of 0.002 MP" in failed
    assert "large.png is 56x40 (0.00224 MP)" in failed and "--max-megapixels" in failed
    assert sorted(p.name for p in out.iterdir()) == ["good.png"]


def test_default_limit_refuses_the_bomb_while_planning_and_0_lifts_it(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "good.png")
    forged_png(folder / "bomb.png", 40000, 40000)
    pillow_limit = Image.MAX_IMAGE_PIXELS
    for flags, refused in (
        ([], True),
        (["--max-megapixels", "0"], False),
        (["--max-megapixels", "inf"], False),
    ):
        args = sr.build_parser().parse_args([str(folder), "-o", str(tmp_path / "out"), *flags])
        sr._settle(args)
        with sr._own_pixel_limit():  # the command's limit replaces Pillow's (0 really means none)
            plan = sr._plan(folder, tmp_path / "out", max_pixels=args.max_pixels)
        assert [p.name for p, _ in plan.failed] == (["bomb.png"] if refused else []), flags
        assert len(plan.jobs) == (1 if refused else 2), flags
        if refused:
            assert "40000x40000 (1600 MP), above the limit of 100 MP" in plan.failed[0][1]
    assert pillow_limit == Image.MAX_IMAGE_PIXELS  # restored for the rest of the process


def test_any_error_while_planning_is_that_files_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _photo(folder / "a.png")
    _photo(folder / "b.png")
    real = sr.probe_image

    def flaky(path: Path, max_pixels: int | None = None):
        if path.name == "b.png":
            raise RuntimeError("disk hiccup")
        return real(path, max_pixels)

    monkeypatch.setattr(sr, "probe_image", flaky)
    plan = sr._plan(folder, tmp_path / "out")
    assert plan.failed == [(folder / "b.png", "RuntimeError: disk hiccup")]
    assert [job.dst.name for job in plan.jobs] == ["a.png"]


# ---------------------------------------------------------------------------------------------- output folder
def _as_non_root(run: Callable[[], int]) -> tuple[int, str]:
    """``run()``'s exit code and stderr as a non-root user: as ourselves when the tests are not root, else in
    a forked child that dropped to ``nobody`` (root may write into read-only folders, so only a non-root
    process shows the refusal; the interpreter under /root is not reachable for a fresh non-root process,
    so the child keeps this one)."""
    if os.geteuid() != 0:
        buffer = io.StringIO()
        with contextlib.redirect_stderr(buffer):
            return run(), buffer.getvalue()
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root and there is no 'nobody' user to drop to")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            os.close(read_end)
            sys.stderr = open(write_end, "w")  # noqa: SIM115 - closed by os._exit
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            code = run()
        except BaseException:  # noqa: BLE001 - reported to the parent through the pipe
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with open(read_end) as pipe:
        err = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_read_only_output_folder_is_refused_before_models_load(monkeypatch: pytest.MonkeyPatch) -> None:
    base = Path(tempfile.mkdtemp(prefix="invsr-sr-ro-"))  # in /tmp, reachable for the non-root user
    try:
        base.chmod(0o755)
        (base / "in").mkdir(mode=0o755)
        _photo(base / "in" / "a.png").chmod(0o644)
        for name, mode in (("ro", 0o555), ("rw", 0o777)):
            (base / name).mkdir()
            (base / name).chmod(mode)

        def models_load_now(*_: object) -> None:
            raise sr.SetupError("the models would load now")

        monkeypatch.setattr(sr, "build_models", models_load_now)
        for out, expected in (
            ("ro", "is not writable (read-only)"),
            ("ro/new/deeper", "above"),  # the nearest existing folder decides
            ("rw", "the models would load now"),  # the same user passes the check where it may write
        ):
            code, err = _as_non_root(lambda out=out: main([str(base / "in"), "-o", str(base / out), *TINY]))
            assert code == 2 and expected in err and "Traceback" not in err, (out, err)
        assert list((base / "ro").iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_keeps_finished_outputs_and_leaves_no_partial_file(tmp_path: Path) -> None:
    """SIGINT in the middle of a 20-image run: exit 130, every finished output whole, no temporary file.
    Each PNG save is slowed (0.4 s after writing the temporary file) so the signal often lands mid-write."""
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(20):
        _photo(folder / f"img{k:02d}.png")
    out = tmp_path / "out"
    driver = (
        "import sys, time\n"
        "from PIL import Image\n"
        "save = Image.Image.save\n"
        "def slow_save(self, *args, **kwargs):\n"
        "    save(self, *args, **kwargs)\n"
        "    time.sleep(0.4)\n"
        "Image.Image.save = slow_save\n"
        "from invsr_pl.cli.sr import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-c", driver, str(folder), "-o", str(out), *TINY]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len([p for p in out.glob("*.png") if not p.name.startswith(".")]) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no temporary (partial) file
    assert 3 <= len(names) < 20, names
    for name in names:
        assert read_image(out / name).image.shape == (3, 96, 80), name
    assert f"wrote {len(names)} of 20 image(s)" in err and "interrupted" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- messages
def _assert_hints_exist(message: str) -> None:
    """Issue 26: flags named are invsr-sr's own, commands named are installed, no Hydra keys."""
    commands = re.findall(r"`([^`]+)`", message)
    prose = re.sub(r"`[^`]+`", "", message)
    known = {option for action in sr.build_parser()._actions for option in action.option_strings}
    flags = set(re.findall(r"(?<![\w-])--?[a-zA-Z][\w-]*", prose))
    assert flags <= known, flags - known
    assert "model.backbone" not in message and "huggingface-cli" not in message, message
    for command in commands:
        assert shutil.which(command.split()[0]), command


def test_hints_name_flags_and_commands_that_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _photo(tmp_path / "a.png")
    tiny_noise_predictor(seed=0).save_pretrained(tmp_path / "np")
    weights = ["--noise-predictor", str(tmp_path / "np")]
    for argv in (
        ["--backbone", str(tmp_path / "no-sd-turbo"), *weights],  # a folder that is not there
        ["--backbone", "stabilityai/sd-turbo", *weights],  # the hub id, offline in tests
        [],  # the default backbone needs a noise predictor
    ):
        with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):
            assert main([str(src), "-o", str(tmp_path / "out"), *argv]) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "hf download" in lines[0], lines
        _assert_hints_exist(lines[0])


# ---------------------------------------------------------------------------------------------- provenance
def test_recorded_backbone_is_the_default_and_another_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 26: weights that record their backbone (train.py checkpoints, exports) get it without
    --backbone, rebuilt as trained (here the random tiny twin with seed 3); another one is refused in one
    line unless --allow-backbone-mismatch."""
    import invsr_pl.models.tiny as tiny

    weights = tmp_path / "np"
    tiny_noise_predictor(seed=0).save_pretrained(weights)
    config = {"_target_": "invsr_pl.models.tiny.build_tiny_sd_turbo", "seed": 3, "cross_attention_dim": 32}
    record = {"format": 1, "backbone": {"name": "tiny", "config": config, "revision": None}, "scale": 4}
    (weights / "invsr_provenance.json").write_text(json.dumps(record))
    built, real = [], tiny.build_tiny_sd_turbo
    monkeypatch.setattr(tiny, "build_tiny_sd_turbo", lambda **kw: built.append(kw) or real(**kw))
    base = [str(_photo(tmp_path / "a.png")), "-o", str(tmp_path / "out"), "--noise-predictor", str(weights)]
    base += ["--chopping-size", "32", "--no-progress"]

    assert main(base) == 0
    assert "using the backbone 'tiny' recorded with" in capsys.readouterr().err
    assert [(kw["seed"], kw["cross_attention_dim"]) for kw in built] == [(3, 32)]
    assert main([*base, "--backbone", "tiny_trained"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "trained with the backbone 'tiny', not 'tiny_trained'" in lines[0], lines
    _assert_hints_exist(lines[0])
    assert main([*base, "--backbone", "tiny_trained", "--allow-backbone-mismatch"]) == 0
    assert "running anyway: --allow-backbone-mismatch" in capsys.readouterr().err
    assert len(built) == 1  # the mismatch runs used the trained twin, as asked
