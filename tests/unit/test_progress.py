"""experiment=smoke shows the iteration bar (callbacks/progress.py), not Lightning's default `Epoch 0/-2`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ProgressBar

from callbacks.progress import IterationProgressBar
from invsr_pl.launch.instantiate import instantiate_callbacks

CONF = Path(__file__).resolve().parents[2] / "conf"


def test_smoke_uses_the_iteration_bar() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=smoke", "paths.output_dir=/nonexistent"])
    assert cfg.trainer.enable_progress_bar
    # without a ProgressBar callback Lightning adds its own RichProgressBar: "Epoch 0/-2" (max_epochs=-1)
    bars = [c for c in instantiate_callbacks(cfg.callbacks) if isinstance(c, ProgressBar)]
    assert len(bars) == 1 and isinstance(bars[0], IterationProgressBar)

    bar = bars[0]
    bar._trainer = SimpleNamespace(lightning_module=SimpleNamespace(hparams={"max_iterations": 4}))
    assert bar.total_train_batches == 4
    assert bar._get_train_description(0).strip() == "Iteration"
