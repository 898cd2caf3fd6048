"""Training on the SDXL-Turbo and SD3.5 Large Turbo tiny twins (issue 23): every loss, resume, provenance.

``experiment=smoke`` turns every loss on (latent L2, a random latent LPIPS, the tiny discriminator with its
D-only warm-up and then the adversarial G term); only the backbone changes here, and the noise predictor, the
discriminator and the latent LPIPS follow its geometry through the config (docs/backbones.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig
from tree_compare import assert_same_tree, load_checkpoint

from invsr_pl.utils.provenance import PROVENANCE_KEY
from train import train

MakeCfg = Callable[..., DictConfig]
TWINS = {"tiny_sdxl_turbo": (4, 32), "tiny_sd35_turbo": (16, 32)}  # latent channels, prompt width
COMMON = [
    "experiment=smoke",
    "logger=csv",
    "trainer.val_check_interval=100",  # no validation: the resume test compares training state only
    "callbacks.model_checkpoint.every_n_iterations=1",
    "callbacks.image_logger=null",
]


@pytest.mark.slow
@pytest.mark.parametrize("twin", sorted(TWINS))
def test_all_losses_train_and_resume_exactly(twin: str, train_cfg: MakeCfg, tmp_path: Path) -> None:
    """4 iterations (2 D-only warm-up, then adversarial) == 2 + resume from last.ckpt + 2 more."""
    channels, width = TWINS[twin]
    common = [*COMMON, f"model/backbone={twin}"]
    cfg = train_cfg(*common, "model.max_iterations=4", subdir="full")
    assert cfg.model.noise_predictor.latent_channels == channels
    assert cfg.model.discriminator.in_channels == channels and cfg.model.lpips.in_channels == channels
    assert cfg.model.discriminator.cross_attention_dim == width
    metrics, objects = train(cfg)
    module = objects["model"]
    assert module.noise_predictor.latent_channels == channels == module.backbone.latent_channels
    for key in ("train/l2", "train/lpips", "train/gan_g", "train/d_loss"):
        assert math.isfinite(float(metrics[key])), key
    assert float(metrics["train/gan_g"]) != 0.0  # iterations 3 and 4 are past the D warm-up (smoke: 2)
    assert float(metrics["train/lpips"]) > 0.0
    full = load_checkpoint(tmp_path / "full" / "run" / "checkpoints" / "last.ckpt")
    recorded = full[PROVENANCE_KEY]["backbone"]
    assert recorded["name"] == recorded["choice"] == twin

    logs = tmp_path / "split" / "logs"
    first = [*common, f"paths.log_dir={logs}", f"paths.output_dir={logs}/smoke/runs/first"]
    train(train_cfg(*first, "model.max_iterations=2", subdir="split"))
    second = [*common, f"paths.log_dir={logs}", f"paths.output_dir={logs}/smoke/runs/second"]
    second.append("ckpt_path=last")
    train(train_cfg(*second, "model.max_iterations=4", subdir="split"))
    resumed = load_checkpoint(logs / "smoke/runs/second/checkpoints/last.ckpt")
    assert resumed["invsr_iteration"] == full["invsr_iteration"] == 4
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):
        assert_same_tree(full[key], resumed[key], key)


@pytest.mark.slow
@pytest.mark.parametrize("twin", sorted(TWINS))
def test_quickstart_trains_on_the_twin(twin: str, train_cfg: MakeCfg, tmp_path: Path) -> None:
    """The issue's command: ``python train.py experiment=quickstart model/backbone=<twin>`` (shortened)."""
    cfg = train_cfg(
        "experiment=quickstart",
        f"model/backbone={twin}",
        "model.max_iterations=6",
        "trainer.val_check_interval=6",
        "callbacks.model_checkpoint.every_n_iterations=6",
    )
    metrics, _ = train(cfg)
    assert math.isfinite(float(metrics["val/psnr_1step"])) and math.isfinite(float(metrics["val/psnr_3step"]))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_experiment_configs_follow_their_backbone(compose_cfg) -> None:
    """The full-size recipes build every trainable part for their prior's geometry."""
    for experiment, (target, channels, width, micro) in {
        "invsr_sdxl_turbo_x4": ("FrozenSDXLTurbo.from_pretrained", 4, 2048, 8),
        "invsr_sd35_turbo_x4": ("FrozenSD35Turbo.from_pretrained", 16, 4096, 4),
    }.items():
        cfg = compose_cfg([f"experiment={experiment}"])
        model = cfg.model
        assert model.backbone._target_.endswith(target)
        assert model.noise_predictor.latent_channels == channels == model.lpips.in_channels
        assert model.discriminator.in_channels == channels
        assert model.discriminator.cross_attention_dim == width
        assert model.micro_batch_size == micro and model.lpips_weight == 2.0 and model.gan_weight == 0.1
        assert list(model.train_timesteps) == [250, 200, 150, 100]


@pytest.mark.slow
def test_latent_lpips_recipe_trains_on_the_sd35_vae(train_cfg: MakeCfg) -> None:
    """The recipe users run first for a new prior (docs/backbones.md): its LPIPS gets 16 input channels."""
    cfg = train_cfg(
        "experiment=latent_lpips_quickstart", "model/backbone=tiny_sd35_turbo", "trainer.max_epochs=1"
    )
    metrics, objects = train(cfg)
    assert objects["model"].lpips.in_channels == 16
    assert 0.0 <= float(metrics["val/2afc"]) <= 1.0
