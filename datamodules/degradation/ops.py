"""Pure, device-agnostic degradation ops on batched images (B, 3, H, W) float32 in [0, 1].

Every op takes its per-sample parameters as tensors of shape (B,) (or (B, k, k) kernels) and, when it needs
randomness, an explicit ``torch.Generator`` on the data's device. No global RNG, no device moves.
The recipe is docs/data.md#degradation-pipeline (Real-ESRGAN's second-order degradation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from invsr_pl.utils.images import quantize_8bit  # noqa: F401 - one of the ops (docs/data.md)

RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
JPEG_CODECS: tuple[str, ...] = ("auto", "libjpeg", "kornia")


def _check_images(x: Tensor, name: str = "x") -> None:
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be (B, 3, H, W) (or (B, 1, H, W)), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0, 1], got {x.dtype}")


def _per_sample(v: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """Broadcast a scalar or (B,) parameter to a (B,) float tensor on ``like``'s device."""
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"per-sample parameter needs 1 or {batch} values, got {t.numel()}")
    return t


def filter2d(x: Tensor, kernel: Tensor) -> Tensor:
    """Convolve each image with its own kernel, reflect padding (Real-ESRGAN's ``filter2D``).

    Args:
        x: (B, C, H, W) float.
        kernel: (B, k, k) or (k, k) float, k odd; all-zero outer rings are skipped (same result).

    Returns:
        (B, C, H, W), same dtype. Not clamped (sinc kernels have negative lobes).
    """
    _check_images(x)
    if kernel.ndim == 2:
        kernel = kernel.unsqueeze(0).expand(x.shape[0], -1, -1)
    if kernel.ndim != 3 or kernel.shape[0] != x.shape[0] or kernel.shape[1] != kernel.shape[2]:
        raise ValueError(f"kernel must be (B, k, k) with B={x.shape[0]}, got {tuple(kernel.shape)}")
    k = kernel.shape[-1]
    if k % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {k}")
    # Per-sample support radius: kernels padded to 21 are mostly much smaller, and a depthwise convolution
    # costs ~k^2, so samples are grouped by radius and each group is convolved with its trimmed kernel
    # (identical result: the trimmed taps are zero). At most k // 2 + 1 groups.
    c = k // 2
    offset = (torch.arange(k, device=kernel.device) - c).abs()
    ring = torch.maximum(offset.view(-1, 1), offset.view(1, -1))  # (k, k) Chebyshev distance from the centre
    radius = torch.where(kernel != 0, ring, torch.zeros_like(ring)).flatten(1).amax(dim=1).tolist()
    kernel = kernel.to(x.dtype)
    groups = sorted(set(radius))
    if len(groups) == 1:
        return _filter2d_trimmed(x, kernel, groups[0])
    out = torch.empty_like(x)
    for r in groups:
        idx = torch.tensor([i for i, v in enumerate(radius) if v == r], device=x.device)
        out[idx] = _filter2d_trimmed(x[idx], kernel[idx], r)
    return out


def _filter2d_trimmed(x: Tensor, kernel: Tensor, radius: int) -> Tensor:
    """Depthwise convolution with the centred (2 radius + 1)^2 part of each (B, k, k) kernel."""
    c = kernel.shape[-1] // 2
    kernel = kernel[:, c - radius : c + radius + 1, c - radius : c + radius + 1]
    if radius == 0:
        return x * kernel.view(-1, 1, 1, 1)
    # Reflect padding needs pad < side; tiny intermediate images (strong downscale of a small crop) fall back
    # to replicate padding instead of failing.
    border = "reflect" if radius < min(x.shape[-2:]) else "replicate"
    return kornia.filters.filter2d(x, kernel, border_type=border)


def resize(x: Tensor, size: tuple[int, int], mode: Tensor | str | Sequence[str]) -> Tensor:
    """Resize every image to one shared ``size`` with a per-sample interpolation mode.

    Samples are grouped by mode (at most three ``F.interpolate`` calls). ``align_corners=False`` and no
    antialiasing, as in the official pipeline's ``F.interpolate`` calls (docs/data.md#degradation-pipeline).

    Args:
        x: (B, C, H, W) float.
        size: (h, w) output size, both >= 1.
        mode: a name from ``RESIZE_MODES``, a sequence of B names, or a (B,) int64 tensor indexing
            ``RESIZE_MODES``.

    Returns:
        (B, C, h, w), not clamped (bicubic overshoots).
    """
    _check_images(x)
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be >= 1 pixel, got {(h, w)}")
    if isinstance(mode, str):
        mode = [mode] * x.shape[0]
    if not isinstance(mode, Tensor):
        unknown = set(mode) - set(RESIZE_MODES)
        if unknown:
            raise ValueError(f"unknown resize mode(s) {sorted(unknown)}; choose from {RESIZE_MODES}")
        mode = torch.tensor([RESIZE_MODES.index(m) for m in mode])
    mode_list = mode.tolist()
    if len(mode_list) != x.shape[0]:
        raise ValueError(f"need one resize mode per sample ({x.shape[0]}), got {len(mode_list)}")

    def one(t: Tensor, m: int) -> Tensor:
        name = RESIZE_MODES[m]
        if name == "area":
            return F.interpolate(t, size=(h, w), mode="area")
        return F.interpolate(t, size=(h, w), mode=name, align_corners=False)

    present = sorted(set(mode_list))
    if len(present) == 1:
        return one(x, present[0])
    out = x.new_empty(x.shape[0], x.shape[1], h, w)
    for m in present:
        idx = torch.tensor([i for i, v in enumerate(mode_list) if v == m], device=x.device)
        out[idx] = one(x[idx], m)
    return out


def _gray(x: Tensor) -> Tensor:
    """(B, 1, H, W) luma with ITU-R 601 weights (kornia.color.rgb_to_grayscale)."""
    return kornia.color.rgb_to_grayscale(x) if x.shape[1] == 3 else x


def add_gaussian_noise(
    x: Tensor, sigma: Tensor | float, gray: Tensor | bool, generator: torch.Generator, clip: bool = True
) -> Tensor:
    """Add zero-mean Gaussian noise with a per-sample standard deviation.

    Args:
        x: (B, 3, H, W) float in [0, 1].
        sigma: (B,) or scalar standard deviation in [0, 1] intensity units (Real-ESRGAN's sigma / 255).
        gray: (B,) bool or scalar: one noise map shared by the three channels (gray noise) for these samples.
        generator: on x's device.
        clip: clamp the result to [0, 1] (the official clips after noise).

    Returns:
        (B, 3, H, W) float. sigma == 0 returns x unchanged (up to clipping).
    """
    _check_images(x)
    b = x.shape[0]
    sigma = _per_sample(sigma, b, x).view(-1, 1, 1, 1)
    gray = torch.as_tensor(gray, device=x.device).reshape(-1).expand(b).view(-1, 1, 1, 1).bool()
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    gray_idx = torch.nonzero(gray.view(-1)).flatten()
    if gray_idx.numel():  # gray samples: channel 0's map on all three channels
        noise[gray_idx] = noise[gray_idx, :1].expand(-1, x.shape[1], -1, -1)
    out = torch.addcmul(x, noise, sigma)
    return out.clamp_(0, 1) if clip else out


def poisson_levels(x: Tensor) -> Tensor:
    """Real-ESRGAN's Poisson intensity scale per image: 2 ** ceil(log2(#distinct 8-bit levels)).

    The official counts ``torch.unique`` of each 8-bit-rounded image (all channels together). After 8-bit
    rounding there are at most 256 levels, so the count is exactly a per-image histogram occupancy, computed
    here for the whole batch with one ``bincount`` (no loop over images, exact).

    Args:
        x: (B, C, H, W) float in [0, 1] (values outside are clamped, as the official's rounding does).

    Returns:
        (B,) float in {1, 2, 4, ..., 256}.
    """
    return _levels_of_codes((x * 255.0).round().clamp(0, 255))


def _levels_of_codes(codes: Tensor) -> Tensor:
    """``poisson_levels`` from (B, C, H, W) float 8-bit codes (integers in [0, 255])."""
    b = codes.shape[0]
    offset = torch.arange(b, device=codes.device, dtype=torch.int64).view(-1, 1) * 256
    idx = codes.reshape(b, -1).to(torch.int64).add_(offset)
    counts = torch.bincount(idx.flatten(), minlength=b * 256).view(b, 256)
    levels = (counts > 0).sum(dim=1).to(codes.dtype)
    return torch.exp2(torch.ceil(torch.log2(levels)))


# Poisson sampling and libjpeg are single-threaded inside torch/torchvision; on CPU the batch is split into
# this many fixed chunks run on a thread pool (torch releases the GIL). Poisson chunks get generator-derived
# seeds; the chunk count is fixed, not the thread count, so a seed gives the same noise on any machine.
_CPU_CHUNKS = 2
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_CPU_CHUNKS, thread_name_prefix="degradation")
    return _POOL


def _forget_pool_after_fork() -> None:
    # A forked child (DataLoader worker) inherits the executor object but not its threads; start afresh.
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _poisson(rate: Tensor, generator: torch.Generator) -> Tensor:
    """``torch.poisson(rate)``, split over threads on CPU (deterministic for a generator state)."""
    if rate.device.type != "cpu" or rate.shape[0] < 2:
        return torch.poisson(rate, generator=generator)
    seeds = torch.randint(0, 2**62, (_CPU_CHUNKS,), generator=generator, device=rate.device).tolist()
    chunks = rate.tensor_split(_CPU_CHUNKS)

    def one(i: int) -> Tensor:
        return torch.poisson(chunks[i], generator=torch.Generator().manual_seed(int(seeds[i])))

    if torch.get_num_threads() > 1:
        parts = list(_pool().map(one, range(len(chunks))))
    else:
        parts = [one(i) for i in range(len(chunks))]
    return torch.cat(parts)


def add_poisson_noise(
    x: Tensor, scale: Tensor | float, gray: Tensor | bool, generator: torch.Generator, clip: bool = True
) -> Tensor:
    """Add Real-ESRGAN's signal-dependent Poisson noise with a per-sample strength.

    With v = ``poisson_levels`` of the 8-bit-rounded image q (of its luma for gray samples), the noise is
    ``(Poisson(q * v) / v - q) * scale``; gray samples share one noise map across channels.

    Args:
        x: (B, 3, H, W) float in [0, 1].
        scale: (B,) or scalar noise strength (0 leaves x unchanged).
        gray: (B,) bool or scalar.
        generator: on x's device.
        clip: clamp the result to [0, 1].

    Returns:
        (B, 3, H, W) float.
    """
    _check_images(x)
    b = x.shape[0]
    scale = _per_sample(scale, b, x).view(-1, 1, 1, 1)
    gray = torch.as_tensor(gray, device=x.device).reshape(-1).expand(b).view(-1, 1, 1, 1).bool()
    noise = torch.empty_like(x)
    # Gray samples draw one Poisson map from their luma (a third of the samples of a colour map).
    for sel, use_gray in ((~gray.view(-1), False), (gray.view(-1), True)):
        if not bool(sel.any()):
            continue
        idx = torch.nonzero(sel).flatten()
        xs = _gray(x[idx]) if use_gray else x[idx]
        codes = (xs * 255.0).round_().clamp_(0, 255)  # 8-bit levels of the noise-free image
        vals = _levels_of_codes(codes).view(-1, 1, 1, 1)
        counts = _poisson(codes * (vals / 255.0), generator)
        # Poisson(q v) / v - q with q = codes / 255
        noise[idx] = counts.div_(vals).sub_(codes.div_(255.0)).expand(-1, x.shape[1], -1, -1)
    out = torch.addcmul(x, noise, scale)
    return out.clamp_(0, 1) if clip else out


def add_noise(
    x: Tensor,
    gaussian: Tensor,
    sigma: Tensor,
    poisson_scale: Tensor,
    gray: Tensor,
    generator: torch.Generator,
) -> Tensor:
    """Gaussian noise for samples with ``gaussian`` True, Poisson noise for the others; clipped to [0, 1].

    Args:
        x: (B, 3, H, W) float in [0, 1].
        gaussian: (B,) bool choice of noise kind.
        sigma: (B,) Gaussian std in [0, 1] units; poisson_scale: (B,) Poisson strength; gray: (B,) bool.
        generator: on x's device.

    Returns:
        (B, 3, H, W) float in [0, 1].
    """
    gaussian = gaussian.to(device=x.device, dtype=torch.bool)
    if bool(gaussian.all()):
        return add_gaussian_noise(x, sigma, gray, generator)
    if not bool(gaussian.any()):
        return add_poisson_noise(x, poisson_scale, gray, generator)
    gi = torch.nonzero(gaussian).flatten()
    pi = torch.nonzero(~gaussian).flatten()
    out = torch.empty_like(x)
    out[gi] = add_gaussian_noise(x[gi], sigma[gi], gray[gi], generator)
    out[pi] = add_poisson_noise(x[pi], poisson_scale[pi], gray[pi], generator)
    return out


def resolve_jpeg_codec(codec: str, device: torch.device | str) -> str:
    """Pick the JPEG implementation for a device.

    ``auto`` picks ``libjpeg`` (torchvision's real codec) on CPU and ``kornia`` (batched differentiable
    approximation, per-sample quality in one call) on CUDA. Measured on the 2-core CPU for 16 images at the
    sizes the pipeline sees, libjpeg is as fast as kornia at ~400 px and 2.5x faster at 128 px, and it is the
    real codec; on CUDA nvjpeg needs one call per distinct quality plus host round trips, while kornia's codec
    is a handful of batched tensor ops with per-sample quality, closest to the official DiffJPEG.
    """
    if codec not in JPEG_CODECS:
        raise ValueError(f"unknown JPEG codec {codec!r}; choose from {JPEG_CODECS}")
    if codec != "auto":
        return codec
    return "libjpeg" if torch.device(device).type == "cpu" else "kornia"


def jpeg(x: Tensor, quality: Tensor | float, codec: str = "auto") -> Tensor:
    """JPEG-compress and decode every image at its own quality (no gradients needed).

    Args:
        x: (B, 3, H, W) float; clamped to [0, 1] first (the official clamps before DiffJPEG).
        quality: (B,) or scalar quality in [1, 100]; ``libjpeg`` rounds it to an integer.
        codec: ``auto`` | ``libjpeg`` | ``kornia`` (see ``resolve_jpeg_codec``).

    Returns:
        (B, 3, H, W) float in [0, 1] (8-bit valued for ``libjpeg``).
    """
    _check_images(x)
    if x.shape[1] != 3:
        raise ValueError("jpeg expects RGB images (B, 3, H, W)")
    b = x.shape[0]
    quality = _per_sample(quality, b, x.float()).clamp(1, 100)
    x = x.clamp(0, 1)
    codec = resolve_jpeg_codec(codec, x.device)
    if codec == "kornia":
        with torch.no_grad():
            return kornia.enhance.jpeg_codec_differentiable(x.float(), quality.float()).to(x.dtype)
    from torchvision.io import decode_jpeg, encode_jpeg

    b, _, h, w = x.shape
    # Build the uint8 batch directly in HWC memory order: torchvision's encoder wants HWC and would otherwise
    # make a slow per-image permuted copy. x is in [0, 1], so +0.5 then truncation is round-half-up.
    hwc = torch.empty((b, h, w, 3), dtype=torch.uint8, device=x.device)
    hwc.permute(0, 3, 1, 2).copy_(x * 255.0 + 0.5)
    q_int = quality.round().to(torch.int64).tolist()
    decoded_hwc = torch.empty_like(hwc)
    if x.device.type == "cpu":
        # libjpeg codes one image per call (torchvision's list API loops in C++ too); the images are split
        # into fixed chunks coded on the thread pool (torch releases the GIL), so both cores work.
        def code(chunk: list[int]) -> None:
            for i in chunk:
                data = encode_jpeg(hwc[i].permute(2, 0, 1), quality=q_int[i])
                decoded_hwc[i].copy_(decode_jpeg(data).permute(1, 2, 0))  # decoder output: HWC seen as CHW

        chunks = [c.tolist() for c in torch.arange(b).tensor_split(_CPU_CHUNKS) if c.numel()]
        if torch.get_num_threads() > 1 and len(chunks) > 1:
            list(_pool().map(code, chunks))
        else:
            for c in chunks:
                code(c)
    else:
        # nvjpeg: one batched call per distinct quality (torchvision takes one quality per call); it wants
        # contiguous CHW and the decoder reads the bitstreams from host memory.
        for q in sorted(set(q_int)):
            idx = [i for i, v in enumerate(q_int) if v == q]
            images = [hwc[i].permute(2, 0, 1).contiguous() for i in idx]
            encoded = [e.cpu() for e in encode_jpeg(images, quality=q)]
            for i, d in zip(idx, decode_jpeg(encoded, device=x.device), strict=True):
                decoded_hwc[i].copy_(d.permute(1, 2, 0))
    out = torch.empty_like(x)
    out.copy_(decoded_hwc.permute(0, 3, 1, 2))
    return out.mul_(1.0 / 255.0)
