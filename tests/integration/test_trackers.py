"""Experiment trackers for real, offline: ``logger=mlflow`` (a local SQLite store read back through the MLflow
client), ``logger=wandb`` (offline mode, read back from the run folder) and a 2-job multirun grouped in both;
plus the config flattening and the labelled, zero-padded validation grids (docs/tracking.md)."""

from __future__ import annotations

import json
import logging
import re
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from callbacks.image_logger import ValidationImageLogger, add_labels, column_labels
from invsr_pl.utils.hparams import flatten_config, run_group, run_name, tracker_tags, wandb_offline

REPO_ROOT = Path(__file__).resolve().parents[2]
MakeCfg = Callable[..., DictConfig]
# the smoke run, shortened: 2 iterations, each logged, one validation (and grid) at iteration 2
SHORT = ["experiment=smoke", "model.max_iterations=2", "trainer.val_check_interval=2"]


@pytest.fixture
def offline_trackers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No tracking server, no W&B key, and W&B's settings/cache folders inside tmp_path."""
    for name in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


# ------------------------------------------------------------------------------------------- fast
def test_flatten_config_keys_secrets_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = OmegaConf.create(
        {
            "model": {"optimizer_g": {"lr": 2e-3}, "val_num_steps": [1, 3], "empty": {}},
            "data": {"sources": [{"root": f"{tmp_path}/home/photos", "weight": 1}]},
            "paths": {"log_dir": "${oc.env:HOME}/logs", "other": "/data/x"},
            "logger": {"wandb": {"api_key": "k", "hf_token": "t"}, "uri": "http://me:pw@host/db"},
            "tokenizer": "kept",
        }
    )
    flat = flatten_config(cfg)
    assert flat["model.optimizer_g.lr"] == 2e-3 and flat["model.val_num_steps"] == [1, 3]
    assert flat["data.sources.0.root"] == "~/photos" and flat["data.sources.0.weight"] == 1
    assert flat["paths.log_dir"] == "~/logs" and flat["paths.other"] == "/data/x"  # resolved, home hidden
    assert flat["model.empty"] == "{}" and flat["tokenizer"] == "kept"
    assert flat["logger.uri"] == "http://me@host/db"
    assert not [k for k in flat if k.split(".")[-1] in ("api_key", "hf_token")], sorted(flat)


def test_run_metadata_outside_a_hydra_run(offline_trackers: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """hydra.compose / notebooks: the single-run values; W&B offline without a key, online with one."""
    assert run_group("quickstart") == "quickstart" and run_name() is None
    assert tracker_tags(["a", "b"], "dict") == {"tags": "a,b"}
    assert tracker_tags(["a", "x" * 80], "list") == ["a", "x" * 64]
    with pytest.raises(ValueError, match="style"):
        tracker_tags([], "set")
    assert wandb_offline() is True
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert wandb_offline() is False
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "online")  # an explicit mode is left to wandb
    assert wandb_offline() is False


def test_tracker_configs_compose(compose_cfg: Callable[..., DictConfig], offline_trackers: None) -> None:
    mlflow = compose_cfg(["experiment=quickstart", "logger=mlflow"]).logger.mlflow
    assert mlflow.experiment_name == "quickstart" and mlflow.tags == {"tags": "quickstart,tiny,cpu"}
    assert re.fullmatch(r"sqlite:///.*/logs/mlflow/mlflow\.db", mlflow.tracking_uri), mlflow.tracking_uri
    assert mlflow.log_model is False
    wandb = compose_cfg(["experiment=quickstart", "logger=wandb"]).logger.wandb
    assert wandb.offline is True and wandb.group == "quickstart" and list(wandb.tags)[0] == "quickstart"


def test_grid_labels_and_one_padding(compose_cfg: Callable[..., DictConfig]) -> None:
    """The grid's strip names each column; grids and checkpoints share one zero-padding."""
    images = {
        "lq": torch.zeros(2, 3, 16, 16),
        "gt": torch.ones(2, 3, 64, 64),
        "sr": {3: torch.ones(2, 3, 64, 64)},
    }
    images["sr"][1] = torch.ones(2, 3, 64, 64)
    labels = column_labels(images)
    assert labels == ["LQ", "SR 1 step", "SR 3 steps", "GT"]
    assert column_labels({"lq": images["lq"], "sr": images["gt"]}) == ["LQ", "SR"]
    grid, cols = ValidationImageLogger.build_grid(images, max_images=2)
    labelled = add_labels(grid, labels)
    strip = labelled.shape[1] - grid.shape[1]
    assert cols == 4 and labelled.shape[2] == grid.shape[2] and 8 <= strip <= 30
    assert torch.equal(labelled[:, strip:], grid.clamp(0, 1).mul(255).round().div(255))
    head = labelled[:, :strip]
    for i in range(cols):  # dark text pixels over every column, none in the white padding between them
        column = head[:, :, 2 + i * 66 : 2 + i * 66 + 64]
        assert (column < 0.5).any(), f"column {i} ({labels[i]}) has no label"
    cfg = compose_cfg(["experiment=quickstart"]).callbacks
    assert cfg.image_logger.filename == cfg.model_checkpoint.filename == "iter_{iteration:08d}"
    with pytest.raises(ValueError, match="iteration"):
        ValidationImageLogger(filename="iter_{step:08d}")


# ------------------------------------------------------------------------------------------- W&B file
def _wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` transaction log: wandb's LevelDB-style format (a 7-byte header,
    32 KiB blocks of chunks with a 7-byte header: CRC32, length, type FULL=1 / FIRST / MIDDLE / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / zero padding
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _wandb_run(run_dir: Path) -> dict[str, Any]:
    """``{"run": RunRecord, "config": {key: value}, "history": [{key: value}], "dir": the offline run}``."""
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    (log,) = folder.glob("*.wandb")
    out: dict[str, Any] = {"config": {}, "history": [], "dir": folder}
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = record.run
        elif kind == "config":
            out["config"].update(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.config.update}
            )
        elif kind == "history":
            out["history"].append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            )
    return out


def _history(rows: list[dict[str, Any]], key: str) -> list[tuple[int, Any]]:
    return [(r["trainer/global_step"], r[key]) for r in rows if key in r]


# ------------------------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_mlflow_run_reads_back(
    train_cfg: MakeCfg, tmp_path: Path, offline_trackers: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Params (the flattened config), every curve at the InvSR iteration, the labelled grid as an image;
    the run ends by naming the ``mlflow ui`` command."""
    from mlflow.tracking import MlflowClient

    from train import train

    caplog.set_level(logging.INFO)
    metrics, objects = train(train_cfg(*SHORT, "logger=mlflow"))
    uri = objects["cfg"].logger.mlflow.tracking_uri
    assert f"MLflow: mlflow ui --backend-store-uri {uri} (experiment 'smoke')" in caplog.messages
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "smoke"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["tags"] == "smoke,tiny,cpu"
    params = run.data.params
    assert params["model.max_iterations"] == "2" and params["task_name"] == "smoke"
    assert int(params["params/noise_predictor/trainable"]) > 0
    assert not any(str(Path.home()) + "/" in v for v in params.values() if Path.home() != Path("/"))

    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/iteration")}
    assert history == {1: 1.0, 2: 2.0}, "train curves must be indexed by the InvSR iteration"
    (val,) = client.get_metric_history(run.info.run_id, "val/psnr_1step")
    assert val.step == 2 and val.value == pytest.approx(metrics["val/psnr_1step"])
    assert {"val/psnr_bicubic", "val/ssim_2step", "train/loss"} <= set(run.data.metrics)

    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    pngs = [p for p in images if p.endswith(".png") and "+step+2+" in p]
    assert len(pngs) == 1 and "lq_sr_gt" in pngs[0], images
    local = Path(client.download_artifacts(run.info.run_id, pngs[0], str(tmp_path / "dl")))
    saved = tmp_path / "run" / "images" / "val" / "iter_00000002.png"
    assert local.read_bytes()[:4] == b"\x89PNG" and saved.is_file()
    from PIL import Image

    assert Image.open(local).size == Image.open(saved).size  # the same labelled grid


@pytest.mark.slow
def test_wandb_offline_run_reads_back(
    train_cfg: MakeCfg, tmp_path: Path, offline_trackers: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a key the run is offline; its folder holds the config, curves at the iteration, the grid."""
    import wandb

    from train import train

    caplog.set_level(logging.INFO)
    try:
        metrics, _ = train(train_cfg(*SHORT, "logger=wandb"))
    finally:
        wandb.finish()  # ends the run (a script does it at exit)
        wandb.teardown()  # stops wandb's service process, which writes the rest of the transaction log
    run = _wandb_run(tmp_path / "run")
    assert f"W&B (offline): wandb sync {run['dir']}" in caplog.messages
    assert run["run"].run_group == "smoke" and list(run["run"].tags) == ["smoke", "tiny", "cpu"]
    assert run["run"].project == "invsr-pl"
    assert (
        run["config"]["model.max_iterations"] == 2 and run["config"]["params/noise_predictor/trainable"] > 0
    )
    assert _history(run["history"], "train/iteration") == [(1, 1.0), (2, 2.0)]
    assert _history(run["history"], "val/psnr_1step") == [(2, pytest.approx(metrics["val/psnr_1step"]))]
    # a wandb.Image is stored as its fields under the key: val/lq_sr_gt/filenames, .../captions, ...
    ((step, files),) = _history(run["history"], "val/lq_sr_gt/filenames")
    assert step == 2 and _history(run["history"], "val/lq_sr_gt/captions")[0][1] == [
        "LQ | SR 1 step | SR 2 steps | GT"
    ]
    assert (run["dir"] / "files" / files[0]).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_multirun_is_one_experiment_and_one_group(tmp_path: Path, offline_trackers: None) -> None:
    """``train.py -m ... logger=[mlflow,wandb]``: each job its own run, the sweep one MLflow experiment and
    one W&B group, the swept override a tag of each run (and the constant ones not)."""
    from mlflow.tracking import MlflowClient

    sweep_dir = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    cmd = [sys.executable, "train.py", "-m", *SHORT, "logger=[mlflow,wandb]", "model.gan_weight=0,0.1"]
    cmd += [f"hydra.sweep.dir={sweep_dir}", f"paths.log_dir={tmp_path / 'logs'}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    group = "smoke sweep 2026-01-01_00-00-00"

    client = MlflowClient(f"sqlite:///{tmp_path}/logs/mlflow/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    assert experiment.name == group
    runs = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.data.tags["job"])
    assert [r.data.tags["model.gan_weight"] for r in runs] == ["0", "0.1"]
    assert [r.info.run_name for r in runs] == ["job 0: model.gan_weight=0", "job 1: model.gan_weight=0.1"]
    assert all("experiment" not in r.data.tags and r.info.status == "FINISHED" for r in runs)
    assert all(r.data.metrics.get("val/psnr_1step") for r in runs)

    for job, weight in (("0", "0"), ("1", "0.1")):
        run = _wandb_run(sweep_dir / job)
        assert run["run"].run_group == group
        assert list(run["run"].tags) == ["smoke", "tiny", "cpu", f"model.gan_weight={weight}"]
        assert run["config"]["model.gan_weight"] == float(weight)


@pytest.mark.slow
def test_evaluate_table_reaches_mlflow(tmp_path: Path, offline_trackers: None) -> None:
    """``evaluate.py logger=mlflow``: the table's cells (per test set, row and metric) are metrics of a run in
    the ``evaluate`` experiment, next to the metrics.csv it writes."""
    import csv

    from mlflow.tracking import MlflowClient

    cmd = [
        sys.executable, "evaluate.py", "logger=mlflow", f"paths.log_dir={tmp_path / 'logs'}",
        f"hydra.run.dir={tmp_path / 'out'}", "data.test_datasets.samples.num_images=2",
        "data.test_datasets.samples.gt_size=64", "sampler.chopping_size=null", "warmup=0", "trainer=cpu",
        "metrics=fidelity", f"metrics.weights_dir={tmp_path / 'no_weights'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/logs/mlflow/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "evaluate"]
    (run,) = client.search_runs([experiment.experiment_id])
    table = {r["Method"]: r for r in csv.DictReader((tmp_path / "out" / "metrics.csv").open())}
    bicubic = run.data.metrics["test/samples/Bicubic/psnr"]
    assert bicubic == pytest.approx(float(table["Bicubic"]["PSNR↑"]), abs=0.01)
    assert any(
        k.startswith("test/samples/") and k.endswith("/ssim") and "Bicubic" not in k for k in run.data.metrics
    )
    assert run.data.params["task_name"] == "evaluate"
