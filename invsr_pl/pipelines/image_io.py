"""What :class:`~invsr_pl.pipelines.InvSRPipeline` takes and gives: PIL images, numpy arrays, tensors.

Inputs become :class:`PipelineImage` (colour, alpha, bit depth), the same split as
:func:`invsr_pl.utils.images.read_image` makes for files, so the pipeline treats an image the same whether
the SR command read it from disk or a user hands it over in memory (docs/sampling.md):

- PIL: ``RGB``, ``L`` (replicated to three channels), ``RGBA`` / ``LA`` / ``PA`` / palette with transparency
  (alpha split off), 16-bit ``I;16*`` / ``I`` (values / 65535) and float ``F`` (in [0, 1]); other modes are
  converted to RGB. Pixels are taken as they are (no EXIF rotation or ICC conversion: those are file matters).
- numpy: ``(H, W)``, ``(H, W, C)`` or a batch ``(B, H, W, C)``, C = 1 (gray), 2 (gray + alpha), 3 (RGB) or
  4 (RGBA); uint8, uint16 or float in [0, 1] (clipped).
- torch: ``(C, H, W)`` or ``(B, C, H, W)`` with the same C; float in [0, 1] (clamped) or uint8.

Bit depth: 8 for uint8 data and 8-bit PIL modes, 16 for uint16, 16-bit PIL modes and any float data (as a
float TIFF counts as 16-bit in ``read_image``), so that 16-bit in gives 16-bit out where the format allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor

from invsr_pl.utils.images import array_to_tensor, tensor_to_array

__all__ = ["ImageInput", "PipelineImage", "from_output", "to_pipeline_images"]

_OneImage = PIL.Image.Image | np.ndarray | Tensor
ImageInput = _OneImage | Sequence[_OneImage]
OUTPUT_TYPES = ("pil", "np", "pt")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class PipelineImage:
    """One image as the pipeline works on it."""

    rgb: Tensor  # (3, H, W) float32 in [0, 1]
    alpha: Tensor | None  # (1, H, W) float32 in [0, 1], or None
    bit_depth: int  # 8 or 16


def _split(chw: Tensor, bit_depth: int) -> PipelineImage:
    """(C, H, W) float in [0, 1], C in 1..4 -> colour (gray replicated) and alpha."""
    channels = chw.shape[0]
    if channels not in (1, 2, 3, 4):
        raise ValueError(
            f"an image needs 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) channels, got {channels}"
        )
    color, alpha = (chw[:-1], chw[-1:]) if channels in (2, 4) else (chw, None)
    if color.shape[0] == 1:
        color = color.expand(3, -1, -1)
    if color.shape[-2] < 1 or color.shape[-1] < 1:
        raise ValueError(f"an image needs at least 1x1 pixels, got {tuple(color.shape[-2:])}")
    alpha = None if alpha is None else alpha.float().contiguous()
    return PipelineImage(color.float().contiguous(), alpha, bit_depth)


def _from_pil(image: PIL.Image.Image) -> PipelineImage:
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.clip(np.asarray(image).astype(np.int64), 0, 65535).astype(np.uint16)
        return _split(array_to_tensor(array), 16)
    if image.mode == "F":
        return _split(array_to_tensor(np.asarray(image, dtype=np.float32)), 16)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    elif image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return _split(array_to_tensor(np.asarray(image)), 8)


def _from_array(array: np.ndarray) -> list[PipelineImage]:
    if array.ndim == 4:
        return [item for a in array for item in _from_array(a)]
    if array.ndim not in (2, 3):
        raise ValueError(f"a numpy image must be (H, W), (H, W, C) or (B, H, W, C), got shape {array.shape}")
    bit_depth = 8 if array.dtype == np.uint8 else 16
    return [_split(array_to_tensor(array), bit_depth)]


def _from_tensor(tensor: Tensor) -> list[PipelineImage]:
    if tensor.ndim == 4:
        return [item for t in tensor for item in _from_tensor(t)]
    if tensor.ndim != 3:
        raise ValueError(f"a tensor image must be (C, H, W) or (B, C, H, W), got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return [_split(tensor.float() / 255.0, 8)]
    if not tensor.is_floating_point():
        raise ValueError(f"a tensor image must be float in [0, 1] or uint8, got {tensor.dtype}")
    return [_split(tensor.detach().float().clamp(0.0, 1.0), 16)]


def to_pipeline_images(image: ImageInput) -> list[PipelineImage]:
    """Any supported input (one image, a batch, or a list of them) -> one :class:`PipelineImage` each."""
    if isinstance(image, PIL.Image.Image):
        return [_from_pil(image)]
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, Tensor):
        return _from_tensor(image)
    if isinstance(image, Sequence) and not isinstance(image, (str, bytes)) and len(image) > 0:
        return [item for one in image for item in to_pipeline_images(one)]
    raise ValueError(
        "image must be a PIL image, a numpy array, a tensor or a non-empty list of them, got "
        f"{type(image).__name__}"
    )


def from_output(images: list[Tensor], output_type: str) -> Any:
    """(C, H, W) float32 results in [0, 1] (C = 3, or 4 with alpha) -> the requested ``output_type``.

    ``"pt"``: a ``(B, C, H, W)`` tensor when every image has one shape, else a list of ``(C, H, W)``;
    ``"np"``: likewise ``(B, H, W, C)`` float32 or a list of ``(H, W, C)``; ``"pil"``: a list of 8-bit RGB /
    RGBA PIL images (PIL holds no 16-bit colour: take ``"np"`` or ``"pt"`` with ``bit_depths`` for that).
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    same = len({tuple(i.shape) for i in images}) == 1
    if output_type == "pt":
        return torch.stack(images) if same else images
    if output_type == "np":
        arrays = [tensor_to_array(i) for i in images]
        return np.stack(arrays) if same else arrays
    return [PIL.Image.fromarray(tensor_to_array(i, 8)) for i in images]
