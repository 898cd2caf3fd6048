"""Metric factory, scoring, adapters, protocols and offline weight handling (no Lightning, no Hydra)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from invsr_pl.metrics import factory as M
from invsr_pl.metrics import weights as W

CONF = Path(__file__).resolve().parents[3] / "conf" / "protocol"


def load_protocol(name: str) -> M.Protocol:
    cfg = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert cfg.pop("_target_") == "invsr_pl.metrics.factory.Protocol"
    return M.Protocol(**cfg)


def test_load_protocol_reads_the_hydra_file() -> None:
    assert repr(M.load_protocol("osediff")) == repr(load_protocol("osediff"))
    assert M.load_protocol(M.VALIDATION_PROTOCOL).name == "invsr"
    with pytest.raises(FileNotFoundError, match="known: \\['invsr', 'osediff'\\]"):
        M.load_protocol("nope")


@pytest.fixture(scope="module")
def invsr() -> M.Protocol:
    return load_protocol("invsr")


@pytest.fixture(scope="module")
def psnr(invsr: M.Protocol) -> torch.nn.Module:
    return M.build_scorer(invsr.specs["psnr"])


@pytest.fixture(scope="module")
def ssim(invsr: M.Protocol) -> torch.nn.Module:
    return M.build_scorer(invsr.specs["ssim"])


def y_channel(img: np.ndarray) -> np.ndarray:
    """BT.601 Y in [16, 235]/255 from RGB (3,H,W) in [0,1], written independently of pyiqa."""
    r, g, b = img
    return (65.481 * r + 128.553 * g + 24.966 * b + 16.0) / 255.0


@pytest.mark.parametrize("k", [1, 3, 10])
def test_psnr_uniform_offset_matches_closed_form(psnr: torch.nn.Module, k: int) -> None:
    gt = torch.full((1, 3, 32, 32), 0.5)
    sr = (
        gt + k / 255.0
    )  # every RGB channel +k/255 -> Y moves by (65.481+128.553+24.966)/255 * k/255 = 219k/255^2
    mse = (219 * k / 255**2) ** 2
    expected = 10 * math.log10(
        1 / (mse + 1e-8)
    )  # pyiqa adds eps = 1e-8 to the MSE (that is also the 80 dB cap)
    assert psnr(sr, gt).item() == pytest.approx(expected, abs=1e-3)


def test_psnr_random_pair_matches_numpy(psnr: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 24, 20, generator=g)
    sr = (gt + 0.05 * torch.randn(2, 3, 24, 20, generator=g)).clamp(0, 1)
    for i in range(2):
        mse = np.mean((y_channel(sr[i].double().numpy()) - y_channel(gt[i].double().numpy())) ** 2)
        assert psnr(sr[i : i + 1], gt[i : i + 1]).item() == pytest.approx(
            -10 * math.log10(mse + 1e-8), abs=1e-3
        )


def test_psnr_identical_pair_is_capped_and_finite(psnr: torch.nn.Module) -> None:
    gt = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    value = psnr(gt, gt.clone()).item()
    assert math.isfinite(value) and value == pytest.approx(M.PSNR_IDENTICAL_DB)


def test_ssim_matches_skimage_on_rounded_y(ssim: torch.nn.Module) -> None:
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(2)
    gt = torch.rand(1, 3, 48, 48, generator=g)
    sr = (gt + 0.1 * torch.randn(1, 3, 48, 48, generator=g)).clamp(0, 1)
    ys, yg = (np.round(y_channel(t[0].double().numpy()) * 255) for t in (sr, gt))
    ref = structural_similarity(
        ys, yg, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(sr, gt).item() == pytest.approx(ref, abs=2e-3)
    assert ssim(gt, gt).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # compute() before update() is tested on purpose
def test_metric_adapter_reduces_like_torchmetrics(psnr: torch.nn.Module) -> None:
    metric = M.ImageQualityMetric(psnr, full_reference=True, higher_better=True)
    assert math.isnan(metric.compute().item())
    gt = torch.full((3, 3, 16, 16), 0.5)
    offsets = torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1, 1) / 255
    metric.update(gt[:2] + offsets[:2], gt[:2])
    first = metric.last_scores.clone()
    metric.update(gt[2:] + offsets[2:], gt[2:])
    per_image = torch.cat([first, metric.last_scores])
    assert per_image.shape == (3,)
    assert metric.compute().item() == pytest.approx(per_image.mean().item())
    assert metric._reductions["total"] is not None and metric._reductions["count"] is not None
    assert int(metric.count) == 3
    metric.reset()
    assert int(metric.count) == 0 and math.isnan(metric.compute().item())


def test_metric_adapter_rejects_mismatch_and_missing_target(psnr: torch.nn.Module) -> None:
    metric = M.ImageQualityMetric(psnr, full_reference=True, higher_better=True)
    with pytest.raises(ValueError, match="SR shape"):
        metric.update(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 12))
    with pytest.raises(ValueError, match="needs target"):
        metric.update(torch.rand(1, 3, 16, 16))


def test_metric_syncs_in_a_gloo_group_of_one(psnr: torch.nn.Module, tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        metric = M.ImageQualityMetric(psnr, full_reference=True, higher_better=True)
        gt = torch.full((2, 3, 16, 16), 0.5)
        metric.update(gt + 1 / 255, gt)
        assert metric.compute().item() == pytest.approx(
            -10 * math.log10((219 / 255**2) ** 2 + 1e-8), abs=1e-3
        )
        gathered: list = [None]
        dist.all_gather_object(gathered, [{"index": 0}])
        assert gathered == [[{"index": 0}]]
    finally:
        dist.destroy_process_group()


def test_protocols_differ_where_they_should(invsr: M.Protocol) -> None:
    ose = load_protocol("osediff")
    assert invsr.name == "invsr" and ose.name == "osediff"
    # LPIPS: lpips package VGG+Alex (official) vs pyiqa Alex (OSEDiff family), docs/evaluation.md
    assert invsr.specs["lpips_vgg"].backend == "lpips" and invsr.specs["lpips_alex"].backend == "lpips"
    assert "lpips_vgg" not in ose.specs and ose.specs["lpips_alex"].backend == "pyiqa"
    # MANIQA: KonIQ vs PIPAL
    assert invsr.specs["maniqa"].name == "maniqa" and ose.specs["maniqa"].name == "maniqa-pipal"
    # FID: legacy_pytorch for the non-reference script vs clean everywhere
    assert invsr.specs["fid"].options["mode"] == "clean" == ose.specs["fid"].options["mode"]
    assert invsr.specs["fid"].options["mode_no_reference"] == "legacy_pytorch"
    assert ose.specs["fid"].options["mode_no_reference"] == "clean"
    # Same PSNR/SSIM settings: Y of YCbCr (not pyiqa's 'yiq' default), no border crop.
    for p in (invsr, ose):
        assert dict(p.specs["psnr"].options) == {"test_y_channel": True, "color_space": "ycbcr"}
    _, missing = ose.select(["psnr", "lpips_vgg"])
    assert "lpips_vgg" in missing
    assert invsr.specs["psnr"].header == "PSNR↑" and invsr.specs["lpips_vgg"].header == "LPIPS-VGG↓"


def test_unknown_names_are_errors(invsr: M.Protocol) -> None:
    with pytest.raises(ValueError, match="unknown metric names"):
        invsr.select(["psnr", "psnr_rgb"])
    with pytest.raises(ValueError, match="unknown metric keys"):
        M.Protocol("x", "", {"bogus": {}})


def test_missing_weights_are_reported_not_downloaded(
    invsr: M.Protocol, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    specs, _ = invsr.select(["psnr", "ssim", "lpips_vgg", "niqe", "musiq", "clipiqa", "fid"])
    scorers, unavailable = M.build_scorers(specs, weights_dir=str(tmp_path), allow_download=False)
    assert set(scorers) == {"psnr", "ssim"}
    assert set(unavailable) == {"lpips_vgg", "niqe", "musiq", "clipiqa", "fid"}
    assert str(tmp_path / "pyiqa" / "niqe_modelparameters.mat") in unavailable["niqe"]
    assert str(tmp_path / "checkpoints" / "vgg16-397923af.pth") in unavailable["lpips_vgg"]
    assert str(tmp_path / "clip" / "RN50.pt") in unavailable["clipiqa"]
    assert "https://" in unavailable["musiq"]
    assert not any(tmp_path.rglob("*.pth"))


def test_weight_check_finds_present_files(invsr: M.Protocol, tmp_path: Path) -> None:
    files = W.required_weights(invsr.specs["pi"], tmp_path)
    assert [f.filename for f in files] == ["niqe_modelparameters.mat", "NRQM_model.mat"]
    files[0].path.parent.mkdir(parents=True)
    files[0].path.write_bytes(b"x")
    assert files[0].exists() and not files[1].exists()
    assert W.required_weights(invsr.specs["psnr"], tmp_path) == []


def test_download_guard_blocks_pyiqa_downloads(tmp_path: Path) -> None:
    from pyiqa.utils.download_util import load_file_from_url

    with W.no_downloads(), pytest.raises(W.WeightsUnavailableError, match="refused"):
        load_file_from_url("https://example.invalid/w.pth", model_dir=str(tmp_path))
    assert not (tmp_path / "w.pth").exists()


def test_offline_env_overrides_allow_download(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not W.downloads_allowed(True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the one check reads it too
    assert W.downloads_allowed(True) and not W.downloads_allowed(False)


def test_metric_set_skips_reference_metrics_on_lq_only_sets(invsr: M.Protocol, psnr: torch.nn.Module) -> None:
    specs = {"psnr": invsr.specs["psnr"], "niqe": invsr.specs["niqe"], "fid": invsr.specs["fid"]}
    scorers = {"psnr": psnr, "niqe": lambda sr: sr.mean(dim=(1, 2, 3)), "fid": torch.nn.Identity()}
    metric_set = M.MetricSet(invsr, specs, scorers)
    assert set(metric_set.metrics(paired=True)) == {"psnr", "niqe"}  # FID is a folder score
    assert set(metric_set.metrics(paired=False)) == {"niqe"}
    assert metric_set.headers == {"psnr": "PSNR↑", "niqe": "NIQE↓", "fid": "FID↓"}


def test_build_metric_set_reports_what_it_cannot_build(invsr: M.Protocol, tmp_path: Path) -> None:
    metric_set = M.build_metric_set(load_protocol("osediff"), ["psnr", "lpips_vgg", "niqe"], str(tmp_path))
    assert list(metric_set.specs) == ["psnr"]
    assert metric_set.unavailable["lpips_vgg"] == "not part of protocol 'osediff'"
    assert metric_set.unavailable["niqe"].startswith("weights unavailable")
    assert not any(p.requires_grad for p in metric_set.scorers["psnr"].parameters())  # DDP ignores it


def test_quantize_8bit_rounds_to_the_png_grid() -> None:
    x = torch.tensor([-0.1, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 1.0, 1.2])
    q = M.quantize_8bit(x)
    assert torch.equal(q * 255, torch.tensor([0.0, 0.0, 0.0, 1.0, 128.0, 255.0, 255.0]))
    assert torch.equal(M.quantize_8bit(q), q)  # 8-bit inputs (GT from files) are unchanged


def test_score_images_rounds_then_scores(invsr: M.Protocol, psnr: torch.nn.Module) -> None:
    metrics = M.MetricSet(invsr, {"psnr": invsr.specs["psnr"]}, {"psnr": psnr}).metrics(paired=True)
    gt = torch.full((2, 3, 16, 16), 100 / 255)  # on the 8-bit grid, as GT read from files
    # +0.4/255 rounds away (identical after 8 bits: the 80 dB cap), +0.6/255 rounds to +1/255
    sr = gt + torch.tensor([0.4, 0.6]).view(2, 1, 1, 1) / 255
    scores, errors = M.score_images(metrics, sr, gt)
    assert errors == {}
    one_level = -10 * math.log10((219 / 255**2) ** 2 + 1e-8)
    assert scores["psnr"] == pytest.approx([M.PSNR_IDENTICAL_DB, one_level], abs=1e-3)
    assert metrics["psnr"].compute().item() == pytest.approx(sum(scores["psnr"]) / 2)
    with pytest.raises(ValueError, match="SR shape"):
        M.score_images(metrics, sr, gt[..., :8])


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_a_failing_metric_is_reported_not_fatal(invsr: M.Protocol, psnr: torch.nn.Module) -> None:
    def too_small(sr):
        raise RuntimeError("image too small")

    specs = {"psnr": invsr.specs["psnr"], "niqe": invsr.specs["niqe"]}
    metrics = M.MetricSet(invsr, specs, {"psnr": psnr, "niqe": too_small}).metrics(paired=True)
    gt = torch.rand(1, 3, 16, 16)
    scores, errors = M.score_images(metrics, gt, gt)
    assert scores["niqe"] == [None] and "image too small" in errors["niqe"]
    assert scores["psnr"][0] > 40 and "psnr" not in errors  # the others still ran
    assert int(metrics["niqe"].count) == 0 and math.isnan(metrics["niqe"].compute().item())


def test_lpips_scorer_rescales_and_returns_one_value_per_image() -> None:
    scorer = M.LpipsScorer("alex", random_trunk=True)  # random trunk: no torchvision download
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    same, diff = scorer(x, x.clone()), scorer(x, x.flip(0))
    assert same.shape == (2,) and same.dtype == torch.float32 and torch.allclose(same, torch.zeros(2))
    assert (diff > 0).all()


def test_pyiqa_no_reference_scorer_in_the_adapter() -> None:
    scorer = M.PyiqaScorer(
        "entropy", full_reference=False, device=torch.device("cpu")
    )  # weight-free NR metric
    metric = M.ImageQualityMetric(scorer, full_reference=False, higher_better=True)
    metric.update(torch.rand(3, 3, 16, 16))
    assert metric.last_scores.shape == (3,) and int(metric.count) == 3
    assert metric.compute().item() == pytest.approx(metric.last_scores.mean().item())
