"""What a trained noise predictor was trained with, recorded where its weights go (docs/checkpoints.md).

A noise predictor only works against the frozen backbone it was trained with: scored on another one it gives
numbers that mean nothing (a quick-start checkpoint on the random ``tiny`` twin instead of ``tiny_trained``
scores ~14 dB instead of ~23 dB). So ``train.py`` records a *provenance* dict in every checkpoint under
:data:`PROVENANCE_KEY`, ``invsr-export`` copies it to ``<folder>/invsr_provenance.json``
(:data:`EXPORT_FILE`), and ``evaluate.py``, ``invsr-sr`` and the demo read it back with
:func:`read_provenance` to use that backbone by default and to refuse another (:func:`check_backbone`).
The released ``.pth`` files carry nothing.

Format 1 (plain JSON-able values)::

    {"format": 1,
     "backbone": {"name": "tiny_trained" | "tiny" | "tiny_sdxl_turbo" | "tiny_sd35_turbo" | "sd_turbo_random"
                          | "<hub id>" | "<folder>",
                  "choice": "<Hydra model/backbone option>" | None,
                  "config": {...the full resolved model.backbone config...},
                  "revision": str | None},
     "scale": int, "noise_predictor": {...model.noise_predictor config...}, "prompt": str | None,
     "seed": int | None,
     "validation": {"chopping_size": int | None, "color_fix": str, "num_steps": [int, ...]}}

``backbone.name`` is what ``invsr-sr --backbone`` takes; ``prompt`` is None for backbones without a text
prompt (the tiny twins' fixed embedding). Ground floor: nothing above ``invsr_pl.utils`` is imported.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from invsr_pl.utils.checkpoint import WeightFileError, load_checkpoint

__all__ = [
    "EXPORT_FILE",
    "FORMAT",
    "PROVENANCE_KEY",
    "BackboneMismatchError",
    "backbone_identity",
    "check_backbone",
    "read_provenance",
    "training_provenance",
]

PROVENANCE_KEY = "invsr_provenance"  # in a train.py checkpoint
EXPORT_FILE = "invsr_provenance.json"  # in an invsr-export folder
FORMAT = 1

# Hydra `_target_` suffix of each backbone builder -> (name for invsr-sr --backbone | None = the hub id or
# folder in the config's `model` key, the conf/model/backbone option it comes from)
_BUILDERS = {
    "load_tiny_trained_sd_turbo": ("tiny_trained", "tiny_trained"),
    "build_tiny_sd_turbo": ("tiny", "tiny"),
    "FrozenSDTurbo.random_sd_turbo": ("sd_turbo_random", "sd_turbo_random"),
    "FrozenSDTurbo.from_pretrained": (None, "sd_turbo"),
    "build_tiny_sdxl_turbo": ("tiny_sdxl_turbo", "tiny_sdxl_turbo"),
    "build_tiny_sd35_turbo": ("tiny_sd35_turbo", "tiny_sd35_turbo"),
    "FrozenSDXLTurbo.from_pretrained": (None, "sdxl_turbo"),
    "FrozenSD35Turbo.from_pretrained": (None, "sd35_turbo"),
}
# the default `model` of each hub builder (a config without the key loads this id)
_DEFAULT_IDS = {
    "sd_turbo": "stabilityai/sd-turbo",
    "sdxl_turbo": "stabilityai/sdxl-turbo",
    "sd35_turbo": "stabilityai/stable-diffusion-3.5-large-turbo",
}


class BackboneMismatchError(ValueError):
    """The backbone named by the user is not the one the weights were trained with (one line; exit 2)."""


def _plain(value: Any) -> Any:
    """OmegaConf containers (resolved) and tuples -> plain dicts/lists, so checkpoints stay weights-only
    readable and the export file is JSON."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def backbone_identity(backbone_cfg: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(name, revision)`` of a ``model.backbone`` config: the value ``invsr-sr --backbone`` takes.

    ``tiny_trained`` / ``tiny`` / ``sd_turbo_random`` for the built-in builders, the hub id or folder of
    ``model`` for SD-Turbo; any other builder is named by its ``_target_``.
    """
    target = str(backbone_cfg.get("_target_", ""))
    for suffix, (name, option) in _BUILDERS.items():
        if target.endswith(suffix):
            if name is None:
                return str(backbone_cfg.get("model", _DEFAULT_IDS[option])), backbone_cfg.get("revision")
            return name, None
    return target, backbone_cfg.get("revision")


def _choice(backbone_cfg: Mapping[str, Any], choice: str | None) -> str | None:
    """The ``model/backbone`` option: given, else that of a built-in builder, else Hydra's runtime choice
    (a user's own option file). Hydra's record is global state, so it is the last resort."""
    if choice is not None:
        return choice
    target = str(backbone_cfg.get("_target_", ""))
    known = next((option for suffix, (_, option) in _BUILDERS.items() if target.endswith(suffix)), None)
    return known if known is not None else _hydra_choice("model/backbone")


def _prompt(backbone_cfg: Mapping[str, Any]) -> str | None:
    """The configured prompt, else the builder's default ``prompt`` argument; None without one."""
    if backbone_cfg.get("prompt") is not None:
        return str(backbone_cfg["prompt"])
    target = backbone_cfg.get("_target_")
    if not target:
        return None
    try:
        from hydra.utils import get_method

        builder = get_method(str(target))  # already imported: the backbone was built from this config
        default = inspect.signature(builder).parameters.get("prompt")
    except Exception:  # noqa: BLE001 - an unimportable target records no prompt rather than failing a save
        return None
    return default.default if default is not None and isinstance(default.default, str) else None


def training_provenance(cfg: Mapping[str, Any], backbone_choice: str | None = None) -> dict[str, Any] | None:
    """The provenance dict (format 1, see the module docstring) of a composed ``train.py`` config; None for
    a model without ``model.backbone`` and ``model.noise_predictor`` (e.g. the latent-LPIPS system).

    Args:
        cfg: the training config (``DictConfig`` or mapping) with ``model.backbone``,
            ``model.noise_predictor``, optional top-level ``scale`` and ``seed``.
        backbone_choice: the ``model/backbone`` option; None: inferred from the builder, else Hydra's
            ``runtime.choices``.
    """
    model = cfg["model"]
    if not isinstance(model.get("backbone"), Mapping) or not isinstance(
        model.get("noise_predictor"), Mapping
    ):
        return None
    backbone_cfg = _plain(model["backbone"])
    name, revision = backbone_identity(backbone_cfg)
    noise_predictor = _plain(model["noise_predictor"])
    scale = cfg.get("scale") or noise_predictor.get("scale") or 4
    return {
        "format": FORMAT,
        "backbone": {
            "name": name,
            "choice": _choice(backbone_cfg, backbone_choice),
            "config": backbone_cfg,
            "revision": revision,
        },
        "scale": int(scale),
        "noise_predictor": noise_predictor,
        "prompt": _prompt(backbone_cfg),
        "seed": None if cfg.get("seed") is None else int(cfg["seed"]),
        "validation": {
            "chopping_size": model.get("chopping_size"),
            "color_fix": model.get("color_fix", "none"),
            "num_steps": _plain(model.get("val_num_steps")),
        },
    }


def _hydra_choice(group: str) -> str | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - a config composed without Hydra's runtime node has no choices
        return None


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The provenance recorded with noise-predictor weights, or None when they carry none.

    Args:
        path: a ``train.py`` ``.ckpt`` (``checkpoint[PROVENANCE_KEY]``), an ``invsr-export`` folder
            (``<folder>/invsr_provenance.json``), its ``noise_predictor/`` subfolder or a ``.safetensors``
            in either (the record is looked up from the file's folder and its parent). Official ``.pth``
            files, older checkpoints and folders without the file give None (today's behaviour: nothing to
            check).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        WeightFileError: the checkpoint cannot be read, or the provenance is malformed (one line).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"noise predictor {path} does not exist")
    if path.is_dir() or path.suffix == ".safetensors":
        folder = path if path.is_dir() else path.parent
        # the export root, or its noise_predictor/ subfolder (diffusers' subfolder layout)
        found = [f / EXPORT_FILE for f in (folder, folder.parent) if (f / EXPORT_FILE).is_file()]
        if not found:
            return None
        record = found[0]
        try:
            data = json.loads(record.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightFileError(f"{record} is not readable JSON ({err})") from err
        return _validated(data, record)
    if path.suffix != ".ckpt":
        return None
    data = load_checkpoint(path, mmap=True).get(PROVENANCE_KEY)
    return None if data is None else _validated(data, path)


def _validated(data: Any, where: Path) -> dict[str, Any]:
    if not isinstance(data, Mapping) or not isinstance(data.get("backbone"), Mapping):
        raise WeightFileError(f"{where}: the {PROVENANCE_KEY} record is not a provenance dict")
    if int(data.get("format", 0)) > FORMAT:
        raise WeightFileError(
            f"{where}: provenance format {data.get('format')} is newer than this version reads ({FORMAT}); "
            "update invsr-pl"
        )
    return dict(data)


def check_backbone(
    provenance: Mapping[str, Any] | None,
    requested: str,
    requested_revision: str | None = None,
    *,
    weights: str | Path = "the noise predictor",
    requested_as: str = "",
    accept_hint: str = "",
) -> None:
    """Refuse a backbone other than the one ``provenance`` records (None: nothing recorded, accepted).

    Args:
        provenance: from :func:`read_provenance`.
        requested: the backbone the user named, as :func:`backbone_identity` names it.
        requested_revision: its hub revision (compared only when both are set).
        weights: the checkpoint/folder, for the message.
        requested_as: how the user named it (e.g. ``"model/backbone=tiny"``, ``"--backbone tiny"``).
        accept_hint: how to score it anyway (e.g. ``"add allow_backbone_mismatch=true"``).

    Raises:
        BackboneMismatchError: one line naming both backbones, how to use the recorded one and the override.
    """
    if provenance is None:
        return
    recorded = provenance["backbone"]
    name, revision = str(recorded.get("name")), recorded.get("revision")
    same_revision = revision is None or requested_revision is None or str(revision) == str(requested_revision)
    if _same_name(name, requested) and same_revision:
        return
    have = name + (f"@{revision}" if revision else "")
    want = requested + (f"@{requested_revision}" if requested_revision else "")
    shown = f" ({requested_as})" if requested_as else ""
    hint = f", or {accept_hint} to score it on {want!r} anyway" if accept_hint else ""
    raise BackboneMismatchError(
        f"{weights} was trained with the backbone {have!r}, but the backbone {want!r}{shown} was named: "
        f"its scores would be meaningless; drop the backbone choice to use {name!r}{hint}"
    )


def _same_name(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()  # one folder spelled two ways
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
