"""HR training folders (sources, lengths, repeat, unreadable-file skips) and paired LQ/GT folder errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.datasets import GTImageFolder, ImageSource, PairedImageFolder, image_size
from invsr_pl.utils.images import ImageReadError, list_images


def _write(path: Path, h: int, w: int, value: int | None = None, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = (
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if value is None
        else np.full((h, w, 3), value, np.uint8)
    )
    Image.fromarray(arr).save(path)
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return path


# ---------------------------------------------------------------------------------------- GT folders
def test_list_images_sorted_recursive_and_filtered(tmp_path):
    _write(tmp_path / "b.png", 4, 4)
    _write(tmp_path / "a.JPG", 4, 4)
    _write(tmp_path / "sub" / "c.webp", 4, 4)
    (tmp_path / "notes.txt").write_text("x")
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)]
    assert rel == ["a.JPG", "b.png", "sub/c.webp"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["a.JPG", "b.png"]
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_images(tmp_path / "missing", recursive=True)


def test_multi_source_lengths_repeat_and_file_list(tmp_path):
    for i in range(5):
        _write(tmp_path / "ffhq" / f"{i // 2:02d}" / f"{i:05d}.png", 8, 8, value=i)
    for i in range(2):
        _write(tmp_path / "lsdir" / f"{i}.png", 8, 8, value=100 + i)
    (tmp_path / "list.txt").write_text("# comment\nlsdir/1.png\n\nffhq/00/00000.png\n")
    ds = GTImageFolder(
        sources=[
            {"root": str(tmp_path / "lsdir"), "repeat": 2},
            {"root": str(tmp_path / "ffhq"), "length": 3, "recursive": True},
            ImageSource(file_list=str(tmp_path / "list.txt")),
        ],
        gt_size=4,
    )
    names = [p.name for p in ds.files]
    assert names == [
        "0.png",
        "1.png",
        "0.png",
        "1.png",
        "00000.png",
        "00001.png",
        "00002.png",
        "1.png",
        "00000.png",
    ]
    assert ds.source_sizes == [4, 3, 2]
    picked = ImageSource(root=str(tmp_path / "ffhq"), pattern="01/*.png").files()
    assert [p.name for p in picked] == ["00002.png", "00003.png"]
    assert len(ds) == 9
    # values survive decoding: item 4 is FFHQ image 0 (all zeros), item 1 is LSDIR image 1 (value 101)
    assert ds[4]["gt"].max() == 0.0
    torch.testing.assert_close(ds[1]["gt"], torch.full((3, 4, 4), 101 / 255))


def test_source_validation(tmp_path):
    with pytest.raises(ValueError, match="root folder or a file_list"):
        ImageSource()
    with pytest.raises(ValueError, match="repeat"):
        ImageSource(root="x", repeat=0)
    with pytest.raises(ValueError, match="unknown image source keys"):
        ImageSource.coerce({"root": "x", "weight": 2})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        GTImageFolder([str(tmp_path / "empty")])


def test_gt_item_contract_padding_and_determinism(tmp_path):
    _write(tmp_path / "small.png", 6, 20)  # height < gt_size: reflect-padded
    ds = GTImageFolder([str(tmp_path)], gt_size=16, seed=3)
    gt = ds[0]["gt"]
    assert gt.shape == (3, 16, 16) and gt.dtype == torch.float32
    assert float(gt.min()) >= 0.0 and float(gt.max()) <= 1.0
    torch.testing.assert_close(gt[:, 6], gt[:, 4])  # reflect-101 below the last row
    ds.reseed(7)
    a = [ds[0]["gt"] for _ in range(4)]
    ds.reseed(7)
    b = [ds[0]["gt"] for _ in range(4)]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)
    assert any(not torch.equal(a[0], x) for x in a[1:])  # the stream moves on between draws


def test_unreadable_training_file_is_skipped_and_counted(tmp_path, caplog):
    _write(tmp_path / "a.png", 8, 8, value=10)
    _corrupt(tmp_path / "b.png")
    _write(tmp_path / "c.png", 8, 8, value=30)
    ds = GTImageFolder([str(tmp_path)], gt_size=8, hflip_prob=0.0)
    with caplog.at_level(logging.WARNING, logger="datamodules.datasets"):
        gt = ds[1]["gt"]  # b.png is bad -> c.png (the next index) is used
    torch.testing.assert_close(gt, torch.full((3, 8, 8), 30 / 255))
    assert ds.num_skipped == 1
    assert "b.png" in caplog.text and "1 skipped" in caplog.text
    ds[1]
    assert ds.num_skipped == 2


def test_all_unreadable_training_files_raise(tmp_path):
    for name in "ab":
        _corrupt(tmp_path / f"{name}.png")
    ds = GTImageFolder([str(tmp_path)], gt_size=8, max_consecutive_skips=3)
    with pytest.raises(ImageReadError, match="4 unreadable training images in a row"):
        ds[0]


# ---------------------------------------------------------------------------------------- paired folders
def _paired(tmp_path: Path, names=("x", "y"), lq_hw=(4, 6), scale=4) -> tuple[Path, Path]:
    for i, n in enumerate(names):
        _write(tmp_path / "lq" / f"{n}.png", *lq_hw, seed=i)
        _write(tmp_path / "gt" / f"{n}.png", lq_hw[0] * scale, lq_hw[1] * scale, seed=10 + i)
    return tmp_path / "lq", tmp_path / "gt"


def test_paired_items(tmp_path):
    lq_dir, gt_dir = _paired(tmp_path, names=("b", "a"))
    ds = PairedImageFolder(str(lq_dir), str(gt_dir), scale=4)
    assert ds.names == ["a", "b"] and len(ds) == 2
    item = ds[0]
    assert item["name"] == "a"
    assert item["lq"].shape == (3, 4, 6) and item["gt"].shape == (3, 16, 24)
    assert item["lq"].dtype == item["gt"].dtype == torch.float32
    assert len(PairedImageFolder(str(lq_dir), str(gt_dir), limit=1)) == 1


def test_lq_only_set(tmp_path):
    lq_dir, _ = _paired(tmp_path)
    ds = PairedImageFolder(str(lq_dir), None)
    assert set(ds[1]) == {"lq", "name"} and not ds.has_gt


def test_paired_missing_partner_names_the_file(tmp_path):
    lq_dir, gt_dir = _paired(tmp_path)
    _write(lq_dir / "orphan.png", 4, 6)
    with pytest.raises(FileNotFoundError, match=r"no GT image in .*gt for LQ image\(s\) orphan\.png"):
        PairedImageFolder(str(lq_dir), str(gt_dir))
    (lq_dir / "orphan.png").unlink()
    _write(gt_dir / "lonely.jpg", 16, 24)
    with pytest.raises(FileNotFoundError, match=r"no LQ image in .*lq for GT image\(s\) lonely\.jpg"):
        PairedImageFolder(str(lq_dir), str(gt_dir))


def test_paired_wrong_size_names_the_file(tmp_path):
    lq_dir, gt_dir = _paired(tmp_path)
    _write(gt_dir / "y.png", 16, 20)
    with pytest.raises(ValueError, match=r"GT .*y\.png is 16x20 but LQ .*y\.png is 4x6.*must be 16x24"):
        PairedImageFolder(str(lq_dir), str(gt_dir), scale=4)
    ds = PairedImageFolder(str(lq_dir), str(gt_dir), scale=4, check_sizes=False)  # checked again at load
    ds[0]
    with pytest.raises(ValueError, match=r"y\.png is 16x20"):
        ds[1]


def test_paired_unreadable_file_names_the_file(tmp_path):
    lq_dir, gt_dir = _paired(tmp_path)
    _corrupt(lq_dir / "x.png")
    with pytest.raises(ImageReadError, match=r"x\.png"):
        PairedImageFolder(str(lq_dir), str(gt_dir))
    ds = PairedImageFolder(str(lq_dir), str(gt_dir), check_sizes=False)
    with pytest.raises(ImageReadError, match=r"x\.png"):
        ds[0]
    with pytest.raises(ImageReadError, match=r"x\.png"):
        ds.validate(decode=True)


def test_paired_duplicate_names_and_empty_folder(tmp_path):
    lq_dir, gt_dir = _paired(tmp_path)
    _write(lq_dir / "x.jpg", 4, 6)
    with pytest.raises(ValueError, match="two images share the name 'x'"):
        PairedImageFolder(str(lq_dir), str(gt_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        PairedImageFolder(str(tmp_path / "empty"))


def test_image_size_reads_header(tmp_path):
    assert image_size(_write(tmp_path / "a.png", 5, 7)) == (5, 7)


# ---------------------------------------------------------------------------------------- built-in samples
def test_every_sample_photo_loads_offline():
    from datamodules.samples import SAMPLE_PHOTOS, load_sample

    for name in SAMPLE_PHOTOS:
        img = load_sample(name)
        assert img.ndim == 3 and img.shape[0] == 3 and img.dtype == torch.float32, name
        assert min(img.shape[-2:]) >= 300 and float(img.min()) >= 0.0 and float(img.max()) <= 1.0


def test_sample_gt_images():
    from datamodules.samples import SampleGTImages

    ds = SampleGTImages(names=["camera", "chelsea"], gt_size=32, repeat=3, seed=1)
    assert len(ds) == 6
    item = ds[4]
    assert item["gt"].shape == (3, 32, 32) and item["gt"].dtype == torch.float32
    torch.testing.assert_close(item["gt"][0], item["gt"][1])  # grey camera replicated to RGB
    with pytest.raises(ValueError, match="unknown sample photo"):
        SampleGTImages(names=["eagle"])


def test_sample_pairs_bicubic_and_realesrgan_are_deterministic():
    from datamodules.samples import SamplePairs

    bic = SamplePairs(names=["astronaut", "coffee"], gt_size=32, lq_mode="bicubic")
    item = bic[1]
    assert item["name"] == "coffee"
    assert item["gt"].shape == (3, 32, 32) and item["lq"].shape == (3, 8, 8)
    torch.testing.assert_close(item["lq"] * 255, (item["lq"] * 255).round())  # 8-bit grid
    a = SamplePairs(names=["astronaut", "coffee"], gt_size=32, seed=5)
    b = SamplePairs(names=["coffee"], gt_size=32, seed=5)
    torch.testing.assert_close(a[1]["lq"], b[0]["lq"])  # per-photo seed, independent of order
    assert not torch.equal(a[1]["lq"], SamplePairs(names=["coffee"], gt_size=32, seed=6)[0]["lq"])
    with pytest.raises(ValueError, match="larger than the photo"):
        SamplePairs(names=["chelsea"], gt_size=320)
    with pytest.raises(ValueError, match="multiple of scale"):
        SamplePairs(gt_size=30)
