"""NoisePredictorEMA: decay schedule, only the NP averaged, swap in/out, checkpoint round trip."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from callbacks.ema import EMA_CHECKPOINT_KEY, NoisePredictorEMA


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.noise_predictor = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.discriminator = nn.Linear(4, 1)


def _perturb(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen))


def test_decay_schedule() -> None:
    ema = NoisePredictorEMA(decay=0.999)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(10) == pytest.approx(11 / 20)
    assert ema.decay_at(100) == pytest.approx(101 / 110)
    assert ema.decay_at(10**6) == pytest.approx(0.999)
    assert NoisePredictorEMA(decay=0.9, use_warmup=False).decay_at(1) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        NoisePredictorEMA(decay=1.0)


def test_update_averages_only_noise_predictor() -> None:
    module = _Module()
    cb = NoisePredictorEMA()
    cb.on_fit_start(None, module)  # type: ignore[arg-type]
    assert set(cb.ema) == set(module.noise_predictor.state_dict())  # discriminator never averaged
    start = {k: v.clone() for k, v in cb.ema.items()}
    module.noise_predictor[1].weight.requires_grad_(False)  # frozen params are copied, not averaged
    _perturb(module.noise_predictor, 1)
    module.noise_predictor[1].running_mean.fill_(3.0)
    cb.on_train_batch_end(None, module, None, None, 0)  # type: ignore[arg-type]
    d = 2 / 11
    live = module.noise_predictor.state_dict()
    torch.testing.assert_close(cb.ema["0.weight"], d * start["0.weight"] + (1 - d) * live["0.weight"])
    torch.testing.assert_close(cb.ema["1.weight"], live["1.weight"])
    torch.testing.assert_close(cb.ema["1.running_mean"], live["1.running_mean"])
    assert cb.num_updates == 1


def test_swap_in_and_out_restores_weights_exactly() -> None:
    module = _Module()
    cb = NoisePredictorEMA()
    cb.on_fit_start(None, module)  # type: ignore[arg-type]
    for i in range(3):
        _perturb(module.noise_predictor, i)
        cb.on_train_batch_end(None, module, None, None, i)  # type: ignore[arg-type]
    trained = {k: v.clone() for k, v in module.noise_predictor.state_dict().items()}
    disc = module.discriminator.weight.clone()
    cb.on_validation_start(None, module)  # type: ignore[arg-type]
    for k, v in module.noise_predictor.state_dict().items():
        assert torch.equal(v, cb.ema[k])
    assert not torch.equal(module.noise_predictor[0].weight, trained["0.weight"])
    cb.on_validation_end(None, module)  # type: ignore[arg-type]
    for k, v in module.noise_predictor.state_dict().items():
        assert torch.equal(v, trained[k])
    assert torch.equal(module.discriminator.weight, disc)
    # the parameter objects are the same (in-place swap), so optimisers and samplers keep their references
    cb.on_test_start(None, module)  # type: ignore[arg-type]
    cb.on_test_end(None, module)  # type: ignore[arg-type]
    assert torch.equal(module.noise_predictor[0].weight, trained["0.weight"])


def test_checkpoint_round_trip() -> None:
    module = _Module()
    cb = NoisePredictorEMA()
    cb.on_fit_start(None, module)  # type: ignore[arg-type]
    for i in range(5):
        _perturb(module.noise_predictor, i)
        cb.on_train_batch_end(None, module, None, None, i)  # type: ignore[arg-type]
    checkpoint: dict = {"callbacks": {cb.state_key: cb.state_dict()}}
    cb.on_save_checkpoint(None, module, checkpoint)  # type: ignore[arg-type]
    assert set(checkpoint[EMA_CHECKPOINT_KEY]) == set(module.noise_predictor.state_dict())

    fresh_module = _Module()
    restored = NoisePredictorEMA()
    restored.on_load_checkpoint(None, fresh_module, checkpoint)  # type: ignore[arg-type]
    restored.load_state_dict(checkpoint["callbacks"][cb.state_key])
    restored.on_fit_start(None, fresh_module)  # type: ignore[arg-type]
    assert restored.num_updates == 5
    for k, v in cb.ema.items():
        assert torch.equal(restored.ema[k], v)
    # the next update continues the schedule (k = 6) identically in both
    _perturb(module.noise_predictor, 9)
    fresh_module.noise_predictor.load_state_dict(module.noise_predictor.state_dict())
    cb.on_train_batch_end(None, module, None, None, 5)  # type: ignore[arg-type]
    restored.on_train_batch_end(None, fresh_module, None, None, 5)  # type: ignore[arg-type]
    for k, v in cb.ema.items():
        assert torch.equal(restored.ema[k], v)


def test_exception_during_validation_puts_the_training_weights_back() -> None:
    """SIGTERM mid-validation: the checkpoint saved on the exception must hold the training weights."""
    module = _Module()
    cb = NoisePredictorEMA()
    cb.on_fit_start(None, module)  # type: ignore[arg-type]
    _perturb(module.noise_predictor, 0)
    cb.on_train_batch_end(None, module, None, None, 0)  # type: ignore[arg-type]
    trained = {k: v.clone() for k, v in module.noise_predictor.state_dict().items()}
    cb.on_validation_start(None, module)  # type: ignore[arg-type]
    assert not torch.equal(module.noise_predictor[0].weight, trained["0.weight"])  # EMA swapped in
    cb.on_exception(None, module, SystemExit())  # type: ignore[arg-type]
    for k, v in module.noise_predictor.state_dict().items():
        assert torch.equal(v, trained[k])
