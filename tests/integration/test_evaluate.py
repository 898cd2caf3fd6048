"""evaluate(cfg) end to end: built-in samples, tiny backbone, random tiny noise predictor, CPU.

Metric weights are looked up in an empty folder, so every weight-needing metric is reported unavailable and
PSNR/SSIM (weight-free) are computed: the run must still finish and say what to fetch.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from invsr_pl import evaluation as E

ROOT = Path(__file__).resolve().parents[2]


def _load_evaluate_module():
    spec = importlib.util.spec_from_file_location("evaluate_entry", ROOT / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ev = _load_evaluate_module()


def make_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    base = [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"metrics.weights_dir={tmp_path / 'no_weights'}",  # empty: weight-needing metrics are unavailable
        "benchmark.samples.dataset.num_images=2",
        "benchmark.samples.dataset.gt_size=64",  # LQ 16x16 -> SR 64x64
        "benchmark.samples.dataset.lq_mode=bicubic",
        "sampler.chopping_size=null",  # whole image in one pass (no padding up to 128)
        "warmup=0",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[*base, *overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.mark.slow  # ~20 s on a shared 2-core CPU
def test_evaluate_samples_tiny_study(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    with open_dict(cfg):  # a two-row study: one 1-step and one 3-step timestep set (Table-1 style labels)
        cfg.study.rows = [
            {"label": "{200}", "timesteps": [200]},
            {"label": "{250,150,50}", "timesteps": [250, 150, 50]},
        ]
    metrics, objects = ev.evaluate(cfg)

    summary = objects["summary"]
    assert [(r["benchmark"], r["method"]) for r in summary] == [
        ("samples", "{200}"),
        ("samples", "{250,150,50}"),
    ]
    assert summary[1]["timesteps"] == [250, 150, 50]
    assert list(objects["headers"]) == ["psnr", "ssim"]
    assert objects["headers"]["psnr"] == "PSNR↑"
    for r in summary:
        assert r["num_images"] == 2
        assert 0 < r["psnr"] <= 80 and -1 <= r["ssim"] <= 1
        assert r["latency_mean_s"] > 0 and r["latency_p95_s"] >= r["latency_mean_s"] * 0.5
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
    assert set(metrics) == {f"samples/{m}/{k}" for m in ("{200}", "{250,150,50}") for k in ("psnr", "ssim")}
    # unavailable metrics are reported with the file to fetch, and did not abort the run
    unavailable = objects["unavailable"]
    assert {"lpips_vgg", "lpips_alex", "niqe", "pi", "clipiqa", "musiq"} <= set(unavailable)
    assert str(tmp_path / "no_weights" / "pyiqa" / "niqe_modelparameters.mat") in unavailable["niqe"]

    files = objects["files"]
    out = tmp_path / "out"
    assert {p.name for p in files.values()} == {
        "metrics.md", "metrics.csv", "per_image.csv", "report.txt", "metadata.json", "fidelity_realism.png"
    }  # fmt: skip
    md = (out / "metrics.md").read_text()
    assert "| Benchmark | Method | Timesteps | PSNR↑ | SSIM↑ | s/img↓ | p95 s/img↓ | img/s↑ |" in md
    assert "| samples | {250,150,50} | 250,150,50 |" in md
    report = (out / "report.txt").read_text()
    assert report.startswith("Protocol: invsr") and "unavailable: clipiqa" in report
    per_image = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(per_image) == 4 and {r["name"] for r in per_image} == {"astronaut", "chelsea"}
    mean_psnr = sum(float(r["psnr"]) for r in per_image[:2]) / 2
    assert mean_psnr == pytest.approx(summary[0]["psnr"], rel=1e-6)  # table = per-image mean (§4.1)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["seed"] == 0 and meta["checkpoint"] is None and meta["protocol"] == "invsr"
    # fallback plot axes offline: PSNR vs SSIM, a real PNG
    assert E.choose_plot_axes(objects["headers"]) == ("psnr", "ssim")
    assert E.is_png(files["plot"]) and files["plot"].stat().st_size > 5_000


def test_evaluate_osediff_protocol_and_images(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path, "protocol=osediff", "metrics=fidelity", "output.save_images=true", "output.plot=false",
        "benchmark.samples.dataset.num_images=1",
    )  # fmt: skip
    _, objects = ev.evaluate(cfg)
    assert objects["protocol"].name == "osediff"
    assert (tmp_path / "out" / "report.txt").read_text().startswith("Protocol: osediff")
    assert (tmp_path / "out" / "images" / "samples" / "InvSR-1" / "astronaut.png").is_file()
    assert "plot" not in objects["files"]
    assert objects["unavailable"] == {}


def test_a_failing_metric_is_reported_not_fatal() -> None:
    from invsr_pl.metrics import ImageQualityMetric

    def broken(sr):
        raise RuntimeError("image too small")

    metrics = {"niqe": ImageQualityMetric(broken, full_reference=False, higher_better=False)}
    dataset = [{"lq": torch.rand(3, 8, 8), "name": "tiny"}]

    def sampler(lq, timesteps, generator):
        return torch.rand(1, 3, 32, 32)

    rows = ev.run_row(sampler, dataset, [0], {"timesteps": [200]}, metrics, torch.device("cpu"), 0, None, 0)
    assert rows[0]["niqe"] is None and "image too small" in rows[0]["errors"]["niqe"]


def test_size_mismatch_is_an_error_naming_the_file() -> None:
    dataset = [{"lq": torch.rand(3, 8, 8), "gt": torch.rand(3, 30, 32), "name": "bad_pair"}]

    def sampler(lq, timesteps, generator):
        return torch.rand(1, 3, 32, 32)

    with pytest.raises(ValueError, match="bad_pair.png"):
        ev.run_row(sampler, dataset, [0], {"timesteps": [200]}, {}, torch.device("cpu"), 0, None, 0)


def test_load_noise_predictor_sources(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    cfg = make_cfg(tmp_path)
    reference = instantiate(cfg.model.noise_predictor)
    ema = {k: v + 1 for k, v in reference.state_dict().items()}
    # exported folder (NoisePredictor.save_pretrained)
    reference.save_pretrained(tmp_path / "export")
    with open_dict(cfg):
        cfg.ckpt_path = str(tmp_path / "export")
    model, note = ev.load_noise_predictor(cfg)
    assert "exported folder" in note and _same(model.state_dict(), reference.state_dict())
    # Lightning checkpoint: EMA by default, module weights with use_ema=false
    ckpt = {
        "state_dict": {f"noise_predictor.{k}": v for k, v in reference.state_dict().items()}
        | {"discriminator.w": torch.zeros(1)},
        "ema_noise_predictor": ema,
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    with open_dict(cfg):
        cfg.ckpt_path = str(tmp_path / "last.ckpt")
    model, note = ev.load_noise_predictor(cfg)
    assert note.startswith("EMA") and _same(model.state_dict(), ema)
    with open_dict(cfg):
        cfg.use_ema = False
    model, note = ev.load_noise_predictor(cfg)
    assert note.startswith("module") and _same(model.state_dict(), reference.state_dict())
    # no EMA in the checkpoint: falls back to the module weights; the recorded ctor config wins over the YAML
    del ckpt["ema_noise_predictor"]
    ckpt["noise_predictor_config"] = dict(reference.config)
    torch.save(ckpt, tmp_path / "no_ema.ckpt")
    with open_dict(cfg):
        cfg.use_ema = True
        cfg.ckpt_path = str(tmp_path / "no_ema.ckpt")
        cfg.model.noise_predictor.temb_channels = 1  # would fail if used
    model, note = ev.load_noise_predictor(cfg)
    assert "no EMA" in note and _same(model.state_dict(), reference.state_dict())


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # two CPU processes (gloo) under torchrun, ~1 min on a shared 2-core CPU
def test_torchrun_two_ranks_gather_one_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
        str(ROOT / "evaluate.py"), "benchmark.samples.dataset.num_images=3",
        "benchmark.samples.dataset.gt_size=64", "benchmark.samples.dataset.lq_mode=bicubic",
        "sampler.chopping_size=null", "warmup=0", "metrics=fidelity",
        "output.plot=false", "device=cpu", f"paths.root_dir={tmp_path}", f"hydra.run.dir={out}",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    per_image = list(csv.DictReader((out / "per_image.csv").open()))
    assert [r["index"] for r in per_image] == ["0", "1", "2"]  # rank 0 took 0 and 2, rank 1 took 1
    table = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(table) == 1
    mean = sum(float(r["psnr"]) for r in per_image) / 3
    assert float(table[0]["PSNR↑"]) == pytest.approx(mean, rel=1e-6)  # reduced across both ranks
    assert json.loads((out / "metadata.json").read_text())["world_size"] == 2


def test_fid_modes_follow_the_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paired sets: FID(SR, GT) in `mode`; LQ-only sets: against fid_reference_dir in `mode_no_reference`."""
    from invsr_pl.metrics import Protocol

    calls = []
    monkeypatch.setattr(
        ev.M, "compute_fid", lambda scorer, sr, ref, mode: calls.append((str(ref), mode)) or 1.0
    )
    spec = {"label": "FID", "backend": "fid", "name": "fid", "higher_better": False, "full_reference": True}
    invsr = Protocol(
        "invsr", "", {"fid": {**spec, "options": {"mode": "clean", "mode_no_reference": "legacy_pytorch"}}}
    )
    lq_only = [{"lq": torch.rand(3, 4, 4), "name": "a"}]
    paired = [{"lq": torch.rand(3, 4, 4), "gt": torch.rand(3, 16, 16), "name": "a"}]
    unavailable: dict = {}
    fid_spec = invsr.specs["fid"]
    assert ev._fid(None, fid_spec, {}, lq_only, tmp_path / "sr", tmp_path, "realset80", unavailable) is None
    assert "realset80" in next(iter(unavailable))
    ev._fid(None, fid_spec, {"fid_reference_dir": "/hr"}, lq_only, tmp_path / "sr", tmp_path, "realset80", {})
    ev._fid(None, fid_spec, {}, paired, tmp_path / "sr", tmp_path, "samples", {})
    assert calls == [("/hr", "legacy_pytorch"), (str(tmp_path / "images" / "samples" / "_gt"), "clean")]
    assert (tmp_path / "images" / "samples" / "_gt" / "a.png").is_file()  # synthesised GT written once


def test_table1_study_composes_to_the_paper_rows(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "study=table1")
    rows = ev._study_rows(cfg)
    assert [r["timesteps"] for r in rows] == [
        [250, 200, 150, 100, 50], [250, 150, 50], [200, 100, 50], [150, 100, 50], [250], [200], [150], [100]
    ]  # fmt: skip
    assert rows[1]["label"] == "{250,150,50}"
    steps = ev._study_rows(make_cfg(tmp_path, "study=steps"))
    assert [r["label"] for r in steps] == [f"InvSR-{n}" for n in range(1, 6)]
    assert steps[4]["timesteps"] == [250, 200, 150, 100, 50]  # INVSR_REFERENCE §5.1
