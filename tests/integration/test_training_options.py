"""Model options of a training run: initial weights, discriminator checkpointing, the D warm-up boundary,
torch.compile. Tiny twins on CPU through a real lightning.Trainer (helpers from test_module_step)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from test_module_step import Recorder, fit, make_batches, make_module, snapshot

import invsr_pl.models.discriminator as discriminator_module


class FirstStepWeights(L.Callback):
    """Noise predictor and discriminator weights as the first training step sees them."""

    def __init__(self) -> None:
        self.np: dict[str, torch.Tensor] | None = None
        self.d: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.np is None:
            self.np, self.d = snapshot(pl_module.noise_predictor), snapshot(pl_module.discriminator)


def test_released_weights_are_the_starting_point(tmp_path: Path) -> None:
    """Weights written in the official layout (a plain state dict per network) start training."""
    donor = make_module(seed=5)
    np_path, d_path = tmp_path / "noise_predictor_sd_turbo_v5.pth", tmp_path / "discriminator_sd_turbo_v5.pth"
    torch.save(donor.noise_predictor.state_dict(), np_path)
    torch.save(donor.discriminator.state_dict(), d_path)
    module = make_module(seed=0, noise_predictor_init=str(np_path), discriminator_init=str(d_path))
    random = make_module(seed=0)
    first = FirstStepWeights()
    fit(module, make_batches(1), callbacks=[first])
    for got, want, fresh in (
        (first.np, donor.noise_predictor.state_dict(), random.noise_predictor.state_dict()),
        (first.d, donor.discriminator.state_dict(), random.discriminator.state_dict()),
    ):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert any(not torch.equal(want[k], fresh[k]) for k in want)  # the file, not the random init
    assert module.iteration == 1  # fresh schedule: initialising is not resuming


def test_missing_or_wrong_init_weights_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.noise_predictor_init=.*not found"):
        make_module(noise_predictor_init=str(tmp_path / "absent.pth"))
    bad = tmp_path / "d.pth"
    torch.save({"not_a_key": torch.zeros(1)}, bad)
    with pytest.raises(RuntimeError):  # strict loading
        make_module(discriminator_init=str(bad))
    with pytest.raises(ValueError, match="no discriminator"):
        make_module(discriminator=None, gan_weight=0.0, discriminator_init=str(bad))


def test_gradient_checkpointing_flag_checkpoints_the_discriminator(monkeypatch) -> None:
    calls = []
    real = discriminator_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(discriminator_module, "checkpoint", counting)
    module = make_module(gradient_checkpointing=True, dis_warmup_steps=0)
    assert module.discriminator.gradient_checkpointing
    fit(module, make_batches(1))
    assert calls, "the discriminator's blocks were not checkpointed in the training step"
    assert not make_module(gradient_checkpointing=False).discriminator.gradient_checkpointing


def test_discriminator_warmup_boundary_matches_the_reference() -> None:
    """D steps while k < dis_warmup_steps, then every dis_update_freq-th iteration: with warm-up 3 and
    frequency 2, iterations 1, 2 and 4 update D (iteration 3 does not)."""
    module = make_module(dis_warmup_steps=3, dis_update_freq=2)
    recorder = Recorder()
    trainer = fit(module, make_batches(4), callbacks=[recorder])
    assert trainer.global_step == 4 + 3  # four G steps, three D steps
    gan = [m["train/gan_g"] for m in recorder.metrics]
    assert gan[:3] == [0.0, 0.0, 0.0] and gan[3] != 0.0  # the adversarial term from iteration 4


@pytest.mark.slow
def test_compiled_training_step_matches_eager() -> None:
    """model.compile: one training step's losses agree with eager within 1e-4 (relative), and the
    checkpointed keys carry no ``_orig_mod.``. Dynamo captures the graphs (forward and backward through
    AOTAutograd) as on a GPU; the ``aot_eager`` backend runs them without generating C++ kernels, which on
    this 2-core CI would take many minutes (benchmarks/train_step.py --compile measures inductor)."""
    results = []
    for compiled in (False, {"backend": "eager"}):
        module = make_module(seed=0, compile=compiled, dis_warmup_steps=0)
        recorder = Recorder()
        fit(module, make_batches(1), callbacks=[recorder])
        results.append(recorder.metrics[0])
        assert not [k for k in module.state_dict() if "_orig_mod" in k]
        if compiled:
            assert module.noise_predictor._compiled_call_impl is not None
    eager, comp = results
    for key in ("train/loss", "train/l2", "train/lpips", "train/gan_g", "train/d_loss"):
        assert comp[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key


def test_progress_bar_counts_iterations_out_of_max_iterations() -> None:
    from callbacks.progress import IterationProgressBar

    module = make_module(max_iterations=3)
    bar = IterationProgressBar()
    # two epochs of two batches: the run stops on max_iterations in the second epoch, on one task
    fit(module, make_batches(2), callbacks=[bar], enable_progress_bar=True, max_epochs=2)
    task = bar.progress.tasks[bar.train_progress_bar_id]
    assert (task.total, task.completed) == (3, 3) and module.iteration == 3
    assert task.description.strip().endswith("Iteration")
