"""Image files <-> tensors: 8/16-bit, gray, RGBA, EXIF orientation, corrupt files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tifffile
import torch
from PIL import Image, ImageOps

from invsr_pl.utils.images import (
    ImageReadError,
    ImageTooLargeError,
    array_to_tensor,
    count_frames,
    list_images,
    probe_image,
    read_image,
    tensor_to_array,
    write_image,
)


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return skimage.data.coffee()[:48, :64]  # (48, 64, 3) uint8


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".webp", ".tif"])
def test_rgb_8bit_round_trip(tmp_path: Path, coffee: np.ndarray, suffix: str) -> None:
    path = tmp_path / f"img{suffix}"
    Image.fromarray(coffee).save(path, **({"quality": 100} if suffix in (".jpg", ".webp") else {}))
    image, alpha, bit_depth = read_image(path)
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32 and alpha is None and bit_depth == 8
    assert image.min() >= 0 and image.max() <= 1
    lossy = suffix in (".jpg", ".webp")
    np.testing.assert_allclose(tensor_to_array(image, 8), coffee, atol=40 if lossy else 0)
    out = tmp_path / f"out{suffix}"
    write_image(out, image)
    assert read_image(out).image.shape == (3, 48, 64)


def test_gray_becomes_three_equal_channels(tmp_path: Path) -> None:
    camera = skimage.data.camera()[:40, :50]
    Image.fromarray(camera).save(tmp_path / "gray.png")
    image, alpha, bit_depth = read_image(tmp_path / "gray.png")
    assert image.shape == (3, 40, 50) and alpha is None and bit_depth == 8
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert torch.equal(image[0], torch.from_numpy(camera).float() / 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_returned_and_written_back(tmp_path: Path, coffee: np.ndarray, mode: str) -> None:
    rgba = np.dstack([coffee, np.linspace(0, 255, 64, dtype=np.uint8)[None].repeat(48, 0)])
    Image.fromarray(rgba).convert(mode).save(tmp_path / "a.png")
    image, alpha, _ = read_image(tmp_path / "a.png")
    assert image.shape == (3, 48, 64) and alpha is not None and alpha.shape == (1, 48, 64)
    assert torch.equal(alpha[0], torch.from_numpy(rgba[..., 3]).float() / 255)
    write_image(tmp_path / "b.png", image, alpha)
    _, alpha2, _ = read_image(tmp_path / "b.png")
    assert alpha2 is not None and torch.equal(alpha2, alpha)
    with pytest.raises(ValueError, match="alpha"):
        write_image(tmp_path / "b.jpg", image, alpha)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_16bit_is_read_exactly_and_written_as_16bit(tmp_path: Path, suffix: str, with_alpha: bool) -> None:
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 65536, (3, 20, 30)).astype(np.float32) / 65535)
    alpha = (
        torch.from_numpy(rng.integers(0, 65536, (1, 20, 30)).astype(np.float32) / 65535)
        if with_alpha
        else None
    )
    write_image(tmp_path / f"x{suffix}", image, alpha, bit_depth=16)
    got, got_alpha, bit_depth = read_image(tmp_path / f"x{suffix}")
    assert bit_depth == 16
    torch.testing.assert_close(got, image, atol=1e-7, rtol=0)
    assert (got_alpha is None) == (alpha is None)
    if alpha is not None:
        torch.testing.assert_close(got_alpha, alpha, atol=1e-7, rtol=0)


def test_16bit_gray_png_and_tiff_from_other_writers(tmp_path: Path) -> None:
    gray = (np.random.default_rng(1).random((16, 24)) * 65535).astype(np.uint16)
    Image.fromarray(gray).save(tmp_path / "g.png")
    tifffile.imwrite(tmp_path / "g.tif", gray)
    for name in ("g.png", "g.tif"):
        image, _, bit_depth = read_image(tmp_path / name)
        assert bit_depth == 16 and image.shape == (3, 16, 24)
        torch.testing.assert_close(
            image[1], torch.from_numpy(gray.astype(np.float32) / 65535), atol=1e-7, rtol=0
        )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path: Path, coffee: np.ndarray, orientation: int) -> None:
    im = Image.fromarray(coffee)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "o.jpg"
    im.save(path, exif=exif, quality=95)
    want = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    got = read_image(path).image
    assert got.shape == (3, *want.shape[:2])
    np.testing.assert_array_equal(tensor_to_array(got, 8), want)


def test_corrupt_file_raises_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageReadError, match="bad.png"):
        read_image(bad)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageReadError, match="text.jpg"):
        read_image(tmp_path / "text.jpg")


def test_array_conversions_and_listing(tmp_path: Path) -> None:
    assert torch.equal(array_to_tensor(np.full((2, 3), 255, np.uint8)), torch.ones(1, 2, 3))
    assert torch.equal(array_to_tensor(np.full((2, 3, 3), 65535, np.uint16)), torch.ones(3, 2, 3))
    assert tensor_to_array(torch.full((3, 2, 2), 2.0), 16).max() == 65535
    with pytest.raises(ValueError):
        array_to_tensor(np.zeros((2, 2), np.int32))
    for name in ("b.PNG", "a.jpeg", "c.txt", "d.tiff"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.png").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpeg", "b.PNG", "d.tiff"]


def test_float_tiff_is_scaled_not_black(tmp_path: Path) -> None:
    gray = np.linspace(0, 1, 12 * 10, dtype=np.float32).reshape(12, 10)
    tifffile.imwrite(tmp_path / "g.tif", gray)
    rgb = np.stack([gray, 1 - gray, gray * 0.5], axis=-1)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")  # Pillow cannot open this one
    image, alpha, bit_depth = read_image(tmp_path / "g.tif")
    assert (
        bit_depth == 16 and alpha is None and torch.allclose(image, torch.from_numpy(gray).expand(3, -1, -1))
    )
    image, _, _ = read_image(tmp_path / "rgb.tif")
    assert torch.allclose(image, torch.from_numpy(rgb).permute(2, 0, 1))
    tifffile.imwrite(tmp_path / "hdr.tif", gray * 255)
    with pytest.raises(ImageReadError, match=r"values in \[0, 255\]"):
        read_image(tmp_path / "hdr.tif")


def test_frames_of_multi_page_files(tmp_path: Path) -> None:
    from invsr_pl.utils.images import count_frames

    with tifffile.TiffWriter(tmp_path / "p.tif") as tif:
        for k in range(3):
            tif.write(np.full((8, 6), 40 * k, np.uint8))
    assert count_frames(tmp_path / "p.tif") == 3
    assert [round(read_image(tmp_path / "p.tif", frame=k).image.mean().item() * 255) for k in range(3)] == [
        0,
        40,
        80,
    ]
    with pytest.raises(ImageReadError, match="no frame 3"):
        read_image(tmp_path / "p.tif", frame=3)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "one.png")
    assert count_frames(tmp_path / "one.png") == 1


def test_write_is_atomic(tmp_path: Path, coffee: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that dies mid-file leaves the previous image and no partial file behind."""
    path = tmp_path / "out.png"
    write_image(path, array_to_tensor(coffee))
    before = path.read_bytes()
    real_save = Image.Image.save

    def dies(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        write_image(path, torch.zeros(3, 48, 64))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.png"]


# ---------------------------------------------------------------------------------------------- size limits
def test_probe_reads_the_header_only(tmp_path: Path, coffee: np.ndarray) -> None:
    Image.fromarray(coffee).save(tmp_path / "rgb.jpg")
    Image.fromarray(np.dstack([coffee, coffee[..., :1]])).save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((20, 30, 3), np.float32))  # Pillow cannot open it
    assert tuple(probe_image(tmp_path / "rgb.jpg")) == (64, 48, 1, False)
    assert tuple(probe_image(tmp_path / "rgba.png")) == (64, 48, 1, True)
    assert tuple(probe_image(tmp_path / "float.tif")) == (30, 20, 1, False)


@pytest.mark.parametrize("name", ["rgb.png", "deep.tif", "float.tif"])
def test_pixel_limit_refuses_before_decoding(tmp_path: Path, coffee: np.ndarray, name: str) -> None:
    """Every read path (Pillow, tifffile for 16-bit and float TIFFs) honours ``max_pixels``."""
    path = tmp_path / name
    if name == "rgb.png":
        Image.fromarray(coffee).save(path)
    elif name == "deep.tif":
        tifffile.imwrite(path, coffee.astype(np.uint16) * 257)
    else:
        tifffile.imwrite(path, coffee.astype(np.float32) / 255)
    for refuse in (
        lambda: probe_image(path, max_pixels=64 * 48 - 1),
        lambda: count_frames(path, max_pixels=64 * 48 - 1),
        lambda: read_image(path, max_pixels=64 * 48 - 1),
    ):
        with pytest.raises(
            ImageTooLargeError, match=r"64x48 \(0\.003072 MP\), above the limit of 0\.003071 MP"
        ):
            refuse()
    assert read_image(path, max_pixels=64 * 48).image.shape == (3, 48, 64)  # the limit itself is allowed


def test_decompression_bomb_is_an_image_read_error(
    tmp_path: Path, coffee: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow's DecompressionBombError (here at a lowered limit) reaches callers as a one-line
    ImageTooLargeError, which is an ImageReadError: batch loops that skip bad files skip it too."""
    Image.fromarray(coffee).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3072 pixels > 2 * 1000: a "bomb"
    for call in (probe_image, count_frames, read_image):
        with pytest.raises(ImageReadError, match="decompression bomb") as info:
            call(tmp_path / "a.png")
        assert isinstance(info.value, ImageTooLargeError) and "\n" not in str(info.value)


def test_listing_and_probing_do_not_import_torch(tmp_path: Path, coffee: np.ndarray) -> None:
    """``invsr-sr --help`` and its planning step stay fast: torch loads only for tensors."""
    Image.fromarray(coffee).save(tmp_path / "a.png")
    code = (
        "import sys; from invsr_pl.utils import images; "
        f"assert images.probe_image(images.list_images({str(tmp_path)!r})[0]).width == 64; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
