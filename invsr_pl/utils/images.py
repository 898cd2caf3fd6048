"""Image files <-> tensors: the one place in the project where value ranges and bit depths are converted.

Tensors are float32 (C, H, W) in [0, 1] (C = 3 for colour, 1 for alpha); arrays are (H, W, C) numpy.
8-bit files go through Pillow (with EXIF orientation and ICC-to-sRGB conversion); 16-bit PNGs through OpenCV
(Pillow reduces 48/64-bit PNGs to 8 bits; OpenCV comes with pyiqa) and 16-bit TIFFs through tifffile (from
scikit-image). A 16-bit input gives ``bit_depth`` 16 and :func:`write_image` then writes a 16-bit PNG/TIFF.
Floating-point TIFFs (values in [0, 1]) are read through tifffile too and count as 16-bit. Multi-frame files
(TIFF pages, animated GIF/WebP/PNG) are read one frame at a time (:func:`count_frames`, ``frame=``).
Writes are atomic: a killed writer never leaves a half-written image (:mod:`invsr_pl.utils.atomic`).

Size limits: :func:`probe_image` reads only the header (size, frames, alpha), and ``max_pixels`` in
:func:`probe_image`, :func:`count_frames` and :func:`read_image` refuses an image before any pixel is decoded
(:class:`ImageTooLargeError`), also on the tifffile/OpenCV paths that have no limit of their own. Pillow's
own decompression-bomb refusal (above ``2 * PIL.Image.MAX_IMAGE_PIXELS``) is reported the same way, never as
a bare ``DecompressionBombError``. torch is imported only by the functions that make or take tensors, so
listing and probing files stays cheap (``invsr-sr --help`` and its planning step).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from invsr_pl.utils.atomic import atomic_path

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = [
    "resize_image",
    "IMAGE_EXTENSIONS",
    "ImageInfo",
    "ImageReadError",
    "ImageTooLargeError",
    "LoadedImage",
    "array_to_tensor",
    "count_frames",
    "list_images",
    "normalise_extensions",
    "probe_image",
    "read_image",
    "tensor_to_array",
    "write_image",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_EXIF_ORIENTATION = 0x0112
_TIFF_SAMPLE_FORMAT, _TIFF_IEEE_FLOAT = 339, 3
_FLOAT_TOLERANCE = 1e-3  # float pixels this far outside [0, 1] are rounding, not a different range
_PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP",
                ".tif": "TIFF", ".tiff": "TIFF"}  # fmt: skip


class ImageReadError(ValueError):
    """A file could not be decoded as an image (corrupt, unsupported mode or bit depth)."""


class ImageTooLargeError(ImageReadError):
    """An image with more pixels than the caller's limit, or than Pillow's decompression-bomb limit."""


class ImageInfo(NamedTuple):
    """What :func:`probe_image` reads from a file's header, without decoding pixels."""

    width: int  # of the first frame
    height: int
    frames: int  # TIFF pages or animation frames; 1 for ordinary images
    has_alpha: bool  # the first frame carries an alpha channel (RGBA, LA, PA, transparent palette)


class LoadedImage(NamedTuple):
    """What :func:`read_image` returns; unpacks as ``image, alpha, bit_depth``."""

    image: Tensor  # (3, H, W) float32 in [0, 1], RGB (grayscale is replicated to three channels)
    alpha: Tensor | None  # (1, H, W) float32 in [0, 1], or None when the file has no alpha channel
    bit_depth: int  # 8 or 16: bits per channel of the file


def normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """Lower-case, dot-prefixed suffixes (``"PNG"`` -> ``".png"``)."""
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not exts:
        raise ValueError("extensions must not be empty")
    return exts


def list_images(
    root: str | Path, recursive: bool = False, extensions: Iterable[str] = IMAGE_EXTENSIONS
) -> list[Path]:
    """Image files in ``root`` (and below, if ``recursive``) whose suffix (any case) is in ``extensions``,
    sorted by relative path; hidden files are skipped.

    Sorting by the POSIX relative path makes the order (and so "the first N") identical on every file system.

    Raises:
        FileNotFoundError: ``root`` is not a directory.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    exts = normalise_extensions(extensions)
    if recursive:
        found = [Path(d) / f for d, _, files in os.walk(root, followlinks=True) for f in files]
    else:
        found = [p for p in root.iterdir() if p.is_file()]
    found = [p for p in found if p.suffix.lower() in exts and not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def array_to_tensor(array: np.ndarray) -> Tensor:
    """(H, W) or (H, W, C) uint8 / uint16 / float array -> (C, H, W) float32 tensor in [0, 1].

    Integers are divided by their dtype's maximum (255 or 65535); floats are clipped to [0, 1].
    """
    import torch

    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) array, got shape {array.shape}")
    if array.dtype == np.uint8 or array.dtype == np.uint16:
        data = array.astype(np.float32) / np.iinfo(array.dtype).max
    elif np.issubdtype(array.dtype, np.floating):
        data = np.clip(array.astype(np.float32), 0.0, 1.0)
    else:
        raise ValueError(f"unsupported array dtype {array.dtype}; expected uint8, uint16 or float")
    return torch.from_numpy(np.ascontiguousarray(data.transpose(2, 0, 1)))


def tensor_to_array(tensor: Tensor, bit_depth: int | None = None) -> np.ndarray:
    """(C, H, W) float tensor in [0, 1] -> (H, W, C) numpy array.

    ``bit_depth`` None gives float32 in [0, 1]; 8 or 16 gives rounded uint8 / uint16 (clamped first).
    """
    if tensor.ndim != 3:
        raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(tensor.shape)}")
    array = tensor.detach().float().clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy()
    if bit_depth is None:
        return array
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    return np.round(array * np.iinfo(dtype).max).astype(dtype)


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an (H, W, C) array, as ``ImageOps.exif_transpose`` does."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops[orientation](array)) if orientation in ops else array


def _file_bit_depth(path: Path, im: Image.Image) -> int:
    if im.mode.startswith("I;16") or im.mode == "I":
        return 16
    if im.format == "PNG":
        with open(path, "rb") as f:
            header = f.read(26)
        return 16 if len(header) == 26 and header[24] == 16 else 8  # IHDR bit depth byte
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))  # BitsPerSample
        bits = bits if isinstance(bits, tuple) else (bits,)
        return 16 if max(bits) == 16 else 8
    return 8


def _read_16bit(path: Path, im: Image.Image) -> np.ndarray:
    """(H, W, C) uint16 pixels of a 16-bit PNG/TIFF, C in {1, 2, 3, 4}, RGB(A) channel order."""
    if im.format == "TIFF":
        import tifffile  # comes with scikit-image

        array = tifffile.imread(path)
        if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[-1] not in (1, 2, 3, 4):
            array = array.transpose(1, 2, 0)  # planar (C, H, W) storage
    else:
        import cv2  # Pillow keeps only 8 of 16 bits of colour PNGs; OpenCV comes with pyiqa

        array = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise ImageReadError(f"cannot decode 16-bit PNG {path}")
        if array.ndim == 3 and array.shape[2] == 3:
            array = array[:, :, ::-1]  # BGR -> RGB
        elif array.ndim == 3 and array.shape[2] == 4:
            array = array[:, :, [2, 1, 0, 3]]  # BGRA -> RGBA
    if array.ndim == 2:
        array = array[:, :, None]
    if array.dtype != np.uint16 or array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ImageReadError(f"unsupported 16-bit layout in {path}: dtype {array.dtype}, shape {array.shape}")
    return array


def _is_float_tiff(im: Image.Image) -> bool:
    formats = im.tag_v2.get(_TIFF_SAMPLE_FORMAT, (1,)) if im.format == "TIFF" else (1,)
    return _TIFF_IEEE_FLOAT in (formats if isinstance(formats, tuple) else (formats,)) or im.mode == "F"


def _read_float_tiff(path: Path, frame: int) -> np.ndarray:
    """(H, W, C) float32 pixels of a floating-point TIFF page, refused unless they lie in [0, 1]."""
    import tifffile

    array = tifffile.imread(path, key=frame).astype(np.float32)
    if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[-1] not in (1, 2, 3, 4):
        array = array.transpose(1, 2, 0)  # planar (C, H, W) storage
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ImageReadError(f"unsupported float TIFF layout in {path}: shape {array.shape}")
    low, high = float(np.min(array)), float(np.max(array))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ImageReadError(f"float image {path} holds NaN or infinite pixels")
    if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
        raise ImageReadError(
            f"float image {path} has values in [{low:.4g}, {high:.4g}]; only floats in [0, 1] are supported "
            "(convert it to 8- or 16-bit integers)"
        )
    return np.clip(array, 0.0, 1.0)


def _tiff_info(path: Path) -> ImageInfo:
    """Header of a TIFF that Pillow cannot open (e.g. float RGB): size and alpha of the first page."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        channels = page.samplesperpixel
        return ImageInfo(int(page.imagewidth), int(page.imagelength), len(tif.pages), channels in (2, 4))


def _check_pixels(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{path} is {width}x{height} ({width * height / 1e6:.4g} MP), above the limit of "
            f"{max_pixels / 1e6:g} MP"
        )


def _bomb(path: Path, err: Exception) -> ImageTooLargeError:
    """Pillow's decompression-bomb refusal as a one-line, per-file error."""
    return ImageTooLargeError(f"refused {path} as a possible decompression bomb: {err}")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (im.mode == "P" and "transparency" in im.info)


def probe_image(path: str | Path, max_pixels: int | None = None) -> ImageInfo:
    """Size, frame count and alpha of an image file, from its header (no pixels are decoded).

    Args:
        max_pixels: refuse images whose first frame has more than this many pixels; None: no limit of our
            own (Pillow's decompression-bomb limit still applies unless the caller lifted it).

    Raises:
        ImageTooLargeError: above ``max_pixels``, or refused by Pillow as a decompression bomb.
        ImageReadError: the file cannot be opened as an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height, alpha = im.width, im.height, _has_alpha(im)
            _check_pixels(path, width, height, max_pixels)  # before n_frames, which walks GIF frames
            return ImageInfo(width, height, int(getattr(im, "n_frames", 1) or 1), alpha)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:
        raise _bomb(path, err) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        if path.suffix.lower() in (".tif", ".tiff"):  # e.g. float RGB TIFFs, which Pillow cannot open
            try:
                info = _tiff_info(path)
            except Exception:  # noqa: BLE001 - report Pillow's reason below
                pass
            else:
                _check_pixels(path, info.width, info.height, max_pixels)
                return info
        raise ImageReadError(f"cannot read image {path}: {err}") from err


def count_frames(path: str | Path, max_pixels: int | None = None) -> int:
    """Number of frames (TIFF pages, animation frames) in an image file; 1 for ordinary images.

    Raises:
        ImageTooLargeError: above ``max_pixels`` (see :func:`probe_image`) or a decompression bomb.
        ImageReadError: the file cannot be opened as an image.
    """
    return probe_image(path, max_pixels).frames


def _to_srgb(im: Image.Image) -> Image.Image:
    """Convert an embedded ICC profile to sRGB, so that colours survive (docs/data.md)."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return im
    try:
        out_mode = "RGBA" if im.mode == "RGBA" else "RGB"
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode=out_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return im  # a broken profile: keep the pixels as they are


def read_image(path: str | Path, frame: int = 0, max_pixels: int | None = None) -> LoadedImage:
    """Read an image file into ``(image (3, H, W), alpha (1, H, W) | None, bit_depth)``, float32 in [0, 1].

    Handles png/jpg/jpeg/bmp/webp/tif/tiff; RGB, grayscale (replicated to 3 channels), palette, gray+alpha and
    RGBA (alpha returned separately); 8-bit and 16-bit (divided by 65535) PNG/TIFF; float TIFF in [0, 1]
    (``bit_depth`` 16, other ranges refused). EXIF orientation is applied and 8-bit images with an ICC profile
    are converted to sRGB.

    Args:
        frame: 0-based frame of a multi-frame file (TIFF page, animation frame); see :func:`count_frames`.
        max_pixels: refuse a frame with more pixels than this, checked from the header before decoding;
            None: no limit of our own (see :func:`probe_image`).

    Raises:
        ImageTooLargeError: above ``max_pixels``, or refused by Pillow as a decompression bomb.
        ImageReadError: the file cannot be decoded, has no such frame, or has an unsupported pixel format.
    """
    path = Path(path)
    try:
        array, bit_depth = _read_array(path, frame, max_pixels)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:
        raise _bomb(path, err) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        if path.suffix.lower() in (".tif", ".tiff") and "cannot identify" in str(err):
            try:  # float RGB TIFFs: Pillow cannot open them, tifffile can
                info = _tiff_info(path)
            except Exception:  # noqa: BLE001 - report Pillow's reason
                raise ImageReadError(f"cannot read image {path}: {err}") from err
            _check_pixels(path, info.width, info.height, max_pixels)
            try:
                array, bit_depth = _read_float_tiff(path, frame), 16
            except ImageReadError:
                raise
            except Exception:  # noqa: BLE001 - report Pillow's reason
                raise ImageReadError(f"cannot read image {path}: {err}") from err
        else:
            raise ImageReadError(f"cannot read image {path}: {err}") from err
    channels = array.shape[2] if array.ndim == 3 else 1
    if array.ndim == 2:
        array = array[:, :, None]
    color, alpha = (array[:, :, :-1], array[:, :, -1:]) if channels in (2, 4) else (array, None)
    if color.shape[2] == 1:
        color = np.repeat(color, 3, axis=2)
    return LoadedImage(array_to_tensor(color), None if alpha is None else array_to_tensor(alpha), bit_depth)


def _read_array(path: Path, frame: int, max_pixels: int | None) -> tuple[np.ndarray, int]:
    """(H, W, C) pixels of ``frame`` (uint8, uint16 or float32 in [0, 1]) and the file's bit depth."""
    with Image.open(path) as im:
        _check_pixels(path, im.width, im.height, max_pixels)
        frames = int(getattr(im, "n_frames", 1) or 1)
        if not 0 <= frame < frames:
            raise ImageReadError(f"{path} has {frames} frame(s), no frame {frame}")
        if frame:
            im.seek(frame)
            _check_pixels(path, im.width, im.height, max_pixels)  # TIFF pages may differ in size
        orientation = int(im.getexif().get(_EXIF_ORIENTATION, 1))
        if _is_float_tiff(im):
            return _orient(_read_float_tiff(path, frame), orientation), 16
        if _file_bit_depth(path, im) == 16:
            if frame and im.format == "TIFF":
                import tifffile

                array = tifffile.imread(path, key=frame)
                array = array[:, :, None] if array.ndim == 2 else array
                return _orient(array, orientation), 16
            return _orient(_read_16bit(path, im), orientation), 16
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
        elif im.mode not in ("RGB", "CMYK", "L"):
            im = im.convert("RGB")
        im = _to_srgb(im)
        im = im if im.mode in ("RGB", "RGBA") else im.convert("RGB")
        return np.asarray(im), 8


def write_image(path: str | Path, image: Tensor, alpha: Tensor | None = None, bit_depth: int = 8) -> None:
    """Write ``image`` (3, H, W) float in [0, 1] (clamped, rounded), optional ``alpha`` (1, H, W) to ``path``.

    The format follows the suffix. ``bit_depth`` 16 needs .png or .tif/.tiff; 8 works for every suffix in
    :data:`IMAGE_EXTENSIONS` (JPEG/BMP cannot carry alpha: a clear error). Parent folders are created. The
    file appears atomically (temporary file + rename), so an interrupted run never leaves a partial image.
    """
    path = Path(path)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected image of shape (3, H, W), got {tuple(image.shape)}")
    if alpha is not None and (alpha.ndim != 3 or alpha.shape[0] != 1 or alpha.shape[1:] != image.shape[1:]):
        raise ValueError(
            f"alpha must have shape (1, {image.shape[1]}, {image.shape[2]}), got {tuple(alpha.shape)}"
        )
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise ValueError(f"unsupported output suffix {suffix!r}; use one of {', '.join(IMAGE_EXTENSIONS)}")
    if alpha is not None and suffix in (".jpg", ".jpeg", ".bmp"):
        raise ValueError(f"{suffix} cannot store an alpha channel; write .png, .webp or .tif instead")
    import torch

    data = image if alpha is None else torch.cat([image.float(), alpha.float()], dim=0)
    array = tensor_to_array(data, bit_depth)
    if bit_depth == 16 and suffix not in (".png", ".tif", ".tiff"):
        raise ValueError(f"16-bit output needs a .png or .tif/.tiff path, got {path.name}")
    with atomic_path(path) as tmp:
        if bit_depth == 8:
            Image.fromarray(array).save(tmp, format=_PIL_FORMATS[suffix])  # (H, W, 3) RGB, (H, W, 4) RGBA
        elif suffix == ".png":
            import cv2

            bgr = array[:, :, [2, 1, 0, 3]] if alpha is not None else array[:, :, ::-1]
            ok, encoded = cv2.imencode(".png", np.ascontiguousarray(bgr))
            if not ok:
                raise OSError(f"OpenCV could not encode {path}")
            tmp.write_bytes(encoded.tobytes())
        else:
            import tifffile

            tifffile.imwrite(
                tmp, array, photometric="rgb", extrasamples=("unassalpha",) if alpha is not None else None
            )


def quantize_8bit(x: Tensor) -> Tensor:
    """``x`` (any shape) float in [0, 1] -> the values rounded to the 8-bit grid ``k / 255`` (clamped), in
    ``x``'s dtype: ``round(x * 255)`` clamped to [0, 255], / 255.

    What an 8-bit PNG holds: the degradation pipeline quantises its LQ images like this (docs/data.md), and
    every scored SR image is rounded like this first, as the paper's tables score PNGs read back from disk
    (docs/evaluation.md).
    """
    return (x * 255.0).round().clamp(0, 255) / 255.0


def resize_image(image: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """``image`` (C, H, W) float in [0, 1] -> (C, *size): bicubic, antialiased when shrinking, in [0, 1].

    Used for what is not super-resolved (alpha channels, the before/after reference, ``--outscale``).
    """
    import torch.nn.functional as F  # noqa: N812 - the usual name

    size = (int(size[0]), int(size[1]))
    if tuple(image.shape[-2:]) == size:
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp(0, 1)


def output_name(stem: str, ext: str = "png", suffix: str = "", page: int | None = None) -> str:
    """The file name an input gets: ``<stem>[_p<page>][_<suffix>].<ext>`` (``page`` counts from 1).

    ``stem`` is the input's stem, or ``<stem>_<input ext>`` when inputs share a stem. The default is
    ``<stem>.png``; ``invsr-demo`` names its downloads by the same rule.
    """
    name = stem + (f"_p{page}" if page is not None else "") + (f"_{suffix}" if suffix else "")
    return f"{name}.{ext.lstrip('.')}"
