"""Per-sample blur kernels of the Real-ESRGAN degradation, drawn and built as batched tensors.

Every function here is pure: parameters are drawn from an explicit ``torch.Generator`` (on the device where
the kernels will live) and the kernels are computed for the whole batch at once. Kernels of different
actual sizes share one padded ``size x size`` grid: a kernel of size k is the centred ``k x k`` window of
the grid, zero outside, which is exactly a ``k x k`` kernel zero-padded to ``size``
(docs/data.md#degradation-pipeline).

Kernel families (index into ``KERNEL_TYPES``), with Q = x^T Sigma^-1 x the Mahalanobis form of a rotated
Gaussian with standard deviations (sigma_x, sigma_y) and rotation theta:

- ``iso`` / ``aniso``: exp(-Q / 2) (iso: sigma_x = sigma_y, theta = 0)
- ``generalized_iso`` / ``generalized_aniso``: exp(-(Q^beta) / 2), beta from ``betag_range``
- ``plateau_iso`` / ``plateau_aniso``: 1 / (1 + Q^beta), beta from ``betap_range``
- ``sinc``: circular low-pass, omega_c J1(omega_c r) / (2 pi r), centre omega_c^2 / (4 pi)

All kernels are normalised to sum to 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
SINC = len(KERNEL_TYPES)  # type index used for sinc kernels in sampled parameters

# docs/data.md#kernels (Real-ESRGAN): kernels of size >= 13 draw the sinc cut-off from [pi/5, pi], smaller
# kernels from [pi/3, pi] (a small kernel cannot represent a very low cut-off).
SINC_LARGE_KERNEL = 13


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """(n,) float32 uniform in [low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def kernel_sizes(size: int) -> list[int]:
    """Odd actual kernel sizes {3, 5, ..., size - 2} of a padded size (Real-ESRGAN ``range(3, size, 2)``)."""
    if size < 5 or size % 2 == 0:
        raise ValueError(f"padded kernel size must be odd and >= 5, got {size}")
    return list(range(3, size, 2))


def _beta(n: int, beta_range: Sequence[float], generator: torch.Generator, device: torch.device) -> Tensor:
    """Shape exponent, drawn as Real-ESRGAN does: with probability 0.5 from [low, 1], else from [1, high].

    With ``low == 1`` (the plateau default [1, 2]) half the draws are exactly 1.
    """
    low, high = float(beta_range[0]), float(beta_range[1])
    below = torch.rand(n, generator=generator, device=device) < 0.5
    b_low = _uniform(n, low, 1.0, generator, device)
    b_high = _uniform(n, 1.0, high, generator, device)
    return torch.where(below, b_low, b_high)


def sample_kernel_params(
    batch: int,
    size: int,
    generator: torch.Generator,
    *,
    sinc_prob: float,
    type_probs: Sequence[float],
    sigma_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Draw one blur kernel's parameters per sample (docs/data.md#kernels).

    Args:
        batch: number of kernels B.
        size: padded kernel size (odd); actual sizes are uniform over ``kernel_sizes(size)``.
        generator: source of randomness; its device is used unless ``device`` is given.
        sinc_prob: probability that a kernel is a circular low-pass (sinc) kernel.
        type_probs: probabilities of the six ``KERNEL_TYPES`` for non-sinc kernels (need not be normalised).
        sigma_range: [low, high] of the Gaussian standard deviations (pixels).
        betag_range / betap_range: shape exponent ranges of the generalized / plateau kernels.

    Returns:
        dict of (B,) tensors: ``ksize`` (int64), ``type`` (int64, ``SINC`` for sinc), ``sigma_x``,
        ``sigma_y``, ``theta``, ``beta``, ``omega_c`` (float32; unused entries hold neutral values).
    """
    if len(type_probs) != len(KERNEL_TYPES):
        raise ValueError(
            f"type_probs needs {len(KERNEL_TYPES)} entries ({KERNEL_TYPES}), got {len(type_probs)}"
        )
    dev = torch.device(device) if device is not None else generator.device
    sizes = torch.tensor(kernel_sizes(size), device=dev)
    ksize = sizes[torch.randint(len(sizes), (batch,), generator=generator, device=dev)]
    probs = torch.tensor([float(p) for p in type_probs], device=dev)
    if probs.sum() <= 0:
        raise ValueError("type_probs must have a positive sum")
    ktype = torch.multinomial(probs.expand(batch, -1), 1, generator=generator).squeeze(1)
    is_sinc = torch.rand(batch, generator=generator, device=dev) < sinc_prob
    ktype = torch.where(is_sinc, torch.full_like(ktype, SINC), ktype)

    sigma_x = _uniform(batch, sigma_range[0], sigma_range[1], generator, dev)
    sigma_y = _uniform(batch, sigma_range[0], sigma_range[1], generator, dev)
    theta = _uniform(batch, -math.pi, math.pi, generator, dev)
    isotropic = (ktype == 0) | (ktype == 2) | (ktype == 4)
    sigma_y = torch.where(isotropic, sigma_x, sigma_y)
    theta = torch.where(isotropic, torch.zeros_like(theta), theta)

    beta_g = _beta(batch, betag_range, generator, dev)
    beta_p = _beta(batch, betap_range, generator, dev)
    beta = torch.ones(batch, device=dev)
    beta = torch.where((ktype == 2) | (ktype == 3), beta_g, beta)
    beta = torch.where((ktype == 4) | (ktype == 5), beta_p, beta)

    # docs/data.md#degradation-pipeline: omega_c ~ U[pi/3, pi] for size < 13, else U[pi/5, pi].
    u = torch.rand(batch, generator=generator, device=dev)
    low = torch.where(ksize < SINC_LARGE_KERNEL, math.pi / 3, math.pi / 5)
    omega_c = low + (math.pi - low) * u
    return {
        "ksize": ksize,
        "type": ktype,
        "sigma_x": sigma_x,
        "sigma_y": sigma_y,
        "theta": theta,
        "beta": beta,
        "omega_c": omega_c,
    }


def sample_sinc_params(
    batch: int,
    size: int,
    generator: torch.Generator,
    *,
    prob: float,
    omega_range: Sequence[float] = (math.pi / 3, math.pi),
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Draw the final-stage filter per sample: sinc with probability ``prob``, else a delta.

    See docs/data.md#final-stage.

    Returns:
        dict of (B,) tensors ``apply`` (bool), ``ksize`` (int64), ``omega_c`` (float32).
    """
    dev = torch.device(device) if device is not None else generator.device
    sizes = torch.tensor(kernel_sizes(size), device=dev)
    ksize = sizes[torch.randint(len(sizes), (batch,), generator=generator, device=dev)]
    omega_c = _uniform(batch, omega_range[0], omega_range[1], generator, dev)
    apply = torch.rand(batch, generator=generator, device=dev) < prob
    return {"apply": apply, "ksize": ksize, "omega_c": omega_c}


def _grid(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(size, size) integer offsets (x: columns, y: rows) from the centre, float32."""
    ax = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _support_mask(ksize: Tensor, size: int) -> Tensor:
    """(B, size, size) bool: True inside each sample's centred ksize x ksize window."""
    xx, yy = _grid(size, ksize.device)
    half = (ksize.to(torch.float32) - 1).div(2).view(-1, 1, 1)
    return (xx.abs() <= half) & (yy.abs() <= half)


def sinc_kernels(omega_c: Tensor, ksize: Tensor, size: int) -> Tensor:
    """Circular low-pass kernels via the Bessel-J1 formula, zero-padded to ``size``.

    Args:
        omega_c: (B,) cut-off frequencies in radians/pixel, in (0, pi].
        ksize: (B,) odd actual sizes <= size.
        size: padded size (odd).

    Returns:
        (B, size, size) float32 kernels summing to 1.
    """
    xx, yy = _grid(size, omega_c.device)
    r = torch.sqrt(xx**2 + yy**2)  # (size, size)
    w = omega_c.view(-1, 1, 1).to(torch.float32)
    r_safe = torch.where(r > 0, r, torch.ones_like(r))
    k = w * torch.special.bessel_j1(w * r_safe) / (2 * math.pi * r_safe)
    # lim_{r->0} omega J1(omega r) / (2 pi r) = omega^2 / (4 pi)
    k = torch.where(r > 0, k, w**2 / (4 * math.pi))
    k = torch.where(_support_mask(ksize, size), k, torch.zeros_like(k))
    return k / k.sum(dim=(1, 2), keepdim=True)


def gaussian_family_kernels(
    ktype: Tensor, sigma_x: Tensor, sigma_y: Tensor, theta: Tensor, beta: Tensor, ksize: Tensor, size: int
) -> Tensor:
    """Gaussian / generalized Gaussian / plateau kernels (types 0-5 of ``KERNEL_TYPES``), zero-padded.

    Args:
        ktype: (B,) int64 in [0, 5].
        sigma_x, sigma_y: (B,) standard deviations (pixels) before rotation, > 0.
        theta: (B,) rotation in radians.
        beta: (B,) shape exponent (1 for plain Gaussian).
        ksize: (B,) odd actual sizes <= size.
        size: padded size (odd).

    Returns:
        (B, size, size) float32 kernels summing to 1.
    """
    xx, yy = _grid(size, ktype.device)
    c, s = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    # Coordinates in the kernel's principal axes: Q = u^2 / sx^2 + v^2 / sy^2 = x^T Sigma^-1 x with
    # Sigma = R diag(sx^2, sy^2) R^T.
    u = c * xx + s * yy
    v = -s * xx + c * yy
    q = (u / sigma_x.view(-1, 1, 1)) ** 2 + (v / sigma_y.view(-1, 1, 1)) ** 2
    qb = q.pow(beta.view(-1, 1, 1))
    plateau = ((ktype == 4) | (ktype == 5)).view(-1, 1, 1)
    k = torch.where(plateau, 1.0 / (1.0 + qb), torch.exp(-0.5 * qb))
    k = torch.where(_support_mask(ksize, size), k, torch.zeros_like(k))
    return k / k.sum(dim=(1, 2), keepdim=True)


# Kernel taps below this are set to zero before the final normalisation. Gaussian tails underflow to float32
# denormals (down to 1e-45), which make CPU convolutions several times slower, and taps this small change no
# output value representable in float32 (the spacing of floats near 1 is 6e-8).
TINY_TAP = 1e-9


def _drop_tiny(k: Tensor) -> Tensor:
    """Zero taps below ``TINY_TAP`` and renormalise (B, size, size) kernels to sum 1."""
    k = torch.where(k.abs() < TINY_TAP, torch.zeros_like(k), k)
    return k / k.sum(dim=(1, 2), keepdim=True)


def build_kernels(params: dict[str, Tensor], size: int) -> Tensor:
    """Kernels from ``sample_kernel_params`` output: (B, size, size) float32, each summing to 1."""
    gauss = gaussian_family_kernels(
        params["type"].clamp(max=SINC - 1),
        params["sigma_x"],
        params["sigma_y"],
        params["theta"],
        params["beta"],
        params["ksize"],
        size,
    )
    sinc = sinc_kernels(params["omega_c"], params["ksize"], size)
    return _drop_tiny(torch.where((params["type"] == SINC).view(-1, 1, 1), sinc, gauss))


def build_sinc_or_delta(params: dict[str, Tensor], size: int) -> Tensor:
    """Final-stage filters from ``sample_sinc_params``: sinc where ``apply`` else a centred delta.

    Returns:
        (B, size, size) float32 kernels summing to 1.
    """
    sinc = sinc_kernels(params["omega_c"], params["ksize"], size)
    return torch.where(params["apply"].view(-1, 1, 1), sinc, delta_kernels(sinc.shape[0], size, sinc.device))


def delta_kernels(batch: int, size: int, device: torch.device | str | None = None) -> Tensor:
    """(B, size, size) float32 identity kernels (1 at the centre)."""
    k = torch.zeros(batch, size, size, device=device)
    k[:, size // 2, size // 2] = 1.0
    return k
