"""Start-up checks of a composed training config: fail in seconds, with one line, before anything is built.

``train.py`` calls :func:`check_config` before it instantiates a data module or a model, and
:func:`check_checkpoint_fits` once the model exists (before ``fit``). Everything raised here is a
:class:`SetupError` (or the weight-file errors of :mod:`invsr_pl.utils.checkpoint`), which ``train.py``
reports as one line with exit code 2 (docs/training.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from invsr_pl.launch.instantiate import resolve_ckpt_path
from invsr_pl.launch.job_process import is_slurm_launcher
from invsr_pl.utils.checkpoint import (
    STATE_PREFIX,
    check_trainable_keys,
    checkpoint_problem,
    load_checkpoint,
)
from invsr_pl.utils.errors import SetupError

__all__ = ["SetupError", "check_checkpoint_fits", "check_config", "check_local_multirun"]

_NOISE_PREDICTOR_DEFAULTS = {"scale": 4, "vae_scale_factor": 8}  # NoisePredictor's constructor defaults


def _get(cfg: Any, dotted: str) -> Any:
    """``cfg[a][b]...`` or None when any level is absent or null (interpolations resolved)."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _scales(cfg: Any) -> dict[str, int]:
    """Every SR factor the config states, by key."""
    keys = ["scale", "model.noise_predictor.scale", "data.degradation.scale", "data.val_dataset.scale"]
    found = {k: _get(cfg, k) for k in keys}
    if _get(cfg, "model.noise_predictor") is not None and found["model.noise_predictor.scale"] is None:
        found["model.noise_predictor.scale"] = _NOISE_PREDICTOR_DEFAULTS["scale"]
    tests = _get(cfg, "data.test_datasets")
    if isinstance(tests, Mapping):
        for name, entry in tests.items():
            found[f"data.test_datasets.{name}.scale"] = _get(entry, "scale")
    elif isinstance(tests, Sequence) and not isinstance(tests, str):  # list or ListConfig
        for i, entry in enumerate(tests):
            found[f"data.test_datasets.{i}.scale"] = _get(entry, "scale")
    return {k: int(v) for k, v in found.items() if v is not None}


def check_scales(cfg: Any) -> int | None:
    """The one SR factor of the config; raises :class:`SetupError` naming the keys when they disagree."""
    scales = _scales(cfg)
    if len(set(scales.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in scales.items())
        raise SetupError(
            f"the SR scales disagree: {listed}; the degradation, the datasets and the noise predictor must "
            "use one factor (set the top-level `scale`, e.g. scale=2)"
        )
    return next(iter(scales.values()), None)


def check_gt_size(cfg: Any, scale: int | None) -> None:
    """GT crops must map onto whole LQ pixels and whole latent pixels of the VAE (and so of the noise
    predictor's downsampling, which ends on the latent grid). Only for models with a noise predictor."""
    if _get(cfg, "model.noise_predictor") is None:
        return
    vae = int(
        _get(cfg, "model.noise_predictor.vae_scale_factor") or _NOISE_PREDICTOR_DEFAULTS["vae_scale_factor"]
    )
    multiple = math.lcm(vae, scale or 1)
    for key in ("data.train_dataset.gt_size", "data.val_dataset.gt_size"):
        size = _get(cfg, key)
        if size is None:
            continue
        if int(size) < multiple or int(size) % multiple:
            lower = max(multiple, int(size) // multiple * multiple)
            raise SetupError(
                f"{key}={size} must be a positive multiple of {multiple} (the x{scale or 1} scale and the "
                f"VAE factor {vae}), e.g. {lower} or {lower + multiple}"
            )


def check_strategy(cfg: Any) -> None:
    """Several processes and a discriminator need a DDP strategy that tolerates unused parameters: G and D
    share one DDP wrapper and each manual step back-propagates through one of them
    (docs/lightning.md#ddp-with-two-networks). Plain ``ddp`` would stop at the first step with DDP's error."""
    from invsr_pl.utils.batching import resolve_world_size

    trainer = _get(cfg, "trainer") or {}
    strategy = trainer.get("strategy") or "auto"
    if _get(cfg, "model.discriminator") is None or strategy == "auto":  # auto: train.py picks the right one
        return
    if isinstance(strategy, Mapping):
        target = str(strategy.get("_target_", ""))
        intolerant = target.endswith("DDPStrategy") and not strategy.get("find_unused_parameters", False)
        name = f"trainer.strategy._target_={target.rsplit('.', 1)[-1]} with find_unused_parameters=false"
    else:
        intolerant = str(strategy).startswith("ddp") and not str(strategy).endswith("unused_parameters_true")
        name = f"trainer.strategy={strategy}"
    world = resolve_world_size(
        trainer.get("devices", 1), trainer.get("num_nodes", 1), trainer.get("accelerator")
    )
    if intolerant and world > 1:
        raise SetupError(
            f"{name} cannot train the generator and the discriminator over {world} processes (each manual "
            "step leaves the other network's parameters without gradients, docs/lightning.md); use "
            "trainer.strategy=ddp_find_unused_parameters_true (the default of trainer=ddp)"
        )


def check_ckpt_path(cfg: Any) -> str | None:
    """Resolve ``ckpt_path`` (``last``: the newest intact checkpoint of the task) and refuse files that cannot
    be read or hold no trainable weights. Returns what ``Trainer.fit`` should get."""
    search_dir = Path(str(_get(cfg, "paths.log_dir") or ".")) / str(_get(cfg, "task_name") or "")
    try:
        ckpt_path = resolve_ckpt_path(_get(cfg, "ckpt_path"), search_dir)
    except FileNotFoundError as err:
        raise SetupError(str(err)) from err
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return ckpt_path  # a fresh start, or Lightning's "hpc"/"best"/"registry"
    problem = checkpoint_problem(ckpt_path)
    if problem is not None:
        raise SetupError(f"ckpt_path: {problem}")
    saved = load_checkpoint(ckpt_path, mmap=True)["state_dict"]
    wanted = [STATE_PREFIX] if _get(cfg, "model.noise_predictor") is not None else []
    wanted += ["discriminator."] if _get(cfg, "model.discriminator") is not None else []
    for prefix in wanted:
        if not any(k.startswith(prefix) for k in saved):
            raise SetupError(
                f"ckpt_path {ckpt_path} holds no {prefix}* weights; resuming would train them from random "
                "initial values (is it an InvSR training checkpoint of this model?)"
            )
    return ckpt_path


def check_config(cfg: Any) -> str | None:
    """All start-up checks of a composed ``train.yaml`` config; nothing is instantiated.

    Checks: the SR scales agree (top-level ``scale``, degradation, datasets, noise predictor); GT crop sizes
    fit the scale and the VAE; several processes with a discriminator use a DDP strategy that tolerates unused
    parameters; ``ckpt_path`` resolves to a readable checkpoint with the trainable weights; the
    batch settings divide (``invsr_pl.utils.batching.check_batch_config``); the data folders of an
    ``SRDataModule`` exist (``datamodules.sr_datamodule.check_data_folders``).

    Returns:
        The resolved ``ckpt_path`` for ``Trainer.fit`` (None: fresh start).

    Raises:
        SetupError: one line naming the keys or the file.
    """
    from datamodules.sr_datamodule import SRDataModule, check_data_folders
    from invsr_pl.utils.batching import check_batch_config

    scale = check_scales(cfg)
    check_gt_size(cfg, scale)
    check_strategy(cfg)
    try:
        check_batch_config(cfg, log_plan=False)  # the data module states the split once it knows the world
        if _get(cfg, "data._target_") == f"{SRDataModule.__module__}.{SRDataModule.__name__}":
            check_data_folders(cfg)  # the paper recipe without its data stops here, not after SD-Turbo loads
    except (ValueError, FileNotFoundError) as err:
        raise SetupError(str(err)) from err
    return check_ckpt_path(cfg)


def check_local_multirun(trainer: Mapping[str, Any], launcher: Mapping[str, Any] | None) -> None:
    """A multirun with any launcher but SLURM's runs every job on this machine: refuse ``num_nodes > 1``.

    Args:
        trainer: the job's ``trainer`` config.
        launcher: ``hydra.launcher`` of the multirun.
    """
    nodes = int(trainer.get("num_nodes") or 1)
    if nodes > 1 and not is_slurm_launcher(launcher):
        raise SetupError(
            f"trainer.num_nodes={nodes} in a local multirun: its jobs would wait for nodes that are never "
            "started; sweep over several nodes with the SLURM launcher (add hydra/launcher=slurm: "
            "conf/hydra/launcher/slurm.yaml), or set trainer.num_nodes=1"
        )


def check_checkpoint_fits(ckpt_path: str | None, model: nn.Module) -> None:
    """Refuse a checkpoint that lacks or mis-shapes any trainable weight of the built ``model`` (Lightning
    loads non-strictly here, because the frozen parts are never saved)."""
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return
    check_trainable_keys(load_checkpoint(ckpt_path, mmap=True), model, ckpt_path)
