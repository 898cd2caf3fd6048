"""Typed settings of the Real-ESRGAN degradation: training and ImageNet-Test presets (docs/data.md).

Defaults are the paper's training settings. Each dataclass field is a YAML key one-to-one:
``conf/data/degradation/realesrgan_x4.yaml`` holds ``first_stage:``, ``second_stage:`` and ``final_stage:``
sub-mappings whose keys are the fields below (``kernel:`` nested inside the first two). Ranges are
``[low, high]`` pairs, probabilities are in [0, 1], noise sigmas are on the 0-255 scale as in the recipe.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .kernels import KERNEL_TYPES, kernel_sizes
from .ops import JPEG_CODECS, RESIZE_MODES

T = TypeVar("T")


def _pair(value: Any, name: str, low: float | None = None, high: float | None = None) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a [low, high] pair, got {value!r}") from err
    if a > b:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    if (low is not None and a < low) or (high is not None and b > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")
    return a, b


def _prob(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value


def _probs(value: Any, n: int, name: str) -> tuple[float, ...]:
    probs = tuple(float(v) for v in value)
    if len(probs) != n or any(p < 0 for p in probs) or sum(probs) <= 0:
        raise ValueError(f"{name} needs {n} non-negative weights with a positive sum, got {value!r}")
    return probs


@dataclass
class KernelConfig:
    """One random blur kernel per sample (docs/data.md).

    Attributes:
        size: padded kernel size (odd); actual sizes are uniform over {3, 5, ..., size - 2}.
        sinc_prob: probability of a circular low-pass (sinc) kernel instead of the Gaussian family.
        type_probs: weights of (iso, aniso, generalized_iso, generalized_aniso, plateau_iso, plateau_aniso).
        sigma_range: Gaussian standard deviation range in pixels.
        betag_range: generalized-Gaussian shape exponent range.
        betap_range: plateau shape exponent range.
    """

    size: int = 21
    sinc_prob: float = 0.1
    type_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sigma_range: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)

    def __post_init__(self) -> None:
        self.size = int(self.size)
        kernel_sizes(self.size)  # validates odd >= 5
        self.sinc_prob = _prob(self.sinc_prob, "kernel.sinc_prob")
        self.type_probs = _probs(self.type_probs, len(KERNEL_TYPES), "kernel.type_probs")
        self.sigma_range = _pair(self.sigma_range, "kernel.sigma_range", low=1e-3)
        self.betag_range = _pair(self.betag_range, "kernel.betag_range", low=1e-3)
        self.betap_range = _pair(self.betap_range, "kernel.betap_range", low=1e-3)


@dataclass
class FirstStageConfig:
    """First degradation stage: blur -> resize -> noise -> JPEG (docs/data.md).

    Attributes:
        kernel: blur kernel settings (kernel 1).
        blur_prob: per-sample probability of blurring (1 in the recipe).
        resize_probs: weights of (up, down, keep).
        resize_range: [down_low, up_high]; up scales ~ U[1, high], down ~ U[low, 1]. One scale per batch.
        resize_modes: interpolation modes drawn uniformly per sample.
        gaussian_noise_prob: probability of Gaussian (else Poisson) noise, per sample.
        noise_range: Gaussian sigma range on the 0-255 scale.
        poisson_scale_range: Poisson strength range.
        gray_noise_prob: probability of channel-shared (gray) noise, per sample.
        jpeg_range: JPEG quality range, per sample.
    """

    kernel: KernelConfig = field(default_factory=KernelConfig)
    blur_prob: float = 1.0
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self) -> None:
        _validate_stage(self, "first_stage")
        self.jpeg_range = _pair(self.jpeg_range, "first_stage.jpeg_range", 1, 100)


@dataclass
class SecondStageConfig:
    """Second stage, taken per sample with probability ``prob``: blur -> resize -> noise (docs/data.md).

    The resize target is (H / scale * s, W / scale * s), one s per batch, as in the recipe.
    """

    prob: float = 0.5
    kernel: KernelConfig = field(default_factory=lambda: KernelConfig(size=15, sigma_range=(0.2, 1.5)))
    blur_prob: float = 0.8
    resize_probs: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range: tuple[float, float] = (0.3, 1.2)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob: float = 0.4

    def __post_init__(self) -> None:
        self.prob = _prob(self.prob, "second_stage.prob")
        _validate_stage(self, "second_stage")


@dataclass
class FinalStageConfig:
    """Final stage: resize to GT / scale, sinc filter and JPEG in one of two orders (docs/data.md).

    Attributes:
        sinc_prob: per-sample probability of the final sinc filter (else identity).
        sinc_size: padded final sinc size; actual sizes uniform over {3, ..., sinc_size - 2}.
        sinc_omega_range: cut-off range in radians/pixel.
        resize_modes: modes drawn uniformly per sample.
        jpeg_range: JPEG quality range.
        resize_first_prob: per-sample probability of order (a) resize -> sinc -> JPEG; else (b) JPEG -> resize
            -> sinc.
    """

    sinc_prob: float = 0.8
    sinc_size: int = 15
    sinc_omega_range: tuple[float, float] = (math.pi / 3, math.pi)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    resize_first_prob: float = 0.5

    def __post_init__(self) -> None:
        self.sinc_prob = _prob(self.sinc_prob, "final_stage.sinc_prob")
        self.sinc_size = int(self.sinc_size)
        kernel_sizes(self.sinc_size)
        self.sinc_omega_range = _pair(self.sinc_omega_range, "final_stage.sinc_omega_range", 1e-3, math.pi)
        self.resize_modes = _modes(self.resize_modes, "final_stage.resize_modes")
        self.jpeg_range = _pair(self.jpeg_range, "final_stage.jpeg_range", 1, 100)
        self.resize_first_prob = _prob(self.resize_first_prob, "final_stage.resize_first_prob")


def _modes(value: Any, name: str) -> tuple[str, ...]:
    modes = (value,) if isinstance(value, str) else tuple(str(m) for m in value)
    bad = [m for m in modes if m not in RESIZE_MODES]
    if not modes or bad:
        raise ValueError(f"{name} must be a non-empty subset of {RESIZE_MODES}, got {value!r}")
    return modes


def _validate_stage(cfg: FirstStageConfig | SecondStageConfig, name: str) -> None:
    cfg.kernel = coerce(cfg.kernel, KernelConfig, f"{name}.kernel")
    cfg.blur_prob = _prob(cfg.blur_prob, f"{name}.blur_prob")
    cfg.resize_probs = _probs(cfg.resize_probs, 3, f"{name}.resize_probs")
    cfg.resize_range = _pair(cfg.resize_range, f"{name}.resize_range", low=1e-3)
    if not cfg.resize_range[0] <= 1.0 <= cfg.resize_range[1]:
        raise ValueError(f"{name}.resize_range must contain 1 (down below, up above), got {cfg.resize_range}")
    cfg.resize_modes = _modes(cfg.resize_modes, f"{name}.resize_modes")
    cfg.gaussian_noise_prob = _prob(cfg.gaussian_noise_prob, f"{name}.gaussian_noise_prob")
    cfg.noise_range = _pair(cfg.noise_range, f"{name}.noise_range", low=0)
    cfg.poisson_scale_range = _pair(cfg.poisson_scale_range, f"{name}.poisson_scale_range", low=0)
    cfg.gray_noise_prob = _prob(cfg.gray_noise_prob, f"{name}.gray_noise_prob")


def coerce(value: Any, cls: type[T], name: str) -> T:
    """Build ``cls`` from an instance, ``None`` (defaults) or a mapping (Hydra passes nested YAML so).

    Unknown keys raise a ``ValueError`` naming the valid ones; nested mappings are converted recursively
    by the dataclasses' own validation.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping) or hasattr(value, "items"):
        data = {str(k): v for k, v in value.items()}
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {name}; valid keys: {sorted(valid)}")
        return cls(**data)
    raise TypeError(f"{name} must be a {cls.__name__} or a mapping, got {type(value).__name__}")


@dataclass
class DegradationConfig:
    """Whole pipeline: scale, the three stages and the JPEG codec (``auto`` | ``libjpeg`` | ``kornia``)."""

    scale: int = 4
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    second_stage: SecondStageConfig = field(default_factory=SecondStageConfig)
    final_stage: FinalStageConfig = field(default_factory=FinalStageConfig)
    jpeg_codec: str = "auto"

    def __post_init__(self) -> None:
        self.scale = int(self.scale)
        if self.scale < 1:
            raise ValueError(f"scale must be a positive integer, got {self.scale}")
        self.first_stage = coerce(self.first_stage, FirstStageConfig, "first_stage")
        self.second_stage = coerce(self.second_stage, SecondStageConfig, "second_stage")
        self.final_stage = coerce(self.final_stage, FinalStageConfig, "final_stage")
        if self.jpeg_codec not in JPEG_CODECS:
            raise ValueError(f"jpeg_codec must be one of {JPEG_CODECS}, got {self.jpeg_codec!r}")


def realesrgan_config(scale: int = 4) -> DegradationConfig:
    """The paper's training degradation (docs/data.md): ``DegradationConfig(scale=scale)``."""
    return DegradationConfig(scale=scale)


def imagenet_test_config(scale: int = 4) -> DegradationConfig:
    """ImageNet-Test synthesis settings (docs/data.md).

    Kernel 1 padded to 13 (sizes 3..11, iso/aniso 0.6/0.4, sigma [0.2, 0.8], sinc 0.1); resize [0.5, 1.5];
    noise sigma [1, 15] or Poisson [0.05, 0.3]; JPEG [70, 95]; second stage never taken (its would-be settings
    kept for reference); final sinc 0.2 padded to 7 (sizes 3, 5); final JPEG [80, 100].
    """
    iso_aniso = (0.6, 0.4, 0.0, 0.0, 0.0, 0.0)
    return DegradationConfig(
        scale=scale,
        first_stage=FirstStageConfig(
            kernel=KernelConfig(
                size=13,
                sinc_prob=0.1,
                type_probs=iso_aniso,
                sigma_range=(0.2, 0.8),
                betag_range=(1.0, 1.5),
                betap_range=(1.0, 1.2),
            ),
            resize_range=(0.5, 1.5),
            noise_range=(1.0, 15.0),
            poisson_scale_range=(0.05, 0.3),
            jpeg_range=(70.0, 95.0),
        ),
        second_stage=SecondStageConfig(
            prob=0.0,
            kernel=KernelConfig(
                size=7,
                sinc_prob=0.0,
                type_probs=iso_aniso,
                sigma_range=(0.2, 0.5),
                betag_range=(1.0, 1.5),
                betap_range=(1.0, 1.2),
            ),
            blur_prob=0.2,
            resize_range=(0.8, 1.2),
            noise_range=(1.0, 10.0),
            poisson_scale_range=(0.05, 0.2),
        ),
        final_stage=FinalStageConfig(sinc_prob=0.2, sinc_size=7, jpeg_range=(80.0, 100.0)),
    )
