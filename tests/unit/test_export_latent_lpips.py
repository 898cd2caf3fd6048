"""invsr-export-lpips (invsr_pl.cli.export_latent_lpips): setup errors are one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from invsr_pl.cli.export_latent_lpips import main


def test_setup_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "absent.ckpt"), str(tmp_path / "out.pth")]) == 2
    assert "absent.ckpt" in capsys.readouterr().err
    no_lpips = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"noise_predictor.w": torch.zeros(1)}}, no_lpips)
    assert main([str(no_lpips), str(tmp_path / "out.pth")]) == 2
    assert "no latent LPIPS" in capsys.readouterr().err
    existing = tmp_path / "exists.pth"
    existing.write_bytes(b"keep")
    assert main([str(no_lpips), str(existing)]) == 2
    assert existing.read_bytes() == b"keep" and "exists already" in capsys.readouterr().err
    assert not (tmp_path / "out.pth").exists()
