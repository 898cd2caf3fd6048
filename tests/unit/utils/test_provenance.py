"""Provenance: built from the composed training config, read back from a checkpoint / export folder, and the
one-line backbone mismatch refusal (invsr_pl/utils/provenance.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from invsr_pl.utils import provenance as P
from invsr_pl.utils.checkpoint import WeightFileError

CONF = Path(__file__).resolve().parents[3] / "conf"


def _train_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=["paths.output_dir=/nonexistent", *overrides])


@pytest.mark.parametrize(
    ("overrides", "name", "choice"),
    [
        (["experiment=quickstart"], "tiny_trained", "tiny_trained"),
        (["experiment=smoke", "scale=2"], "tiny", "tiny"),
        (
            ["model.backbone.model=/models/sd-turbo", "model.backbone.revision=abc"],
            "/models/sd-turbo",
            "sd_turbo",
        ),
    ],
)
def test_training_provenance_names_the_backbone_invsr_sr_takes(overrides, name, choice) -> None:
    cfg = _train_cfg(*overrides)
    prov = P.training_provenance(cfg)
    assert prov["format"] == P.FORMAT
    assert prov["backbone"]["name"] == name
    assert prov["backbone"]["choice"] == choice  # from the builder, whatever Hydra ran before
    assert prov["backbone"]["config"]["_target_"] == cfg.model.backbone._target_
    assert prov["scale"] == cfg.scale
    assert prov["noise_predictor"]["scale"] == cfg.scale
    assert prov["seed"] == cfg.seed
    assert prov["validation"]["chopping_size"] == cfg.model.chopping_size
    json.dumps(prov)  # plain values only: JSON for the export, weights-only for the checkpoint
    if name.startswith("/"):
        assert prov["backbone"]["revision"] == "abc"
        assert prov["prompt"].startswith("Cinematic")  # FrozenSDTurbo.from_pretrained's default prompt
    else:
        assert prov["prompt"] is None  # the tiny twins have a fixed embedding, no text


def test_read_provenance_from_checkpoint_folder_and_official_file(tmp_path: Path) -> None:
    record = {"format": 1, "backbone": {"name": "tiny_trained", "revision": None}, "scale": 4}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, P.PROVENANCE_KEY: record}, ckpt)
    assert P.read_provenance(ckpt) == record
    old = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}}, old)
    assert P.read_provenance(old) is None  # checkpoints from before provenance: today's behaviour

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    assert P.read_provenance(folder) is None
    (folder / P.EXPORT_FILE).write_text(json.dumps(record))
    assert P.read_provenance(folder) == record
    assert P.read_provenance(folder / "model.safetensors") == record
    sub = folder / "noise_predictor"  # invsr-export's diffusers subfolder: the record is one level up
    sub.mkdir()
    (sub / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert P.read_provenance(sub) == record
    assert P.read_provenance(sub / "diffusion_pytorch_model.safetensors") == record

    official = tmp_path / "noise_predictor_sd_turbo_v5.pth"
    torch.save({"encoder.x": torch.zeros(1)}, official)
    assert P.read_provenance(official) is None

    with pytest.raises(FileNotFoundError, match="does not exist"):
        P.read_provenance(tmp_path / "missing.ckpt")
    (folder / P.EXPORT_FILE).write_text(json.dumps({"format": 1}))
    with pytest.raises(WeightFileError, match="not a provenance dict"):
        P.read_provenance(folder)
    (folder / P.EXPORT_FILE).write_text(json.dumps({"format": 9, "backbone": {}}))
    with pytest.raises(WeightFileError, match="newer"):
        P.read_provenance(folder)


def test_check_backbone_one_line_naming_both_and_the_override() -> None:
    prov = {"backbone": {"name": "tiny_trained", "revision": None}}
    P.check_backbone(prov, "tiny_trained")
    P.check_backbone(None, "tiny")  # nothing recorded (official weights): accepted
    with pytest.raises(P.BackboneMismatchError) as err:
        P.check_backbone(
            prov,
            "tiny",
            weights="last.ckpt",
            requested_as="model/backbone=tiny",
            accept_hint="add allow_backbone_mismatch=true",
        )
    message = str(err.value)
    assert "\n" not in message
    for part in (
        "last.ckpt",
        "'tiny_trained'",
        "'tiny'",
        "model/backbone=tiny",
        "allow_backbone_mismatch=true",
    ):
        assert part in message
    hub = {"backbone": {"name": "stabilityai/sd-turbo", "revision": "v1"}}
    P.check_backbone(hub, "stabilityai/sd-turbo")  # no revision named: the recorded one is not contradicted
    with pytest.raises(P.BackboneMismatchError, match="v1"):
        P.check_backbone(hub, "stabilityai/sd-turbo", "v2")
