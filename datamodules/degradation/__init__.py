"""Real-ESRGAN synthetic degradation as pure batched tensor ops (docs/data.md).

Public API: ``RealESRGANDegradation`` (and ``BicubicDegradation``) from ``pipeline``, their config dataclasses
from ``config``, the ``TrainingPairPool`` from ``pair_pool``; ``kernels`` and ``ops`` hold the pure pieces.
"""

from .config import (
    DegradationConfig,
    FinalStageConfig,
    FirstStageConfig,
    KernelConfig,
    SecondStageConfig,
    imagenet_test_config,
    realesrgan_config,
)
from .pair_pool import TrainingPairPool
from .pipeline import BicubicDegradation, RealESRGANDegradation

__all__ = [
    "BicubicDegradation",
    "DegradationConfig",
    "FinalStageConfig",
    "FirstStageConfig",
    "KernelConfig",
    "RealESRGANDegradation",
    "SecondStageConfig",
    "TrainingPairPool",
    "imagenet_test_config",
    "realesrgan_config",
]
