"""An evaluation config takes what its checkpoint was trained with (docs/evaluation.md#which-model-is-scored).

A ``train.py`` checkpoint or an ``invsr-export`` folder records its provenance (invsr_pl/utils/provenance.py):
the backbone, scale and seed it was trained and validated with. :func:`use_checkpoint_provenance` puts them
into the composed ``evaluate.py`` config unless the command line names them; :func:`random_weights_warning`
says when the numbers would be those of random weights.
"""

from __future__ import annotations

from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from invsr_pl.utils.checkpoint import WeightFileError
from invsr_pl.utils.errors import SetupError
from invsr_pl.utils.logging import get_logger
from invsr_pl.utils.provenance import (
    BackboneMismatchError,
    backbone_identity,
    check_backbone,
    read_provenance,
)

log = get_logger(__name__)  # rank zero only

# Backbones with random weights (conf/model/backbone): numbers on them say nothing about InvSR.
RANDOM_BACKBONES = ("tiny", "sd_turbo_random")
TRAINED_HINT = (
    "score a trained checkpoint with `python evaluate.py ckpt_path=logs/quickstart/runs/<time>/checkpoints/"
    "last.ckpt` (after `python train.py experiment=quickstart`), or the released weights with `python "
    "evaluate.py model/backbone=sd_turbo model/noise_predictor=default "
    "ckpt_path=weights/noise_predictor_sd_turbo_v5.pth`"
)
MISMATCH_KEY = "allow_backbone_mismatch"


def _command_line_overrides() -> list[str]:
    """The overrides typed on the command line (``key=value``), empty outside a Hydra run."""
    try:
        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except (ValueError, AttributeError):  # a config composed without its hydra node
        return []


def _named(overrides: list[str], *keys: str) -> list[str]:
    """The overrides that set ``keys`` or anything below them (``model/backbone=...``, ``scale=2``)."""
    found = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if any(key == k or key.startswith((f"{k}.", f"{k}/")) for k in keys):
            found.append(override)
    return found


def use_checkpoint_provenance(cfg: DictConfig) -> dict[str, Any] | None:
    """Take what ``cfg.ckpt_path`` was trained with, unless the command line says otherwise (in place).

    With a recorded provenance (a ``train.py`` ``.ckpt`` or an ``invsr-export`` folder): ``model.backbone``
    becomes the recorded backbone config when no ``model/backbone`` / ``model.backbone.*`` override was given,
    else the named one must be the same backbone or ``allow_backbone_mismatch=true`` must be set; ``scale``,
    ``seed`` and ``sampler.chopping_size`` take the recorded values unless overridden, so the table scores
    what validation scored (docs/evaluation.md). Official weight files carry nothing: ``cfg`` is unchanged.

    Returns:
        The provenance, or None.

    Raises:
        SetupError: unreadable checkpoint, or a backbone that differs (one line naming both).
    """
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    try:
        provenance = read_provenance(str(ckpt))
    except (FileNotFoundError, WeightFileError) as err:
        raise SetupError(f"ckpt_path: {err}") from err
    if provenance is None:
        return None
    overrides = _command_line_overrides()
    named = _named(overrides, "model/backbone", "model.backbone")
    with open_dict(cfg):
        if not named:
            cfg.model.backbone = provenance["backbone"]["config"]
        elif not cfg.get(MISMATCH_KEY, False):
            name, revision = backbone_identity(cfg.model.backbone)
            try:
                check_backbone(
                    provenance, name, revision, weights=f"ckpt_path {ckpt}", requested_as=" ".join(named),
                    accept_hint=f"add {MISMATCH_KEY}=true",
                )  # fmt: skip
            except BackboneMismatchError as err:
                raise SetupError(str(err)) from None
        if not _named(overrides, "scale") and provenance.get("scale"):
            cfg.scale = int(provenance["scale"])
        if not _named(overrides, "seed") and provenance.get("seed") is not None:
            cfg.seed = int(provenance["seed"])
        chopping = (provenance.get("validation") or {}).get("chopping_size")
        if not _named(overrides, "sampler") and chopping:
            cfg.sampler.chopping_size = int(chopping)
    recorded = provenance["backbone"]["name"]
    used = backbone_identity(cfg.model.backbone)[0]
    log.info(
        "ckpt_path %s was trained on the backbone %r at x%s%s", ckpt, recorded, provenance.get("scale"),
        "" if named else ": evaluating on it",
    )  # fmt: skip
    if used != recorded:
        log.warning(
            "evaluating on %r, not %r (%s=true): the numbers are not the run's", used, recorded, MISMATCH_KEY
        )
    return provenance


def random_weights_warning(cfg: DictConfig) -> str | None:
    """The console warning for random (untrained) weights, or None: no ``ckpt_path`` (random noise
    predictor) or a random backbone (``tiny``, ``sd_turbo_random``)."""
    model = cfg.get("model") or {}
    if "noise_predictor" not in model:  # another evaluation system (e.g. the latent LPIPS): not InvSR weights
        return None
    backbone = backbone_identity(model["backbone"])[0] if "backbone" in model else None
    parts = []
    if not cfg.get("ckpt_path"):
        parts.append("a random (untrained) noise predictor (no ckpt_path)")
    if backbone in RANDOM_BACKBONES:
        parts.append(f"the random backbone {backbone!r}")
    if not parts:
        return None
    return f"scoring {' on '.join(parts)}: these numbers say nothing about InvSR; {TRAINED_HINT}"
