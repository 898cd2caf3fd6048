"""Names of the built-in backbones: what ``--backbone`` / ``InvSRPipeline.from_sd_turbo`` accept besides a hub
id or a folder. Torch-free, so that commands can check names before their heavy imports."""

from __future__ import annotations

TINY = "tiny"  # random tiny SD-Turbo twin (models/tiny.py)
TINY_TRAINED = "tiny_trained"  # the shipped trained tiny twin (models/tiny_trained.py)
SD_TURBO_RANDOM = "sd_turbo_random"  # SD-Turbo's architecture with random weights
TINY_SDXL_TURBO = "tiny_sdxl_turbo"  # random tiny SDXL-Turbo twin (models/tiny.py)
TINY_SD35_TURBO = "tiny_sd35_turbo"  # random tiny SD3.5 Large Turbo twin (models/tiny.py)
BUILTIN_BACKBONES = (TINY, TINY_TRAINED, SD_TURBO_RANDOM, TINY_SDXL_TURBO, TINY_SD35_TURBO)
# the random tiny twins, rebuilt from their recorded seed / width (smoke mode of invsr-sr and the demo)
TINY_TWINS = (TINY, TINY_SDXL_TURBO, TINY_SD35_TURBO)
