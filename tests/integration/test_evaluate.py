"""evaluate(cfg) end to end: built-in samples, tiny backbone, random tiny noise predictor, CPU, trainer.test.

Metric weights are looked up in an empty folder, so every weight-needing metric is reported unavailable and
PSNR/SSIM (weight-free) are computed: the run must still finish and say what to fetch.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from invsr_pl.launch import checkpoint_provenance as CP
from invsr_pl.systems import evaluation as EM

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _load_evaluate_module():
    spec = importlib.util.spec_from_file_location("evaluate_entry", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ev = _load_evaluate_module()

SMALL = [
    "data.test_datasets.samples.num_images=2",
    "data.test_datasets.samples.gt_size=64",  # LQ 16x16 -> SR 64x64
    "data.test_datasets.samples.lq_mode=bicubic",
    "sampler.chopping_size=null",  # whole image in one pass (no padding up to 128)
    "warmup=0",
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def make_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    base = [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"metrics.weights_dir={tmp_path / 'no_weights'}",  # empty: weight-needing metrics are unavailable
        *SMALL,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[*base, *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_evaluate_samples_tiny_study(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cfg = make_cfg(tmp_path, "logger=csv")
    with open_dict(cfg):  # a two-row study: one 1-step and one 3-step timestep set (Table-1 style labels)
        cfg.study.rows = [
            {"label": "{200}", "timesteps": [200]},
            {"label": "{250,150,50}", "timesteps": [250, 150, 50]},
        ]
    metrics, objects = ev.evaluate(cfg)
    results = objects["model"].results

    summary = results["summary"]
    assert [(r["benchmark"], r["method"]) for r in summary] == [
        ("samples", "Bicubic"),
        ("samples", "{200}"),
        ("samples", "{250,150,50}"),
    ]
    assert summary[0]["timesteps"] is None and summary[2]["timesteps"] == [250, 150, 50]
    assert list(results["headers"]) == ["psnr", "ssim"]
    assert results["headers"]["psnr"] == "PSNR↑"
    for r in summary:
        assert r["num_images"] == 2
        assert 0 < r["psnr"] <= 80 and -1 <= r["ssim"] <= 1
        assert r["latency_mean_s"] > 0 and r["latency_p95_s"] >= r["latency_mean_s"] * 0.5
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
    labels = ("Bicubic", "_200_", "_250_150_50_")  # braces and commas: not allowed in MLflow metric names
    assert set(metrics) == {f"test/samples/{m}/{k}" for m in labels for k in ("psnr", "ssim")}
    assert metrics["test/samples/_200_/psnr"] == pytest.approx(summary[1]["psnr"], rel=1e-6)
    # the same cells reach the trainer's loggers (here CSV; MLflow / W&B alike)
    logged = list(csv.DictReader((tmp_path / "out" / "csv" / "metrics.csv").open()))
    assert float(logged[-1]["test/samples/_250_150_50_/psnr"]) == pytest.approx(summary[2]["psnr"], rel=1e-6)
    # the console ends with the folder and its files, and warns that these weights are random
    messages = [r.getMessage() for r in caplog.records]
    wrote = next(m for m in messages if m.startswith("Wrote "))
    assert str(tmp_path / "out") in wrote and "metrics.md" in wrote and "per_image.csv" in wrote
    assert messages[-1] == CP.random_weights_warning(cfg)
    assert "random (untrained) noise predictor" in messages[-1] and "'tiny'" in messages[-1]
    assert "ckpt_path=logs/quickstart/runs/<time>/checkpoints/last.ckpt" in messages[-1]
    # unavailable metrics are reported with the file to fetch, and did not abort the run
    unavailable = results["unavailable"]
    assert {"lpips_vgg", "lpips_alex", "niqe", "pi", "clipiqa", "musiq"} <= set(unavailable)
    assert str(tmp_path / "no_weights" / "pyiqa" / "niqe_modelparameters.mat") in unavailable["niqe"]

    files = results["files"]
    out = tmp_path / "out"
    assert {p.name for p in files.values()} == {
        "metrics.md", "metrics.csv", "per_image.csv", "report.txt", "metadata.json", "fidelity_realism.png"
    }  # fmt: skip
    md = (out / "metrics.md").read_text()
    assert "| Benchmark | Method | Timesteps | PSNR↑ | SSIM↑ | s/img↓ | p95 s/img↓ | img/s↑ |" in md
    assert "| samples | {250,150,50} | 250,150,50 |" in md and "| samples | Bicubic | — |" in md
    report = (out / "report.txt").read_text()
    assert report.startswith("Protocol: invsr") and "unavailable: clipiqa" in report
    per_image = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(per_image) == 6 and {r["name"] for r in per_image} == {"astronaut", "chelsea"}
    assert [r["index"] for r in per_image[:2]] == ["0", "1"]
    for i, row in enumerate(summary):  # table = per-image mean (docs/evaluation.md)
        mean_psnr = sum(float(r["psnr"]) for r in per_image[2 * i : 2 * i + 2]) / 2
        assert mean_psnr == pytest.approx(row["psnr"], rel=1e-9)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["seed"] == 0 and meta["checkpoint"] is None and meta["protocol"] == "invsr"
    assert meta["backbone"] == "tiny" and "Backbone: tiny\n" in report and "- backbone: tiny" in md
    assert meta["world_size"] == 1 and meta["test_sets"] == ["samples"]
    # fallback plot axes offline: PSNR vs SSIM, a real PNG
    assert files["plot"].read_bytes()[:8] == PNG_SIGNATURE and files["plot"].stat().st_size > 5_000


def test_evaluate_osediff_protocol_and_images(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path, "protocol=osediff", "metrics=fidelity", "output.save_images=true", "output.plot=false",
        "data.test_datasets.samples.num_images=1", "model.bicubic=false",
    )  # fmt: skip
    _, objects = ev.evaluate(cfg)
    results = objects["model"].results
    assert results["protocol"].name == "osediff"
    assert [r["method"] for r in results["summary"]] == ["InvSR-1"]
    assert (tmp_path / "out" / "report.txt").read_text().startswith("Protocol: osediff")
    image = tmp_path / "out" / "images" / "samples" / "InvSR-1" / "astronaut.png"
    assert image.read_bytes()[:8] == PNG_SIGNATURE
    assert "plot" not in results["files"]
    assert results["unavailable"] == {}


def test_validation_psnr_equals_the_table_psnr(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Same weights, same images, same seed: InvSRLitModule's validation and evaluate's table agree exactly,
    for the 1-step SR and for the bicubic baseline."""
    from datamodules.samples import SamplePairs
    from datamodules.sr_datamodule import SRDataModule
    from invsr_pl.models.tiny import tiny_noise_predictor
    from invsr_pl.systems.invsr import InvSRLitModule

    cfg = make_cfg(tmp_path, "metrics=fidelity", "output.plot=false", "seed=7")
    images = {"names": None, "num_images": 2, "gt_size": 64, "scale": 4, "lq_mode": "bicubic", "seed": 0}
    backbone = instantiate(cfg.model.backbone)
    torch.manual_seed(0)
    noise_predictor = tiny_noise_predictor(scale=4)
    module = InvSRLitModule(
        backbone, noise_predictor, lpips=None, lpips_weight=0.0, seed=7, val_num_steps=[1], chopping_size=64,
        val_lpips=False,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    data = SRDataModule(val_dataset=SamplePairs(**images), num_workers=0, pin_memory=False)
    validation = trainer.validate(module, datamodule=data, verbose=False)[0]

    with open_dict(cfg):  # the same images as a test set, the same sampler settings and seed
        cfg.data.test_datasets = {"samples": {"_target_": "datamodules.samples.SamplePairs", **images}}
        cfg.sampler.chopping_size = 64
    model = instantiate(cfg.model, _convert_="all", noise_predictor=noise_predictor)
    assert model.noise_predictor is noise_predictor
    test_trainer = instantiate(cfg.trainer, callbacks=[], logger=False)
    test_trainer.test(model, datamodule=instantiate(cfg.data, _convert_="all"), verbose=False)
    table = {r["method"]: r for r in model.results["summary"]}

    for val_key, method in (("val/psnr_1step", "InvSR-1"), ("val/psnr_bicubic", "Bicubic")):
        logged, tabled = validation[val_key], table[method]["psnr"]
        with capsys.disabled():
            print(f"\n{val_key} = {logged!r}   table {method} PSNR = {tabled!r}")
        assert logged == tabled
    assert validation["val/ssim_1step"] == table["InvSR-1"]["ssim"]
    assert table["Bicubic"]["psnr"] != table["InvSR-1"]["psnr"]


def test_ckpt_path_loads_the_ema_weights(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "metrics=fidelity")
    reference = instantiate(cfg.model.noise_predictor)()
    ema = {k: v + 1 for k, v in reference.state_dict().items()}
    ckpt = {
        "state_dict": {f"noise_predictor.{k}": v for k, v in reference.state_dict().items()},
        "ema_noise_predictor": ema,
        "noise_predictor_config": dict(reference.config),
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    with open_dict(cfg):
        cfg.ckpt_path = str(tmp_path / "last.ckpt")
    model = instantiate(cfg.model, _convert_="all")
    loaded = model.noise_predictor.state_dict()
    assert model.weights_note.startswith("EMA") and all(torch.equal(loaded[k], ema[k]) for k in ema)


def test_fid_modes_follow_the_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paired sets: FID(SR, GT) in `mode`; LQ-only sets: against fid_reference_dir in `mode_no_reference`."""
    from invsr_pl.metrics.factory import Protocol

    calls = []
    monkeypatch.setattr(
        EM.M, "compute_fid", lambda scorer, sr, ref, mode: calls.append((str(ref), mode)) or 1.0
    )
    spec = {"label": "FID", "backend": "fid", "name": "fid", "higher_better": False, "full_reference": True}
    fid = Protocol(
        "invsr", "", {"fid": {**spec, "options": {"mode": "clean", "mode_no_reference": "legacy_pytorch"}}}
    ).specs["fid"]
    lq_only = [{"lq": torch.rand(3, 4, 4), "name": "a"}]
    paired = [{"lq": torch.rand(3, 4, 4), "gt": torch.rand(3, 16, 16), "name": "a"}]
    sr_dir, gt_dir = tmp_path / "sr", tmp_path / "_gt"
    unavailable: dict = {}
    assert EM.fid_score(None, fid, lq_only, sr_dir, gt_dir, None, "fid (realset80)", unavailable) is None
    assert "fid (realset80)" in unavailable
    EM.fid_score(None, fid, lq_only, sr_dir, gt_dir, "/hr", "fid (realset80)", {})
    EM.fid_score(None, fid, paired, sr_dir, gt_dir, None, "fid (samples)", {})
    assert calls == [("/hr", "legacy_pytorch"), (str(gt_dir), "clean")]
    assert (gt_dir / "a.png").is_file()  # synthesised GT written once


def test_table1_study_composes_to_the_paper_rows(tmp_path: Path) -> None:
    rows = EM.study_methods(make_cfg(tmp_path, "study=table1").study.rows)
    assert [r["timesteps"] for r in rows] == [
        [250, 200, 150, 100, 50], [250, 150, 50], [200, 100, 50], [150, 100, 50], [250], [200], [150], [100]
    ]  # fmt: skip
    assert rows[1]["label"] == "{250,150,50}"
    steps = EM.study_methods(make_cfg(tmp_path, "study=steps").study.rows)
    assert [r["label"] for r in steps] == [f"InvSR-{n}" for n in range(1, 6)]
    assert steps[4]["timesteps"] == [250, 200, 150, 100, 50]  # docs/conventions.md
    with pytest.raises(ValueError, match="unique"):
        EM.study_methods([{"num_steps": 1}, {"timesteps": [200]}])  # both are "InvSR-1"


def test_setup_errors_are_one_line(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "benchmark=[samples,realsr]")  # no RealSR folder under paths.data_dir
    with pytest.raises(ev.SetupError) as info:
        ev.evaluate(cfg)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "data" / "RealSR") in message, message


def test_images_a_metric_fails_on_are_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = EM.M.build_metric_set

    def ssim_fails(*args, **kwargs):
        metric_set = build(*args, **kwargs)
        metric_set.scorers["ssim"] = _Broken()
        return metric_set

    monkeypatch.setattr(EM.M, "build_metric_set", ssim_fails)
    cfg = make_cfg(tmp_path, "metrics=fidelity", "output.plot=false", "model.bicubic=false")
    _, objects = ev.evaluate(cfg)
    model = objects["model"]
    assert list(model.failures) == ["ssim (samples/InvSR-1)"]  # main() exits with code 1
    reason = model.failures["ssim (samples/InvSR-1)"]
    assert reason == "failed on 2 image(s): astronaut: RuntimeError: image too small"
    row = model.results["summary"][0]
    assert math.isnan(row["ssim"]) and row["psnr"] > 0  # left out of the mean; the other metric is there
    assert "unavailable: ssim (samples/InvSR-1): failed on 2" in (tmp_path / "out" / "report.txt").read_text()


class _Broken(torch.nn.Module):
    def forward(self, *images):
        raise RuntimeError("image too small")


@pytest.mark.parametrize(
    "swap",
    [
        ["protocol=osediff", "metrics=all", "study=table1"],
        ["model/backbone=sd_turbo", "model/noise_predictor=default", "logger=csv", "trainer=gpu"],
    ],
)
def test_config_keys_match_constructors(tmp_path: Path, swap: list[str]) -> None:
    """Every `_target_` mapping of the composed config only uses its constructor's keyword arguments."""
    import inspect

    import hydra.utils

    def check(node, where: str) -> None:
        if isinstance(node, dict):
            if "_target_" in node:
                params = inspect.signature(hydra.utils.get_object(node["_target_"])).parameters
                unknown = {k for k in node if not k.startswith("_")} - set(params)
                assert not unknown, f"{where}: {node['_target_']} does not take {sorted(unknown)}"
            for key, value in node.items():
                check(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                check(value, f"{where}[{i}]")

    benchmarks = "benchmark=[samples,imagenet_test,realsr,realset80]"
    cfg = OmegaConf.to_container(make_cfg(tmp_path, benchmarks, *swap), resolve=True)
    for group in ("data", "model", "trainer", "logger"):
        check(cfg.get(group), group)
    assert list(cfg["model"]["benchmarks"]) == list(cfg["data"]["test_datasets"])


def test_benchmarks_are_test_sets_of_the_data_module(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "benchmark=[samples,realset80]")
    assert list(cfg.data.test_datasets) == ["samples", "realset80"]
    assert cfg.model.benchmarks.realset80.fid_reference_dir is None
    assert cfg.data.test_datasets.realset80.gt_dir is None


@pytest.mark.slow  # two CPU processes (gloo) under torchrun, ~1 min on a shared 2-core CPU
def test_torchrun_two_ranks_gather_one_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
        str(ROOT / "evaluate.py"), *SMALL, "data.test_datasets.samples.num_images=3", "metrics=fidelity",
        "model.bicubic=false", "output.plot=false", "torch_threads=1", f"paths.root_dir={tmp_path}",
        f"hydra.run.dir={out}",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    per_image = list(csv.DictReader((out / "per_image.csv").open()))
    # rank 0 took images 0 and 2, rank 1 took 1 and the padding repeat of 0, which is not scored twice
    assert [r["index"] for r in per_image] == ["0", "1", "2"]
    table = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(table) == 1
    mean = sum(float(r["psnr"]) for r in per_image) / 3
    assert float(table[0]["PSNR↑"]) == pytest.approx(mean, rel=1e-9)  # reduced across both ranks
    assert json.loads((out / "metadata.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------------------------------------- provenance
def _recorded_checkpoint(tmp_path: Path, *train_overrides: str) -> Path:
    """A checkpoint file carrying the provenance train.py records for ``train_overrides``."""
    from invsr_pl.utils.provenance import PROVENANCE_KEY, training_provenance

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        train_cfg = compose("train", overrides=["paths.output_dir=/nonexistent", *train_overrides])
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, PROVENANCE_KEY: training_provenance(train_cfg)}, ckpt)
    return ckpt


def test_checkpoint_backbone_is_used_and_a_different_one_refused(tmp_path: Path) -> None:
    ckpt = _recorded_checkpoint(tmp_path, "experiment=quickstart", "scale=2")
    cfg = make_cfg(tmp_path, f"ckpt_path={ckpt}")
    CP.use_checkpoint_provenance(cfg)
    assert cfg.model.backbone._target_.endswith("load_tiny_trained_sd_turbo")  # not the default random tiny
    assert cfg.scale == 2 and cfg.data.test_datasets.samples.scale == 2  # the benchmark follows
    assert cfg.seed == 123456 and cfg.model.seed == 123456  # validation's SR seed
    assert cfg.sampler.chopping_size is None  # overridden on the command line (SMALL): the user's value stays

    cfg = make_cfg(tmp_path, f"ckpt_path={ckpt}", "model/backbone=tiny")
    with pytest.raises(ev.SetupError) as info:
        CP.use_checkpoint_provenance(cfg)
    message = str(info.value)
    assert "\n" not in message
    for part in (
        str(ckpt),
        "'tiny_trained'",
        "'tiny'",
        "model/backbone=tiny",
        "allow_backbone_mismatch=true",
    ):
        assert part in message, message
    assert "allow_backbone_mismatch" in cfg  # the key the message names exists in the config

    cfg = make_cfg(tmp_path, f"ckpt_path={ckpt}", "model/backbone=tiny", "allow_backbone_mismatch=true")
    CP.use_checkpoint_provenance(cfg)
    assert cfg.model.backbone._target_.endswith("build_tiny_sd_turbo")  # named on purpose: kept
    cfg = make_cfg(tmp_path, f"ckpt_path={ckpt}", "model/backbone=tiny_trained", "scale=4")
    CP.use_checkpoint_provenance(cfg)  # the same backbone named explicitly is fine
    assert cfg.scale == 4

    official = tmp_path / "noise_predictor_sd_turbo_v5.pth"
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, official)
    cfg = make_cfg(tmp_path, f"ckpt_path={official}")
    assert CP.use_checkpoint_provenance(cfg) is None  # official weights carry nothing: config unchanged
    assert cfg.model.backbone._target_.endswith("build_tiny_sd_turbo") and cfg.seed == 0


def _write_pairs(folder: Path, names: list[str], with_gt: bool) -> tuple[Path, Path]:
    from invsr_pl.utils.images import write_image

    gen = torch.Generator().manual_seed(0)
    for name in names:
        gt = torch.rand(3, 64, 64, generator=gen)
        if with_gt:
            write_image(folder / "gt" / f"{name}.png", gt)
        write_image(folder / "lq" / f"{name}.png", torch.nn.functional.avg_pool2d(gt[None], 4)[0])
    return folder / "lq", folder / "gt"


def test_folder_benchmark_is_named_and_lq_only_without_metrics_fails(tmp_path: Path) -> None:
    lq, gt = _write_pairs(tmp_path / "pairs", ["p1", "p2"], with_gt=True)
    common = ["metrics=fidelity", "output.plot=false", "model.bicubic=false"]
    cfg = make_cfg(
        tmp_path, "benchmark=[samples,folder]", f"folder.lq_dir={lq}", f"folder.gt_dir={gt}",
        "folder.name=my_pairs", "data.test_datasets.samples.num_images=1", *common,
    )  # fmt: skip
    metrics, objects = ev.evaluate(cfg)
    model = objects["model"]
    assert [r["benchmark"] for r in model.results["summary"]] == ["samples", "my_pairs"]
    assert model.results["summary"][1]["num_images"] == 2 and model.results["summary"][1]["psnr"] > 0
    assert "test/my_pairs/InvSR-1/psnr" in metrics and not model.failures
    assert "| my_pairs | InvSR-1 |" in (tmp_path / "out" / "metrics.md").read_text()

    lq_only, _ = _write_pairs(tmp_path / "lq_only", ["q1"], with_gt=False)
    cfg = make_cfg(
        tmp_path, "benchmark=[samples,folder]", f"folder.lq_dir={lq_only}", "folder.name=phone",
        "data.test_datasets.samples.num_images=1", *common,
    )  # fmt: skip
    _, objects = ev.evaluate(cfg)
    failures = objects["model"].failures
    assert list(failures) == ["phone"]  # main() exits 1; the scored set is still in the table
    assert (
        failures["phone"].startswith("no metric computed: it has no GT") and "psnr, ssim" in failures["phone"]
    )


@pytest.mark.slow  # the quick start (~30 s idle, 2 cores) and one evaluate.py run, both as a user types them
def test_quickstart_checkpoint_scores_its_final_validation(tmp_path: Path) -> None:
    """Issue 26's done-when: `evaluate.py ckpt_path=<last.ckpt>` with no model override scores the run's
    final val/psnr_1step on the quick start's validation photos (4 photos, 128-px GT, one batch of 4)."""
    logs = tmp_path / "logs"
    train = [sys.executable, "train.py", "experiment=quickstart", "logger=csv", f"paths.log_dir={logs}"]
    result = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (ckpt,) = logs.glob("quickstart/runs/*/checkpoints/last.ckpt")
    (history,) = logs.glob("quickstart/runs/*/csv/metrics.csv")
    final = [float(r["val/psnr_1step"]) for r in csv.DictReader(history.open()) if r.get("val/psnr_1step")][
        -1
    ]

    out = tmp_path / "eval"
    same_images = [
        "data.test_datasets.samples.num_images=4", "data.test_datasets.samples.gt_size=128",
        "data.test_batch_size=4",  # validation's batch: the SR noise is seeded per batch of names
    ]  # fmt: skip
    evaluate = [
        sys.executable, "evaluate.py", f"ckpt_path={ckpt}", *same_images, "metrics=fidelity",
        f"metrics.weights_dir={tmp_path / 'no_weights'}", f"hydra.run.dir={out}",
    ]  # fmt: skip
    result = subprocess.run(evaluate, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    table = {r["Method"]: r for r in csv.DictReader((out / "metrics.csv").open())}
    assert float(table["InvSR-1"]["PSNR↑"]) == pytest.approx(final, abs=1e-4), (table, final)
    console = result.stdout + result.stderr
    assert f"| samples | InvSR-1 | 200 | {final:.2f} |" in console  # the project's table, as in metrics.md
    assert "DataLoader 0" not in console and "Test metric" not in console  # not Lightning's dump
    assert f"Wrote {out}: metrics.md" in console
    assert "random (untrained)" not in console  # a trained checkpoint on its trained backbone
