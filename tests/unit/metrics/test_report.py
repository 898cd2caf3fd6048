"""Evaluation helpers: SR seeds, DDP positions/merging, latency, pair checks, tables, plot (no Lightning)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from invsr_pl.metrics import report as E

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HEADERS = {"psnr": "PSNR↑", "lpips_vgg": "LPIPS-VGG↓", "clipiqa": "CLIPIQA↑"}


def summary_rows() -> list[dict]:
    return [
        {"benchmark": "samples", "method": "InvSR-1", "timesteps": [200], "num_images": 2, "psnr": 24.123,
         "lpips_vgg": 0.21234, "clipiqa": None,
         "latency_mean_s": 0.5, "latency_p95_s": 0.6, "images_per_s": 2.0},
        {"benchmark": "samples", "method": "InvSR-5", "timesteps": [250, 200, 150, 100, 50], "num_images": 2,
         "psnr": math.inf, "lpips_vgg": 0.3, "clipiqa": None, "latency_mean_s": 1.25, "latency_p95_s": 1.5,
         "images_per_s": 0.8},
    ]  # fmt: skip


def test_batch_positions_skip_the_distributed_sampler_padding() -> None:
    dataset = list(range(3))
    # Lightning's evaluation sampler under DDP: 3 images on 2 ranks -> rank 1 gets [1, 0], the 0 is padding
    loaders = [
        DataLoader(dataset, batch_size=1, sampler=DistributedSampler(dataset, 2, rank, shuffle=False))
        for rank in range(2)
    ]
    seen = [[E.batch_positions(loader, b, 1) for b in range(len(loader))] for loader in loaders]
    assert seen == [[([0], [True]), ([2], [True])], [([1], [True]), ([0], [False])]]
    batched = DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, 2, 1, shuffle=False))
    assert E.batch_positions(batched, 0, 2) == ([1, 0], [True, False])
    assert E.batch_positions(DataLoader(dataset, batch_size=2), 1, 1) == ([2], [True])  # one process


def test_merge_restores_order_and_refuses_overlap() -> None:
    per_rank = [
        [{"benchmark": "b", "method": "m", "order": 0, "index": i, "name": f"{i}"} for i in s]
        for s in ([0, 3, 6, 9], [1, 4, 7], [2, 5, 8])
    ]
    merged = E.merge_gathered(per_rank)
    assert [r["index"] for r in merged] == list(range(10))
    with pytest.raises(ValueError, match="overlap"):
        E.merge_gathered([per_rank[0], per_rank[0]])


def test_sr_generator_depends_on_seed_and_names_only() -> None:
    draw = lambda seed, names: torch.rand(3, generator=E.sr_generator(seed, names, "cpu"))  # noqa: E731
    assert torch.equal(draw(0, ["a"]), draw(0, ["a"]))
    assert not torch.equal(draw(0, ["a"]), draw(0, ["b"])) and not torch.equal(draw(0, ["a"]), draw(1, ["a"]))


def test_latency_summary() -> None:
    stats = E.latency_summary([1.0, 2.0, 3.0, 4.0])
    assert stats["latency_mean_s"] == pytest.approx(2.5)
    assert stats["latency_p95_s"] == pytest.approx(3.85)  # linear interpolation between 3 and 4
    assert stats["images_per_s"] == pytest.approx(0.4)
    assert all(math.isnan(v) for v in E.latency_summary([]).values())
    # two GPUs, each 2 images of 1 s: 4 images in 2 s of wall time
    assert E.latency_summary([1.0] * 4, wall_seconds=2.0)["images_per_s"] == pytest.approx(2.0)


def test_check_pair_names_the_files() -> None:
    E.check_pair("a.png", (1, 3, 8, 8), "a.png", (1, 3, 8, 8))
    with pytest.raises(ValueError, match="'a.png'.*'b.png'"):
        E.check_pair("a.png", (1, 3, 8, 8), "b.png", (1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"size mismatch for 'a.png'.*\(1, 3, 8, 6\)"):
        E.check_pair("a.png", (1, 3, 8, 8), "a.png", (1, 3, 8, 6))


def test_format_value() -> None:
    assert E.format_value("psnr", 24.126) == "24.13"
    assert E.format_value("ssim", 0.123456) == "0.1235"
    assert E.format_value("fid", 12.345) == "12.35"  # PSNR/FID 2 dp, others 4 dp (docs/evaluation.md)
    assert E.format_value("psnr", math.inf) == "inf"
    assert E.format_value("psnr", None) == "—"
    assert E.format_value("psnr", math.nan) == "nan"


def test_markdown_golden() -> None:
    expected = (
        "| Benchmark | Method | Timesteps | PSNR↑ | LPIPS-VGG↓ | CLIPIQA↑ | s/img↓ | p95 s/img↓ | img/s↑ |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| samples | InvSR-1 | 200 | 24.12 | 0.2123 | — | 0.5000 | 0.6000 | 2.0000 |\n"
        "| samples | InvSR-5 | 250,200,150,100,50 | inf | 0.3000 | — | 1.2500 | 1.5000 | 0.8000 |\n"
    )
    assert E.to_markdown(summary_rows(), HEADERS) == expected


def test_csv_round_trip() -> None:
    rows = list(csv.reader(io.StringIO(E.to_csv(summary_rows(), HEADERS))))
    assert rows[0][:6] == ["Benchmark", "Method", "Timesteps", "PSNR↑", "LPIPS-VGG↓", "CLIPIQA↑"]
    assert rows[1][:6] == ["samples", "InvSR-1", "200", "24.123", "0.21234", ""]
    assert rows[2][3] == "inf" and float(rows[2][3]) == math.inf


def test_per_image_csv_and_outputs(tmp_path: Path) -> None:
    per_image = [
        {"benchmark": "samples", "method": "InvSR-1", "timesteps": [200], "index": 0, "name": "astronaut",
         "seconds": 0.5, "psnr": 24.0, "lpips_vgg": None, "clipiqa": None},
        {"benchmark": "samples", "method": "Bicubic", "timesteps": None, "index": 0, "name": "astronaut",
         "seconds": 0.001, "psnr": 22.0, "lpips_vgg": None, "clipiqa": None},
    ]  # fmt: skip
    meta = {"protocol": "invsr", "checkpoint": "x.ckpt", "seed": 0}
    report = E.report_text(
        summary_rows(), HEADERS, "invsr", "official", {"clipiqa": "weights unavailable"}, None
    )
    assert (
        report.startswith("Protocol: invsr")
        and "unavailable: clipiqa" in report
        and "(random init)" in report
    )
    files = E.write_outputs(tmp_path, summary_rows(), per_image, HEADERS, report, meta)
    assert files["markdown"].read_text().startswith("- protocol: invsr\n- checkpoint: x.ckpt\n- seed: 0\n")
    lines = files["per_image"].read_text().splitlines()
    assert lines[0] == "benchmark,method,timesteps,index,name,seconds,psnr,lpips_vgg,clipiqa"
    assert lines[1] == "samples,InvSR-1,200,0,astronaut,0.5,24.0,,"
    assert lines[2] == "samples,Bicubic,,0,astronaut,0.001,22.0,,"  # the baseline has no timesteps
    assert json.loads(files["metadata"].read_text())["checkpoint"] == "x.ckpt"


def test_choose_plot_axes() -> None:
    assert E.choose_plot_axes(["psnr", "ssim", "clipiqa", "musiq"]) == ("psnr", "clipiqa")
    assert E.choose_plot_axes(["psnr", "ssim", "musiq"]) == ("psnr", "musiq")
    assert E.choose_plot_axes(["psnr", "ssim"]) == ("psnr", "ssim")  # offline fallback
    with pytest.raises(ValueError):
        E.choose_plot_axes(["clipiqa"])


def test_plot_is_a_real_png(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    rows = [
        {"benchmark": "samples", "method": label, "psnr": 20 + i, "ssim": 0.5 + 0.05 * i}
        for i, label in enumerate(["{250,200,150,100,50}", "{250,150,50}", "{200}"])
    ]
    rows.append({"benchmark": "samples", "method": "missing", "psnr": None, "ssim": 0.1})
    path = E.fidelity_realism_plot(
        rows, "psnr", "ssim", {"psnr": "PSNR↑", "ssim": "SSIM↑"}, tmp_path / "p.png"
    )
    assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5_000
    img = mpimg.imread(path)
    assert img.shape[:2] == (480, 640) and img.std() > 0.01  # not a blank canvas
