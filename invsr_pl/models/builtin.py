"""Names of the built-in backbones: what ``--backbone`` / ``InvSRPipeline.from_sd_turbo`` accept besides a hub
id or a folder. Torch-free, so that commands can check names before their heavy imports."""

from __future__ import annotations

TINY = "tiny"  # random tiny SD-Turbo twin (models/tiny.py)
TINY_TRAINED = "tiny_trained"  # the shipped trained tiny twin (models/tiny_trained.py)
SD_TURBO_RANDOM = "sd_turbo_random"  # SD-Turbo's architecture with random weights
BUILTIN_BACKBONES = (TINY, TINY_TRAINED, SD_TURBO_RANDOM)
