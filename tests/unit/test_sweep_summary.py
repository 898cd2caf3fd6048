"""The sweep summary builder on a hand-made multirun folder (no training)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from invsr_pl import sweeps
from invsr_pl.cli import sweep_summary


def _job(
    sweep: Path,
    num: int,
    overrides: list[str],
    metric: str | None = "val/psnr_1step",
    record: dict | None = None,
) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": metric, "seed": 1}))
    if record is not None:
        (job / sweeps.JOB_RECORD).write_text(json.dumps(record))
    return job


def _csv_log(job: Path, rows: list[dict]) -> None:
    path = job / "csv" / "metrics.csv"
    path.parent.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _tensorboard_log(job: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(job / "tensorboard"))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Three jobs: CSV logs (PSNR 21.5), TensorBoard logs (PSNR 22.0, the best) and a failed job."""
    root = tmp_path / "multirun"
    j0 = _job(root, 0, ["experiment=smoke", "model.gan_weight=0"], record={"status": "completed"})
    _csv_log(
        j0,
        [
            {"step": 3, "epoch": 0, "train/loss": 0.9},
            {"step": 3, "epoch": 0, "val/psnr_1step": 20.0, "val/ssim_1step": 0.5},
            {"step": 7, "epoch": 0, "val/psnr_1step": 21.5, "val/ssim_1step": 0.6},
        ],
    )
    j1 = _job(root, 1, ["experiment=smoke", "model.gan_weight=0.1"])
    _tensorboard_log(
        j1,
        {"val/psnr_1step": [(3, 19.0), (7, 22.0)], "val/ssim_1step": [(7, 0.7)], "train/loss": [(7, 0.3)]},
    )
    _job(
        root,
        2,
        ["experiment=smoke", "model.gan_weight=1"],
        record={"status": "failed", "error": "RuntimeError: Stopping after 10 consecutive non-finite steps"},
    )
    return root


def test_rows_sorted_by_metric_failed_last(sweep: Path) -> None:
    summary = sweeps.build_summary(sweep)
    assert summary.metric == "val/psnr_1step"  # from the jobs' optimized_metric
    assert [r.job for r in summary.rows] == ["1", "0", "2"]
    assert [r.value("val/psnr_1step") for r in summary.rows] == [22.0, 21.5, None]
    assert summary.varying == ["model.gan_weight"]
    assert summary.common == ["experiment=smoke"]
    assert summary.other_metrics == ["val/ssim_1step"]  # training scalars are not validation metrics
    assert [r.status for r in summary.rows] == ["unknown", "completed", "failed"]
    assert [j.job for j in summary.missing] == ["2"]
    assert summary.best is summary.rows[0]


def test_mode_min_reverses_the_order(sweep: Path) -> None:
    summary = sweeps.build_summary(sweep, mode="minimize")
    assert summary.mode == "min"
    assert [r.job for r in summary.rows] == ["0", "1", "2"]


def test_written_files(sweep: Path) -> None:
    summary = sweeps.build_summary(sweep)
    paths = sweeps.write_summary(summary)
    assert [p.name for p in paths] == ["summary.csv", "summary.md", "summary.png"]
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["1", "0", "2"]
    assert [r["rank"] for r in rows] == ["1", "2", ""]
    assert [r["model.gan_weight"] for r in rows] == ["0.1", "0", "1"]
    assert [r["val/psnr_1step"] for r in rows] == ["22.0", "21.5", ""]
    assert [r["val/ssim_1step"] for r in rows] == ["0.699999988079071", "0.6", ""]  # TensorBoard stores fp32
    assert [r["run_dir"] for r in rows] == ["1", "0", "2"]
    assert rows[0]["overrides"] == "experiment=smoke model.gan_weight=0.1"
    md = (sweep / "summary.md").read_text()
    assert "Best: job 1 (`model.gan_weight=0.1`), val/psnr_1step = 22.0000" in md
    assert "| 1 | 1 | unknown | 0.1 | 22.0000 | 0.7000 | 1 |" in md
    assert "- job 2 (`2`): RuntimeError: Stopping after 10 consecutive non-finite steps" in md
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in sweep.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave nothing behind


def test_recorded_return_value_fills_a_missing_log(tmp_path: Path) -> None:
    root = tmp_path / "multirun"
    _job(root, 0, ["a=1"], record={"status": "completed", "return_value": 3.5})
    _job(root, 1, ["a=2"], record={"status": "completed", "return_value": 4.5})
    summary = sweeps.build_summary(root)
    assert [r.value("val/psnr_1step") for r in summary.rows] == [4.5, 3.5]


def test_metric_name_must_be_known(tmp_path: Path) -> None:
    root = tmp_path / "multirun"
    _job(root, 0, ["a=1"], metric="val/psnr_1step")
    _job(root, 1, ["a=2"], metric="val/lpips_1step")
    with pytest.raises(sweeps.SweepSummaryError, match="pass --metric"):
        sweeps.build_summary(root)
    assert sweeps.build_summary(root, metric="val/lpips_1step").metric == "val/lpips_1step"


def test_later_step_wins_across_loggers(tmp_path: Path) -> None:
    job = tmp_path / "run"
    _csv_log(job, [{"step": 9, "epoch": 0, "val/psnr_1step": 30.0}, {"step": 2, "epoch": 0, "val/x": 1.0}])
    _tensorboard_log(job, {"val/psnr_1step": [(5, 10.0)], "val/x": [(4, 2.0)]})
    assert sweeps.read_logged_metrics(job) == {"val/psnr_1step": 30.0, "val/x": 2.0}


def test_command_exit_codes(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert sweep_summary.main([str(sweep)]) == 1  # job 2 has no value: summary written, exit 1
    assert "1 of 3 jobs have no val/psnr_1step: 2" in capsys.readouterr().err
    assert (sweep / "summary.csv").is_file()
    out = tmp_path / "elsewhere"
    assert sweep_summary.main([str(sweep), "--metric", "val/ssim_1step", "--output", str(out)]) == 1
    assert next(csv.DictReader((out / "summary.csv").read_text().splitlines()))["job"] == "1"
    assert sweep_summary.main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sweep_summary.main([str(empty)]) == 2
    done = tmp_path / "done"
    for i in range(2):
        _job(done, i, [f"a={i}"], record={"status": "completed", "return_value": float(i)})
    assert sweep_summary.main([str(done)]) == 0


def _validated(root: Path, num: int, psnrs: list[float]) -> None:
    """A completed job whose CSV log holds one val/psnr_1step per validation, in step order."""
    job = _job(root, num, [f"model.lpips_weight={num}"], record={"status": "completed"})
    _csv_log(job, [{"step": 10 * (i + 1), "epoch": 0, "val/psnr_1step": v} for i, v in enumerate(psnrs)])


def test_lead_within_the_spread_of_repeated_validations(tmp_path: Path) -> None:
    """22.10 vs 22.05: a 0.05 lead, while each job's last 3 validations vary by ~0.1 (SD 0.1 each, 0.141
    for the difference of two): not separated. The stated threshold overrides the estimate."""
    root = tmp_path / "multirun"
    _validated(root, 0, [20.0, 22.15, 21.95, 22.05])  # SD of the last 3: 0.1
    _validated(root, 1, [21.0, 22.0, 22.2, 22.1])  # SD 0.1
    summary = sweeps.build_summary(root)
    lead = summary.lead()
    assert (lead.best.job, lead.runner_up.job, lead.source) == ("1", "0", "repeated")
    assert lead.margin == pytest.approx(0.05) and lead.noise == pytest.approx(0.1 * 2**0.5)
    assert lead.within_noise
    md = sweeps.summary_markdown(summary)
    assert "Its lead over job 0 is 0.0500, within the validation noise 0.1414" in md
    assert "the sweep does not separate jobs 1 and 0" in md

    stated = sweeps.build_summary(root, noise=0.01)
    assert stated.lead().source == "stated" and not stated.lead().within_noise
    assert "Its lead over job 0 is 0.0500, above the stated validation noise 0.0100." in (
        sweeps.summary_markdown(stated)
    )
    with pytest.raises(sweeps.SweepSummaryError, match="noise must be"):
        sweeps.build_summary(root, noise=-1.0)


def test_clear_lead_and_unknown_noise(tmp_path: Path) -> None:
    root = tmp_path / "multirun"
    _validated(root, 0, [21.0, 21.02, 21.01])
    _validated(root, 1, [22.0, 22.02, 22.01])
    md = sweeps.summary_markdown(sweeps.build_summary(root))
    assert "Its lead over job 0 is 1.0000, above the validation noise 0.0141" in md
    once = tmp_path / "once"  # one validation per job: no spread to compare with
    _validated(once, 0, [21.0])
    _validated(once, 1, [21.1])
    summary = sweeps.build_summary(once)
    assert summary.lead().noise is None and summary.lead().within_noise is None
    assert "the validation noise is unknown" in sweeps.summary_markdown(summary)
    assert sweep_summary.main([str(once), "--noise", "0.2"]) == 0
    assert "within the stated validation noise 0.2000" in (once / "summary.md").read_text()
