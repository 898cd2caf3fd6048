"""The one noise-predictor loader (invsr_pl.models.loading): what it refuses, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file

from invsr_pl.models.loading import load_noise_predictor
from invsr_pl.models.tiny import tiny_noise_predictor
from invsr_pl.utils.checkpoint import WeightFileError


@pytest.mark.parametrize("name", ["weights.pth", "weights.ckpt", "weights.bin"])
def test_text_file_is_not_a_weight_file(tmp_path: Path, name: str) -> None:
    """Issue 26: a 5-byte text file is reported as not a weight file, not as unsafe Python objects."""
    path = tmp_path / name
    path.write_text("hello")
    with pytest.raises(WeightFileError) as err:
        load_noise_predictor(path, default=tiny_noise_predictor)
    message = str(err.value)
    assert "not a weight file" in message and str(path) in message and "\n" not in message
    assert "Python objects" not in message


def test_safetensors_without_suffix_is_read(tmp_path: Path) -> None:
    """A safetensors file under another name is recognised by its header, not by its name."""
    model = tiny_noise_predictor(seed=1)
    save_file(model.state_dict(), str(tmp_path / "weights.bin"))
    loaded, note = load_noise_predictor(tmp_path / "weights.bin", default=tiny_noise_predictor)
    assert note.startswith("weights file")
    assert all((loaded.state_dict()[k] == v).all() for k, v in model.state_dict().items())
