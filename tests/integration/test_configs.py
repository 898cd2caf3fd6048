"""Every experiment / trainer / debug / search config composes; the CPU-sized ones instantiate."""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as L
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from omegaconf import DictConfig, OmegaConf

from invsr_pl.launch.instantiate import instantiate_callbacks, instantiate_loggers, instantiate_trainer

Compose = Callable[..., DictConfig]
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


# experiments of other systems (the latent LPIPS trainer) have their own tests; these test InvSR training
EXPERIMENTS = [e for e in _options("experiment") if not e.startswith("latent_lpips")]
# the paper-sized experiments build a real prior (a download) and read data from disk: compose-only here
PAPER_EXPERIMENTS = {
    "invsr_x4",
    "invsr_x2",
    "invsr_x8",
    "finetune_x4",
    "invsr_sdxl_turbo_x4",
    "invsr_sd35_turbo_x4",
}
TINY_EXPERIMENTS = [e for e in EXPERIMENTS if e not in PAPER_EXPERIMENTS]


def test_expected_options_exist() -> None:
    assert {"invsr_x4", "invsr_x2", "invsr_x8", "finetune_x4", "quickstart", "smoke"} <= set(EXPERIMENTS)
    assert {"default", "cpu", "gpu", "ddp", "ddp_sim"} <= set(_options("trainer"))
    assert {"default", "fdr", "overfit", "limit", "profiler"} <= set(_options("debug"))
    assert {"sd_turbo", "sd_turbo_random", "tiny"} <= set(_options("model/backbone"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment: str, compose_cfg: Compose) -> None:
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.model._target_ == "invsr_pl.systems.invsr.InvSRLitModule"
    assert cfg.trainer.max_steps == -1, "stop on model.max_iterations: global_step counts G and D steps"
    for key in ("gradient_clip_val", "accumulate_grad_batches"):
        assert key not in cfg.trainer, f"trainer.{key} is rejected under manual optimisation"
    assert cfg.model.max_iterations > 0


def test_invsr_x4_is_the_paper_recipe(compose_cfg: Compose) -> None:
    """Compose only: the real SD-Turbo backbone is never built in default tests (docs/training.md)."""
    cfg = compose_cfg(["experiment=invsr_x4"])
    m, t = cfg.model, cfg.trainer
    assert cfg.data.global_batch_size == 64 and cfg.scale == 4  # docs/training.md, whatever the device count
    assert t.devices == "auto" and t.accelerator == "gpu"
    assert m.backbone._target_.endswith("FrozenSDTurbo.from_pretrained")
    assert m.backbone.model == "stabilityai/sd-turbo"
    assert m.noise_predictor.block_out_channels == [256, 512] and m.noise_predictor.layers_per_block == 3
    assert (
        m.discriminator._target_.endswith("LatentDiscriminator")
        and m.discriminator.cross_attention_dim == 1024
    )
    assert m.lpips.weights_path.endswith("/weights/vgg16_sdturbo_lpips.pth") and not m.lpips.random_init
    assert m.optimizer_g._target_ == "torch.optim.AdamW" and m.optimizer_g.lr == 5e-5
    assert m.optimizer_g.weight_decay == 0.0
    assert m.optimizer_d._target_ == "torch.optim.Adam" and m.optimizer_d.weight_decay == 1e-3
    assert (m.l2_weight, m.lpips_weight, m.gan_weight) == (1.0, 2.0, 0.1)
    assert list(m.train_timesteps) == [250, 200, 150, 100]
    assert (m.dis_warmup_steps, m.lr_warmup_steps, m.max_iterations) == (10000, 2000, 100000)
    assert m.micro_batch_size == 16
    assert t.strategy == "ddp_find_unused_parameters_true"
    assert t.precision == "bf16-mixed"
    assert t.val_check_interval == 5000
    assert cfg.callbacks.ema.decay == 0.999
    assert cfg.callbacks.model_checkpoint.save_last is True
    assert cfg.callbacks.model_checkpoint.every_n_iterations == t.val_check_interval == 5000
    assert cfg.data._target_ == "datamodules.sr_datamodule.SRDataModule"
    roots = [src.root for src in cfg.data.train_dataset.sources]  # resolved: LSDIR + FFHQ below data_dir
    assert len(roots) == 2 and all(r.startswith(cfg.paths.data_dir) for r in roots)


@pytest.mark.parametrize("experiment", TINY_EXPERIMENTS)
def test_tiny_experiment_instantiates(experiment: str, tmp_path: Path, compose_cfg: Compose) -> None:
    cfg = compose_cfg([f"experiment={experiment}"], tmp_path)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    assert isinstance(datamodule, L.LightningDataModule) and isinstance(model, L.LightningModule)
    callbacks = instantiate_callbacks(cfg.callbacks)
    loggers = instantiate_loggers(cfg.logger)
    trainer = instantiate_trainer(cfg.trainer, callbacks=callbacks, loggers=loggers)
    assert any(type(c).__name__ == "NoisePredictorEMA" for c in trainer.callbacks)
    assert trainer.checkpoint_callback is not None and trainer.checkpoint_callback.save_last


@pytest.mark.parametrize("trainer", _options("trainer"), ids=lambda t: f"trainer_{t}")  # no bare "gpu" id
def test_trainer_options(trainer: str, tmp_path: Path, compose_cfg: Compose) -> None:
    cfg = compose_cfg(["experiment=smoke", f"trainer={trainer}"], tmp_path)
    if cfg.trainer.accelerator == "gpu":
        return  # compose only without CUDA
    built = instantiate_trainer(cfg.trainer, callbacks=[], loggers=[])
    if trainer == "ddp_sim":
        assert built.world_size == 2 and type(built.strategy).__name__ == "DDPStrategy"


def test_several_devices_select_ddp_with_unused_parameters(tmp_path: Path, compose_cfg: Compose) -> None:
    cfg = compose_cfg(["experiment=smoke", "trainer.devices=2"], tmp_path)
    trainer = instantiate_trainer(cfg.trainer, callbacks=[], loggers=[])
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters") is True


@pytest.mark.parametrize("debug", _options("debug"))
def test_debug_options(debug: str, tmp_path: Path, compose_cfg: Compose) -> None:
    cfg = compose_cfg(["experiment=smoke", f"debug={debug}"], tmp_path)
    instantiate_trainer(cfg.trainer, callbacks=[], loggers=[])


@pytest.mark.parametrize("logger", _options("logger"))
def test_logger_options(logger: str, tmp_path: Path, compose_cfg: Compose) -> None:
    cfg = compose_cfg(["experiment=smoke", f"logger={logger}"], tmp_path)
    assert instantiate_loggers(cfg.logger)


@pytest.mark.parametrize("search", _options("hparams_search"))
def test_hparams_search_parses(search: str, compose_cfg: Compose) -> None:
    cfg = compose_cfg(["experiment=smoke", f"hparams_search={search}"])
    params = cfg.hydra.sweeper.params if "hydra" in cfg else None
    if params is None:  # compose() drops the hydra node: read the file itself
        params = OmegaConf.load(CONFIG_DIR / "hparams_search" / f"{search}.yaml").hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    jobs = 1
    for override in overrides:
        assert override.is_sweep_override()
        assert override.key_or_group in cfg or override.key_or_group.split(".")[0] in cfg
        if override.value_type == ValueType.INTERVAL_SWEEP:  # Optuna samples it: a trial count, not a list
            jobs *= 2
            continue
        jobs *= len(list(override.sweep_iterator()))
    assert jobs >= 2


@pytest.mark.parametrize(
    "group,option",
    [
        ("model/discriminator", "none"),
        ("model/lpips", "none"),
        ("model/backbone", "sd_turbo_random"),
        ("callbacks", "none"),
    ],
)
def test_group_options_compose(group: str, option: str, compose_cfg: Compose) -> None:
    cfg = compose_cfg(["experiment=smoke", f"{group}={option}"])
    if option == "none" and group.startswith("model/"):
        name = group.split("/")[1]
        assert cfg.model[name] is None
        assert cfg.model["gan_weight" if name == "discriminator" else "lpips_weight"] == 0


def _has_submitit() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _has_submitit(), reason="hydra-submitit-launcher not installed (extra: slurm)")
def test_slurm_launcher_composes(compose_cfg: Compose) -> None:
    cfg = compose_cfg(["experiment=invsr_x4", "hydra/launcher=slurm"])
    assert cfg is not None


def _check_keys_against_signature(node: Any, where: str) -> None:
    """Every ``_target_`` mapping below ``node`` only uses keyword arguments its target accepts."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            target = hydra.utils.get_object(node["_target_"])
            params = inspect.signature(target).parameters
            takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            unknown = {k for k in node if not k.startswith("_")} - set(params)
            assert takes_kwargs or not unknown, f"{where}: {node['_target_']} does not take {sorted(unknown)}"
        for key, value in node.items():
            _check_keys_against_signature(value, f"{where}.{key}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _check_keys_against_signature(value, f"{where}[{i}]")


SWAPS = [
    [],
    ["model/backbone=sd_turbo_random"],
    ["model/backbone=tiny", "model/noise_predictor=tiny", "model/discriminator=tiny", "model/lpips=random"],
    ["model/discriminator=none", "model/lpips=none"],
    ["trainer=ddp_sim", "logger=many"],
]


@pytest.mark.parametrize("swap", SWAPS, ids=lambda s: "+".join(o.split("/")[-1] for o in s) or "as_is")
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_config_keys_match_constructors(experiment: str, swap: list[str], compose_cfg: Compose) -> None:
    """Option files and experiment overlays stay consistent with the constructors, for any option swap."""
    cfg = compose_cfg([f"experiment={experiment}", *swap])
    container = OmegaConf.to_container(cfg, resolve=False)
    for group in ("model", "callbacks", "logger", "trainer"):
        _check_keys_against_signature(container[group], group)


def test_default_training_config_is_the_paper_recipe(compose_cfg: Compose) -> None:
    """`python train.py` runs what experiment=invsr_x4 names (docs/training.md)."""
    default, paper = compose_cfg([]), compose_cfg(["experiment=invsr_x4"])
    for group in ("data", "model", "trainer", "callbacks", "logger", "paths"):
        assert OmegaConf.to_container(default[group]) == OmegaConf.to_container(paper[group]), group
    assert default.task_name == paper.task_name == "invsr_x4"


def test_default_without_data_names_the_missing_folders(compose_cfg: Compose, tmp_path: Path) -> None:
    from datamodules.sr_datamodule import check_data_folders

    cfg = compose_cfg([f"paths.data_dir={tmp_path / 'nothing'}"])
    with pytest.raises(FileNotFoundError) as err:
        check_data_folders(cfg)
    message = str(err.value)
    for key in ("data.train_dataset.sources.0.root", "data.train_dataset.sources.1.root",
                "data.val_dataset.lq_dir", "data.val_dataset.gt_dir", "paths.data_dir=", "LSDIR/train/images",
                "experiment=quickstart"):  # fmt: skip
        assert key in message, key
    with pytest.raises(Exception, match="training data not found"):  # the data module checks it too
        hydra.utils.instantiate(cfg.data, _convert_="all")
    with pytest.raises(FileNotFoundError, match=r"sources.0.root=\(not set\)"):
        check_data_folders(compose_cfg(["experiment=finetune_x4"]))
    check_data_folders(compose_cfg(["experiment=quickstart"]))  # built-in photos: nothing on disk needed


@pytest.mark.parametrize("scale", [2, 8])
def test_scale_key_drives_data_model_and_validation(scale: int, compose_cfg: Compose) -> None:
    cfg = compose_cfg(["experiment=quickstart", f"scale={scale}"])
    assert cfg.data.degradation.scale == cfg.data.val_dataset.scale == scale
    assert cfg.model.noise_predictor.scale == scale
    assert hydra.utils.instantiate(cfg.model.noise_predictor).scale == scale
    paper = compose_cfg([f"experiment=invsr_x{scale}"])
    assert paper.scale == scale and paper.task_name == f"invsr_x{scale}"
    assert paper.data.degradation.scale == paper.data.val_dataset.scale == scale
    assert paper.data.val_dataset.lq_dir.endswith(f"imagenet512_x{scale}/lq")
    predictor = hydra.utils.instantiate(paper.model.noise_predictor)
    assert predictor.scale == scale
    lq = torch.rand(1, 3, 64 // scale, 64 // scale)
    assert predictor(lq, torch.tensor([249])).mean.shape[-2:] == (8, 8)  # the SR latent grid: 64 px / 8


def test_finetune_starts_from_the_released_weights(compose_cfg: Compose) -> None:
    cfg = compose_cfg(["experiment=finetune_x4"])
    m = cfg.model
    assert m.noise_predictor_init == f"{cfg.paths.weights_dir}/noise_predictor_sd_turbo_v5.pth"
    assert m.discriminator_init == f"{cfg.paths.weights_dir}/discriminator_sd_turbo_v5.pth"
    assert m.dis_warmup_steps == 0 and m.optimizer_g.lr < 5e-5 and m.max_iterations < 100000
    assert cfg.ckpt_path is None  # initialising is not resuming
    own_pairs = compose_cfg(["experiment=finetune_x4", "data=paired"])  # the command line wins
    assert OmegaConf.is_missing(own_pairs.data.val_dataset, "lq_dir")
