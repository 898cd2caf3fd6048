"""TrainingPairPool: pass-through while filling, permute-and-swap once full, state round trip."""

from __future__ import annotations

import pytest
import torch

from datamodules.degradation import TrainingPairPool


def _batch(start: int, b: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.arange(start, start + b, dtype=torch.float32)
    return {
        "lq": ids.view(-1, 1, 1, 1).expand(b, 3, 2, 2).clone(),
        "gt": ids.view(-1, 1, 1, 1).expand(b, 3, 8, 8).clone(),
    }


def test_fills_then_swaps():
    pool = TrainingPairPool(size=12)
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        b = _batch(4 * k)
        out = pool(b, g)
        assert out["lq"] is b["lq"]  # pass-through while filling
    assert pool.is_full and len(pool) == 12
    seen = set()
    new = _batch(100)
    out = pool(new, g)
    ids = out["lq"][:, 0, 0, 0].tolist()
    assert len(ids) == 4 and set(ids) <= set(range(12))
    seen.update(ids)
    torch.testing.assert_close(out["gt"][:, 0, 0, 0], out["lq"][:, 0, 0, 0])  # pairs stay aligned
    content = set(pool.state_dict()["queue"]["lq"][:, 0, 0, 0].tolist())
    assert content == (set(range(12)) - seen) | {100, 101, 102, 103}


def test_deterministic_with_generator():
    def run(seed):
        pool = TrainingPairPool(size=8)
        g = torch.Generator().manual_seed(seed)
        return [pool(_batch(4 * k), g)["lq"][:, 0, 0, 0].tolist() for k in range(6)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_state_dict_round_trip():
    pool = TrainingPairPool(size=8)
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        pool(_batch(4 * k), g)
    state = pool.state_dict()
    other = TrainingPairPool(size=8)
    other.load_state_dict(state)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(pool(_batch(50), g1)["gt"], other(_batch(50), g2)["gt"])
    partial = TrainingPairPool(size=8)
    partial(_batch(0), g)
    restored = TrainingPairPool(size=8)
    restored.load_state_dict(partial.state_dict())
    assert len(restored) == 4 and not restored.is_full
    with pytest.raises(ValueError, match="size"):
        TrainingPairPool(size=4).load_state_dict(state)


def test_disabled_and_bad_batches():
    pool = TrainingPairPool(size=0)
    b = _batch(0)
    assert pool(b)["lq"] is b["lq"]
    pool = TrainingPairPool(size=8)
    pool(_batch(0))
    with pytest.raises(ValueError, match="keys"):
        pool({"lq": torch.zeros(4, 3, 2, 2)})
    with pytest.raises(ValueError, match="leading size"):
        pool({"lq": torch.zeros(4, 3, 2, 2), "gt": torch.zeros(3, 3, 8, 8)})
    pool(_batch(4))
    with pytest.raises(ValueError, match="Generator"):
        pool(_batch(8))


@pytest.mark.gpu
def test_cpu_state_follows_cuda_batches():
    pool = TrainingPairPool(size=8)
    g = torch.Generator().manual_seed(0)
    pool(_batch(0), g)
    other = TrainingPairPool(size=8)
    other.load_state_dict(pool.state_dict())  # CPU tensors, as after a checkpoint load
    cuda = {k: v.cuda() for k, v in _batch(4).items()}
    other(cuda, torch.Generator(device="cuda").manual_seed(0))
    assert other.is_full
    out = other({k: v.cuda() for k, v in _batch(8).items()}, torch.Generator(device="cuda").manual_seed(1))
    assert out["lq"].device.type == "cuda"
