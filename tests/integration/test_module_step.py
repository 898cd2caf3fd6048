"""InvSRLitModule driven by a real lightning.Trainer on CPU with tiny models: what changes, what must not."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from invsr_pl.losses.perceptual import LatentLPIPS
from invsr_pl.models.tiny import build_tiny_sd_turbo, tiny_discriminator, tiny_noise_predictor
from invsr_pl.systems.invsr import InvSRLitModule, warmup_factor
from invsr_pl.utils.logging import parameter_summary

LQ, GT = 16, 64  # LQ 16 px -> GT 64 px (x4) -> latent 8 px


def make_module(seed: int = 0, **overrides) -> InvSRLitModule:
    """Tiny backbone + NP + discriminator + random-init latent LPIPS; fast defaults for CPU tests."""
    torch.manual_seed(seed)
    kwargs = dict(
        backbone=build_tiny_sd_turbo(seed=0),
        noise_predictor=tiny_noise_predictor(),
        discriminator=tiny_discriminator(),
        lpips=LatentLPIPS(random_init=True),
        optimizer_g=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0),
        optimizer_d=partial(torch.optim.Adam, lr=1e-3, weight_decay=1e-3),
        lr_warmup_steps=0,
        gradient_checkpointing=False,
        val_num_steps=[1],
        chopping_size=0,
        val_lpips=False,
        seed=7,
    )
    kwargs.update(overrides)
    return InvSRLitModule(**kwargs)


def make_batches(n: int, batch: int = 2, seed: int = 0, nan_at: tuple[int, ...] = ()) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lq, gt = torch.rand(batch, 3, LQ, LQ, generator=g), torch.rand(batch, 3, GT, GT, generator=g)
        if i in nan_at:
            lq[0, 0, 0, 0] = float("nan")
        out.append({"lq": lq, "gt": gt})
    return out


def fit(module: InvSRLitModule, batches: list[dict], callbacks=(), **trainer_kwargs) -> L.Trainer:
    kwargs = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=list(callbacks),
    )  # fmt: skip
    kwargs.update(trainer_kwargs)
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = L.Trainer(**kwargs)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(v.cpu(), before[k].cpu())]


class Recorder(L.Callback):
    """Per iteration: logged metrics, G learning rate at its step, and (optionally) snapshots."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.lr_g: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if optimizer is trainer.optimizers[0]:
            self.lr_g.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_one_step_trains_np_and_d_and_leaves_frozen_parts_bit_identical() -> None:
    module = make_module()
    frozen = {"backbone": snapshot(module.backbone), "lpips": snapshot(module.lpips)}
    np_before, d_before = snapshot(module.noise_predictor), snapshot(module.discriminator)
    trainer = fit(module, make_batches(1))
    assert module.iteration == 1 and trainer.global_step == 2  # one G step + one D step
    assert len(changed(np_before, module.noise_predictor)) == len(np_before)
    assert changed(d_before, module.discriminator)
    assert changed(frozen["backbone"], module.backbone) == []
    assert changed(frozen["lpips"], module.lpips) == []
    assert not any(p.requires_grad for p in module.backbone.parameters())
    assert not module.backbone.training and not module.lpips.training
    logged = trainer.callback_metrics
    for key in ("train/loss", "train/l2", "train/lpips", "train/d_loss", "train/d_real", "train/d_fake",
                "train/lr_g", "train/lr_d", "train/skipped_steps"):  # fmt: skip
        assert key in logged, key
    assert any(k.startswith("train/l2_t") for k in logged)
    assert float(logged["train/gan_g"]) == 0.0  # D warm-up (10k iterations by default)


def test_discriminator_gets_no_gradient_from_generator_step(monkeypatch: pytest.MonkeyPatch) -> None:
    module = make_module(dis_warmup_steps=0)  # adversarial term from iteration 1
    seen: list[list] = []
    original = module._generator_step

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append([p.grad for p in module.discriminator.parameters()])
        return out

    monkeypatch.setattr(module, "_generator_step", spy)
    recorder = Recorder()
    fit(module, make_batches(1), callbacks=[recorder])
    assert seen and all(g is None or not g.any() for g in seen[0])
    assert recorder.metrics[0]["train/gan_g"] != 0.0
    assert all(p.requires_grad for p in module.discriminator.parameters())  # untoggled afterwards


def test_adversarial_term_only_after_warmup_and_d_trains_during_it() -> None:
    module = make_module(dis_warmup_steps=2)
    recorder = Recorder()
    d_before = snapshot(module.discriminator)
    trainer = fit(module, make_batches(3), callbacks=[recorder])
    gan = [m["train/gan_g"] for m in recorder.metrics]
    assert gan[0] == 0.0 and gan[1] == 0.0 and gan[2] != 0.0
    assert changed(d_before, module.discriminator)
    assert trainer.global_step == 6


def test_checkpoint_has_no_frozen_weights_and_reloads_non_strict(tmp_path: Path) -> None:
    module = make_module()
    trainer = fit(module, make_batches(2))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert not [k for k in keys if k.startswith(("backbone.", "lpips."))]
    assert any(k.startswith("noise_predictor.") for k in keys) and any(
        k.startswith("discriminator.") for k in keys
    )
    assert ckpt["invsr_iteration"] == 2 and ckpt["noise_predictor_config"]["block_out_channels"] == [32, 32]
    fresh = make_module(seed=1)
    parts = {name: getattr(fresh, name) for name in ("backbone", "noise_predictor", "discriminator", "lpips")}
    reloaded = InvSRLitModule.load_from_checkpoint(path, **parts)
    assert changed(snapshot(module.noise_predictor), reloaded.noise_predictor) == []
    assert changed(snapshot(module.discriminator), reloaded.discriminator) == []
    assert reloaded.hparams.seed == 7


def test_resume_is_exact(tmp_path: Path) -> None:
    """Two epochs of one batch straight == one epoch, checkpoint, resume for the second."""
    batches = make_batches(1)
    kwargs = dict(lr_warmup_steps=3, lpips=None, lpips_weight=0.0)
    straight = make_module(**kwargs)
    fit(straight, batches, max_epochs=2)
    first = make_module(**kwargs)
    trainer = fit(first, batches, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "e1.ckpt")
    resumed = make_module(seed=3, **kwargs)
    fit(resumed, batches, max_epochs=2, ckpt_path=tmp_path / "e1.ckpt")
    assert resumed.iteration == 2
    for name in ("noise_predictor", "discriminator"):
        assert changed(snapshot(getattr(straight, name)), getattr(resumed, name)) == [], name


def test_nonfinite_step_is_skipped_and_counted() -> None:
    module = make_module()
    np_before = snapshot(module.noise_predictor)
    d_before = snapshot(module.discriminator)

    class Check(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 0:  # the NaN batch: nothing stepped
                assert changed(np_before, pl_module.noise_predictor) == []
                assert changed(d_before, pl_module.discriminator) == []
                assert pl_module.skipped_steps == 1 and pl_module.consecutive_nonfinite == 1

    with pytest.warns(UserWarning, match="non-finite generator"):
        trainer = fit(module, make_batches(2, nan_at=(0,)), callbacks=[Check()])
    assert module.skipped_steps == 1 and module.consecutive_nonfinite == 0
    assert trainer.global_step == 2  # only the second iteration stepped G and D
    assert changed(np_before, module.noise_predictor)


def test_run_of_nonfinite_steps_stops_with_a_clear_error() -> None:
    module = make_module(max_consecutive_nonfinite=3)
    with pytest.raises(RuntimeError, match=r"3 consecutive non-finite.*iteration 3.*l2=nan"):
        fit(module, make_batches(5, nan_at=(0, 1, 2, 3, 4)))
    assert module.skipped_steps == 3


def test_lr_warmup_starts_at_lr_over_warmup() -> None:
    module = make_module(lr_warmup_steps=3, discriminator=None, lpips=None, lpips_weight=0.0)
    recorder = Recorder()
    fit(module, make_batches(5), callbacks=[recorder])
    expected = [1e-3 * min(j / 3, 1.0) for j in range(1, 6)]
    assert recorder.lr_g == pytest.approx(expected)
    assert warmup_factor(0, 2000) == 1 / 2000 and warmup_factor(5, 0) == 1.0


def test_micro_batches_and_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    module = make_module(micro_batch_size=1, grad_clip_g=1e-3, grad_clip_d=1e-3)
    norms = []
    original = module.clip_gradients

    def spy(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        original(
            optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
        )
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in params])))

    monkeypatch.setattr(module, "clip_gradients", spy)
    trainer = fit(module, make_batches(1, batch=3))
    assert trainer.global_step == 2 and len(norms) == 2
    assert all(n <= 1e-3 * (1 + 1e-4) for n in norms)


def test_without_discriminator_and_lpips_and_max_iterations() -> None:
    module = make_module(discriminator=None, lpips=None, lpips_weight=0.0, max_iterations=2)
    trainer = fit(module, make_batches(4))
    assert module.iteration == 2 and trainer.global_step == 2 and len(trainer.optimizers) == 1
    with pytest.raises(ValueError, match="lpips_weight"):
        make_module(lpips=None)


def test_validation_metrics_and_images() -> None:
    module = make_module(val_num_steps=[1, 2], val_keep_images=1)
    val = [{"lq": b["lq"], "gt": b["gt"], "name": ["a", "b"]} for b in make_batches(2, seed=5)]
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    metrics = trainer.validate(module, dataloaders=DataLoader(val, batch_size=None), verbose=False)[0]
    for key in ("val/psnr_1step", "val/ssim_1step", "val/psnr_2step", "val/ssim_2step"):
        assert math.isfinite(metrics[key]), key
    images = module.last_val_images
    assert images["lq"].shape == (1, 3, LQ, LQ) and images["gt"].shape == (1, 3, GT, GT)
    assert set(images["sr"]) == {1, 2} and images["sr"][2].shape == (1, 3, GT, GT)
    sr = module(val[0]["lq"], num_steps=1, generator=torch.Generator().manual_seed(0))
    assert sr.shape == (2, 3, GT, GT) and float(sr.min()) >= 0.0 and float(sr.max()) <= 1.0


def test_parameter_summary_counts_frozen_and_trainable() -> None:
    module = make_module()
    summary = parameter_summary(module)
    trainable = sum(p.numel() for m in (module.noise_predictor, module.discriminator) for p in m.parameters())
    assert summary["params/trainable"] == trainable
    assert summary["params/backbone/trainable"] == 0 and summary["params/lpips/trainable"] == 0
    assert summary["params/noise_predictor/frozen"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_amp_steps_on_cuda_clip_unscaled_gradients(precision: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under "16-mixed" the GradScaler scales the loss in manual_backward and unscales inside opt.step()
    before on_before_optimizer_step, where the module clips: the clip must see unscaled gradients."""
    module = make_module(grad_clip_g=1e-3, grad_clip_d=1e-3, dis_warmup_steps=1)
    frozen, np_before = snapshot(module.backbone), snapshot(module.noise_predictor)
    stages: list[str] = []
    original = module.clip_gradients

    def spy(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        scaler = module.trainer.precision_plugin.scaler
        if scaler is not None:
            stages.append(scaler._per_optimizer_states[id(optimizer)]["stage"].name)
        original(
            optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm
        )

    monkeypatch.setattr(module, "clip_gradients", spy)
    fit(module, make_batches(3), accelerator="gpu", precision=precision)
    assert module.iteration == 3 and module.skipped_steps == 0
    assert changed(np_before, module.noise_predictor) and changed(frozen, module.backbone) == []
    if precision == "16-mixed":
        assert stages and set(stages) == {"UNSCALED"}
