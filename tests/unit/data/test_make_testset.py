"""make_testset: the ImageNet-Test recipe (area resize, centre crop, seeded degradation) reproduces itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.make_testset import area_resize_short_side, build_degradation, main, make_testset


def _inputs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a": (80, 100), "b": (72, 64), "tiny": (40, 90)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_byte_for_byte_reproducible(tmp_path):
    src = _inputs(tmp_path / "in")
    main(
        [
            "--input",
            str(src),
            "--output",
            str(tmp_path / "o1"),
            "--size",
            "64",
            "--preset",
            "imagenet_test_x4",
        ]
    )
    main(["--input", str(src), "--output", str(tmp_path / "o2"), "--size", "64", "--quiet"])
    first, second = _files(tmp_path / "o1"), _files(tmp_path / "o2")
    assert sorted(first) == [
        "gt/a.png",
        "gt/b.png",
        "lq/a.png",
        "lq/b.png",
        "params/a.json",
        "params/b.json",
        "summary.json",
    ]
    assert first == second


def test_outputs_sizes_params_and_summary(tmp_path, capsys):
    summary = make_testset(_inputs(tmp_path / "in"), tmp_path / "out", size=64, scale=4, seed=3)
    assert "wrote 2 pairs" in capsys.readouterr().out
    assert summary["written"] == 2 and summary["skipped_too_small"] == ["tiny.png"]
    assert Image.open(tmp_path / "out/gt/a.png").size == (64, 64)
    assert Image.open(tmp_path / "out/lq/a.png").size == (16, 16)
    params = json.loads((tmp_path / "out/params/a.json").read_text())
    assert params["source_size"] == [80, 100] and params["resized_size"] == [64, 80]
    assert params["seed"] == 3 and "first.kernel.type" in params["degradation"]
    assert json.loads((tmp_path / "out/summary.json").read_text())["names"] == ["a", "b"]


def test_each_image_depends_only_on_its_stem_and_seed(tmp_path):
    src = _inputs(tmp_path / "in")
    make_testset(src, tmp_path / "all", size=64, verbose=False)
    make_testset(src, tmp_path / "one", size=64, num_images=1, verbose=False)
    make_testset(src, tmp_path / "seed1", size=64, seed=1, verbose=False)
    (kept,) = json.loads((tmp_path / "one/summary.json").read_text())["names"]
    assert (tmp_path / "one/lq" / f"{kept}.png").read_bytes() == (
        tmp_path / "all/lq" / f"{kept}.png"
    ).read_bytes()
    assert (tmp_path / "seed1/lq/a.png").read_bytes() != (tmp_path / "all/lq/a.png").read_bytes()
    assert (tmp_path / "seed1/gt/a.png").read_bytes() == (tmp_path / "all/gt/a.png").read_bytes()


def test_refuses_to_mix_with_an_existing_set_and_bad_presets(tmp_path):
    src = _inputs(tmp_path / "in")
    make_testset(src, tmp_path / "out", size=64, preset="bicubic", verbose=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_testset(src, tmp_path / "out", size=64, verbose=False)
    with pytest.raises(ValueError, match="for scale 4, but --scale is 2"):
        build_degradation("imagenet_test_x4", 2)
    with pytest.raises(ValueError, match="unknown preset"):
        build_degradation("jpeg_only", 4)
    with pytest.raises(ValueError, match="multiple of scale"):
        make_testset(src, tmp_path / "x", size=66, verbose=False)


def test_area_resize_short_side():
    flat = torch.full((3, 30, 45), 0.25)
    out = area_resize_short_side(flat, 20)
    assert out.shape == (3, 20, 30)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))
    x = torch.rand(3, 8, 12)
    half = area_resize_short_side(x, 4)  # integer factor 2: mean of 2x2 blocks
    torch.testing.assert_close(half, torch.nn.functional.avg_pool2d(x[None], 2)[0], rtol=1e-5, atol=1e-6)
    assert area_resize_short_side(x, 8) is x
    with pytest.raises(ValueError, match="only shrinks"):
        area_resize_short_side(x, 9)
