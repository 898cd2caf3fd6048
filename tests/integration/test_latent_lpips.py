"""Training and scoring a latent LPIPS: the 2AFC score, the module's steps (head clamping, lin/tune, frozen
VAE kept out of checkpoints), export round trips, scoring through evaluate.py, the quick start's learning."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from diffusers import AutoencoderKL
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from datamodules.two_afc import TwoAFCDataModule
from datamodules.two_afc_synthetic import SyntheticTwoAFC
from invsr_pl.cli.export_latent_lpips import main
from invsr_pl.losses.perceptual import LatentLPIPS
from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_vae_config
from invsr_pl.systems.latent_lpips import (
    LatentLPIPSLitModule,
    TwoAFCScore,
    export_checkpoint,
    lr_factor,
    two_afc_score,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "conf"
TinyLPIPS = functools.partial(LatentLPIPS, random_init=True, base_channels=8)


@pytest.fixture(scope="module")
def backbone():
    return build_tiny_sd_turbo()


def _data(n_train: int = 8, n_val: int = 8) -> TwoAFCDataModule:
    return TwoAFCDataModule(
        SyntheticTwoAFC(["camera"], n_train, seed=0),
        SyntheticTwoAFC(["coffee"], n_val, seed=1),
        global_batch_size=4,
        val_batch_size=8,
        num_workers=0,
        pin_memory=False,
    )


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(tmp_path),
    }
    return L.Trainer(**{**options, **kwargs})


def test_two_afc_score_follows_the_paper() -> None:
    d0 = torch.tensor([1.0, 1.0, 2.0, 1.0])
    d1 = torch.tensor([2.0, 0.5, 1.0, 1.0])
    judge = torch.tensor([0.2, 0.8, 0.6, 0.9])
    # prefers p0 -> 1 - judge; prefers p1 -> judge; tie -> 0.5
    torch.testing.assert_close(two_afc_score(d0, d1, judge), torch.tensor([0.8, 0.8, 0.6, 0.5]))


def test_score_metric_per_category_and_mean_of_categories() -> None:
    metric = TwoAFCScore(["a", "b", "c"])
    metric.update(torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 1]))
    metric.update(torch.tensor([1.0]), torch.tensor([1]))
    out = metric.compute()
    assert set(out) == {"a", "b", "overall"}  # no triplet of "c"
    torch.testing.assert_close(out["a"], torch.tensor(0.5))
    torch.testing.assert_close(out["b"], torch.tensor(0.75))
    torch.testing.assert_close(out["overall"], torch.tensor(0.625))
    with pytest.raises(ValueError, match="out of range"):
        metric.update(torch.tensor([1.0]), torch.tensor([3]))


def test_lr_schedule_is_5_constant_then_linear_decay() -> None:
    factors = [lr_factor(e, 5, 5) for e in range(10)]
    assert factors == pytest.approx([1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
    assert lr_factor(3, 2, 0) == 1.0


def test_module_builds_lpips_for_the_vae_channels(backbone) -> None:
    module = LatentLPIPSLitModule(backbone, TinyLPIPS)
    assert module.lpips.in_channels == 4 and module.vae_factor == 8
    with pytest.raises(ValueError, match="takes 16 channels but the VAE gives 4"):
        LatentLPIPSLitModule(backbone, TinyLPIPS(in_channels=16))
    with pytest.raises(ValueError, match="mode"):
        LatentLPIPSLitModule(backbone, TinyLPIPS, mode="full")


def test_bare_autoencoder_encodes_like_the_backbone(backbone) -> None:
    vae = AutoencoderKL(**tiny_vae_config())
    vae.load_state_dict(backbone.vae.state_dict())
    images = SyntheticTwoAFC(["camera"], 1)[0]["ref"][None]
    from_backbone = LatentLPIPSLitModule(backbone, TinyLPIPS, mode=None).encode(images, sample=False)
    from_vae = LatentLPIPSLitModule(vae, TinyLPIPS, mode=None).encode(images, sample=False)
    torch.testing.assert_close(from_vae, from_backbone)
    vae.register_to_config(shift_factor=0.5)  # SD3 / FLUX style latents: (z - shift) * scale
    shifted = LatentLPIPSLitModule(vae, TinyLPIPS, mode=None).encode(images, sample=False)
    torch.testing.assert_close(shifted, from_backbone - 0.5 * 0.18215)


@pytest.mark.parametrize("mode", ["tune", "lin"])
def test_fit_trains_the_right_parts_clamps_heads_and_exports(backbone, tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    export = tmp_path / "exported" / "latent_lpips.pth"
    module = LatentLPIPSLitModule(backbone, TinyLPIPS, mode=mode, export_path=str(export))
    with torch.no_grad():
        module.lpips.lins[0].model[1].weight.fill_(-0.5)  # negative: the step must clamp it back
    trunk = {k: v.clone() for k, v in module.lpips.net.state_dict().items()}
    ranker = {k: v.clone() for k, v in module.ranker.state_dict().items()}
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2)
    trainer.fit(module, _data())

    assert all((h.model[1].weight >= 0).all() for h in module.lpips.lins)
    trunk_changed = any(not torch.equal(v, module.lpips.net.state_dict()[k]) for k, v in trunk.items())
    assert trunk_changed == (mode == "tune")
    assert any(not torch.equal(v, module.ranker.state_dict()[k]) for k, v in ranker.items())
    metrics = trainer.callback_metrics
    assert {"val/2afc", "val/2afc/tone", "val/2afc/colour", "val/2afc/mix"} <= set(metrics)
    assert 0.0 <= float(metrics["val/2afc"]) <= 1.0

    # the export loads into a plain LatentLPIPS and gives the trained distances
    loaded = LatentLPIPS(weights_path=str(export), base_channels=8)
    z = torch.randn(2, 4, 8, 8)
    module.lpips.eval()
    torch.testing.assert_close(loaded(z, z.flip(0)), module.lpips(z, z.flip(0)))

    # checkpoints hold the metric and the ranking network, never the frozen VAE
    ckpt_path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt_path)
    keys = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"].keys()
    assert not any(k.startswith("backbone.") for k in keys)
    assert {"lpips.lins.0.model.1.weight", "ranker.model.0.weight"} <= set(keys)
    again = tmp_path / "again.pth"
    assert main([str(ckpt_path), str(again)]) == 0
    assert main([str(ckpt_path), str(again)]) == 2  # never overwrites
    exported = torch.load(export, weights_only=True)
    for k, v in torch.load(again, weights_only=True).items():
        assert torch.equal(v, exported[k]), k


def test_export_rejects_a_checkpoint_without_a_metric(tmp_path: Path) -> None:
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"noise_predictor.w": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="holds no latent LPIPS"):
        export_checkpoint(path, tmp_path / "out.pth")
    with pytest.raises(FileNotFoundError):
        export_checkpoint(tmp_path / "absent.ckpt", tmp_path / "out.pth")


def test_scoring_mode_trains_nothing(backbone, tmp_path: Path) -> None:
    module = LatentLPIPSLitModule(backbone, TinyLPIPS, mode=None, output_dir=str(tmp_path / "scores"))
    assert not any(p.requires_grad for p in module.parameters())
    trainer = _trainer(tmp_path)
    (result,) = trainer.test(module, _data(), verbose=False)
    assert {"test/2afc", "test/2afc/mix"} <= set(result)
    table = (tmp_path / "scores" / "two_afc_scores.csv").read_text().splitlines()
    assert table[0] == "category,two_afc,triplets" and len(table) == 5  # header, 3 categories, overall
    assert table[-1] == f"overall (mean of categories),{result['test/2afc']:.4f},8"


def _compose(name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_evaluate_scores_exported_weights(backbone, tmp_path: Path) -> None:
    from evaluate import evaluate

    torch.manual_seed(1)
    weights = TinyLPIPS().save_weights(tmp_path / "tiny_lpips.pth")
    cfg = _compose(
        "evaluate_latent_lpips",
        [
            "data=two_afc_synthetic",
            "data.val_dataset.num_triplets=8",
            "model/backbone=tiny",
            f"weights_path={weights}",
            "model.lpips.base_channels=8",
            f"paths.root_dir={REPO_ROOT}",
            f"paths.output_dir={tmp_path / 'run'}",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
        ],
    )
    metrics, objects = evaluate(cfg)
    assert objects["model"].lpips.weights_source == str(weights)
    assert objects["datamodule"].train_set is None  # evaluation reads no training split
    md = (tmp_path / "run" / "two_afc_scores.md").read_text()
    assert str(weights) in md and "| mix |" in md
    # the same weights scored directly give the same number
    lpips = functools.partial(LatentLPIPS, weights_path=str(weights), base_channels=8)
    module = LatentLPIPSLitModule(backbone, lpips, mode=None)
    val = cfg.data.val_dataset
    dataset = SyntheticTwoAFC(list(val.names), 8, seed=val.seed)
    data = TwoAFCDataModule(val_dataset=dataset, num_workers=0, pin_memory=False)
    (direct,) = _trainer(tmp_path).test(module, data, verbose=False)
    assert metrics["test/2afc"] == pytest.approx(direct["test/2afc"])


def test_released_file_is_required_for_scoring(tmp_path: Path) -> None:
    from evaluate import SetupError, evaluate

    cfg = _compose(
        "evaluate_latent_lpips",
        [
            "data=two_afc_synthetic",
            "model/backbone=tiny",
            f"weights_path={tmp_path / 'absent.pth'}",
            f"paths.root_dir={REPO_ROOT}",
            f"paths.output_dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(SetupError, match="latent LPIPS weights not found"):
        evaluate(cfg)


@pytest.mark.slow
def test_quickstart_learns_well_above_chance(train_cfg, tmp_path: Path) -> None:
    """``train.py experiment=latent_lpips_quickstart``: training raises the 2AFC score on held-out triplets.

    "Before" is the untrained metric that training starts from (same config, same seed, so the same initial
    weights), scored on the same held-out triplets as "after".
    """
    import hydra

    from train import train

    cfg = train_cfg(
        "experiment=latent_lpips_quickstart",
        "callbacks.progress_bar=null",
        "trainer.enable_progress_bar=false",
        # shortened: half the validation triplets, scored once, after the last epoch
        "data.val_dataset.num_triplets=96",
        "trainer.check_val_every_n_epoch=${trainer.max_epochs}",
    )
    L.seed_everything(cfg.seed, workers=True)  # as train() does before building the data and the model
    data = hydra.utils.instantiate(cfg.data, _convert_="all")
    untrained = hydra.utils.instantiate(cfg.model, _convert_="all")
    (before,) = _trainer(tmp_path).validate(untrained, data, verbose=False)

    metrics, objects = train(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "latent_lpips.pth").is_file()
    # the metric itself now orders the held-out triplets more like the simulated panel: a clear rise, well
    # above chance (0.5); the learned judge (metric + ranking network) beats chance (BCE ln 2 = 0.693)
    assert metrics["val/2afc"] > before["val/2afc"] + 0.04, (before, metrics)
    assert metrics["val/2afc"] > 0.7, metrics
    assert metrics["val/loss"] < 0.68, metrics
    LatentLPIPS(weights_path=str(run / "latent_lpips.pth"), base_channels=8)


def _keys_match_constructors(node, where: str = "cfg") -> None:
    """Every ``_target_`` mapping below ``node`` only uses keyword arguments its target accepts."""
    import inspect

    import hydra

    if isinstance(node, dict):
        if "_target_" in node:
            params = inspect.signature(hydra.utils.get_object(node["_target_"])).parameters
            takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            unknown = {k for k in node if not k.startswith("_")} - set(params)
            assert takes_kwargs or not unknown, f"{where}: {node['_target_']} does not take {sorted(unknown)}"
        for key, value in node.items():
            _keys_match_constructors(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _keys_match_constructors(value, f"{where}[{i}]")


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("train", ["experiment=latent_lpips"]),
        ("train", ["experiment=latent_lpips_quickstart"]),
        ("train", ["experiment=latent_lpips", "model/backbone=sd_turbo_random", "model.mode=lin"]),
        ("evaluate_latent_lpips", []),
        ("evaluate_latent_lpips", ["data=two_afc_synthetic", "model/backbone=tiny"]),
    ],
)
def test_configs_map_to_constructors(name: str, overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    cfg = _compose(name, [f"paths.root_dir={REPO_ROOT}", "paths.output_dir=/nonexistent", *overrides])
    _keys_match_constructors(OmegaConf.to_container(cfg, resolve=False))


def test_full_recipe_is_the_papers() -> None:
    cfg = _compose("train", [f"paths.root_dir={REPO_ROOT}", "paths.output_dir=/x", "experiment=latent_lpips"])
    model, data = cfg.model, cfg.data
    assert model._target_ == "invsr_pl.systems.latent_lpips.LatentLPIPSLitModule" and model.mode == "tune"
    assert model.optimizer.lr == 1e-4 and list(model.optimizer.betas) == [0.5, 0.999]
    assert (model.constant_epochs, model.decay_epochs, cfg.trainer.max_epochs) == (5, 5, 10)
    assert model.lpips.imagenet_trunk and model.lpips.base_channels == 64 and model.ranker_hidden == 32
    assert model.backbone._target_.endswith("FrozenSDTurbo.from_pretrained")
    assert data.global_batch_size == 50
    assert list(data.train_dataset.categories) == ["traditional", "cnn", "mix"]
    assert list(data.val_dataset.categories) == [
        "traditional",
        "cnn",
        "superres",
        "deblur",
        "color",
        "frameinterp",
    ]
    assert cfg.optimized_metric == "val/2afc" and cfg.callbacks.ema is None
