"""InvSREvaluation: scores a noise predictor on the data module's test sets, run by ``trainer.test``.

Lightning's test loop is the engine: it shards the images over ranks, shows progress and talks to loggers.
Each test set (``SRDataModule.test_datasets``, one per benchmark) is scored for every *method*: the bicubic
baseline and each study row (a timestep set). Metrics come from the one factory
(:func:`invsr_pl.metrics.factory.build_metric_set`) and are updated through
:func:`invsr_pl.metrics.factory.score_images`, exactly as validation during training does. Per-image rows
are gathered from every rank at epoch end; rank 0 writes ``metrics.md``, ``metrics.csv``, ``per_image.csv``,
``report.txt``, ``metadata.json`` and the fidelity-realism plot (docs/evaluation.md).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from invsr_pl.metrics import factory as M
from invsr_pl.metrics import report as E
from invsr_pl.models.loading import load_noise_predictor
from invsr_pl.models.timesteps import default_timesteps, validate_timesteps
from invsr_pl.sampling.color_fix import upsample_reference
from invsr_pl.sampling.sampler import InvSRSampler
from invsr_pl.utils.images import write_image

BICUBIC = "Bicubic"


def study_methods(study: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Study rows ``[{label?, timesteps? | num_steps?}]`` -> ``[{"label", "timesteps"}]`` (validated).

    A row without ``timesteps`` takes the preset schedule of ``num_steps`` (docs/conventions.md); a row
    without ``label`` is called ``InvSR-<number of steps>``.
    """
    out = []
    for row in study:
        steps = row.get("timesteps")
        steps = validate_timesteps(list(steps)) if steps else default_timesteps(int(row["num_steps"]))
        out.append({"label": row.get("label") or f"InvSR-{len(steps)}", "timesteps": steps})
    labels = [m["label"] for m in out]
    if len(set(labels)) != len(labels) or BICUBIC in labels:
        raise ValueError(f"study labels must be unique and not {BICUBIC!r}: {labels}")
    return out


class InvSREvaluation(L.LightningModule):
    """Evaluate InvSR on every test set of the data module; keys = ``model`` of conf/evaluate.yaml.

    Test batches: ``{"lq": (B,3,h,w), "gt": (B,3,s*h,s*w) (paired sets only), "name": list[str]}`` float32
    in [0, 1]. Results: :attr:`results` after ``trainer.test`` (every rank) and files in ``output_dir``.

    Args:
        backbone: frozen SD-Turbo (or the tiny one).
        noise_predictor: the architecture, built or as a factory (Hydra ``_partial_``), used for weight files
            without a config and when ``ckpt_path`` is ``None`` (random weights: smoke runs only).
        protocol: which implementation each metric column uses (``conf/protocol``).
        metric_names: the columns to compute; those the protocol lacks or whose weights are absent are
            reported as unavailable.
        study: the table rows (``conf/study``): ``[{label?, timesteps? | num_steps?}]``.
        ckpt_path: a ``train.py`` ``.ckpt``, a ``save_pretrained`` folder or an official weight file,
            loaded by :func:`invsr_pl.models.loading.load_noise_predictor`.
        use_ema: ``.ckpt`` only: the EMA weights (if present) instead of the module's.
        sampler: ``InvSRSampler`` keyword arguments (``chopping_size``, ``chopping_batch``, ``color_fix``).
        benchmarks: test-set name -> ``{color_fix, fid_reference_dir, name}``; a ``color_fix`` there wins over
            ``sampler.color_fix``; ``fid_reference_dir`` is the real-image folder FID uses on sets without GT;
            ``name`` is what the tables, image folders and logged keys call the set (default: its key).
        bicubic: add the bicubic upsampling of the LQ as a row of every set (scored the same way).
        seed: base of the per-image SR generator (:func:`invsr_pl.evaluation.sr_generator`).
        warmup: untimed SR calls per method on each rank's first batch (CUDA context, cuDNN autotune).
        weights_dir: folder holding the metric weights (``pyiqa/``, ``checkpoints/``, ``clip/``).
        allow_download: let metrics download missing weights (never when ``HF_HUB_OFFLINE`` is set).
        output_dir: where the tables, plot and images go (rank 0's value is used on every rank).
        save_images: also write the SR PNGs to ``<output_dir>/images/<set>/<method>/``.
        plot: write ``fidelity_realism.png``.
        backbone_name: what the tables call the backbone (``evaluate.py`` fills it in: ``tiny_trained``, a hub
            id, ...; invsr_pl/utils/provenance.py), so a table says which model it scored.
        compile: ``torch.compile`` the noise predictor, UNet and VAE for inference (in place, fixed shapes;
            :func:`invsr_pl.utils.compile.compile_for_inference`). Worth it for large benchmarks on a GPU.
    """

    def __init__(
        self,
        backbone: nn.Module,
        noise_predictor: nn.Module | Callable[[], nn.Module],
        protocol: M.Protocol,
        metric_names: Sequence[str],
        study: Sequence[Mapping[str, Any]],
        ckpt_path: str | None = None,
        use_ema: bool = True,
        sampler: Mapping[str, Any] | None = None,
        benchmarks: Mapping[str, Mapping[str, Any]] | None = None,
        bicubic: bool = True,
        seed: int = 0,
        warmup: int = 1,
        weights_dir: str | None = None,
        allow_download: bool = False,
        output_dir: str = "evaluation",
        save_images: bool = False,
        plot: bool = True,
        compile: bool = False,
        backbone_name: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone", "noise_predictor", "protocol"])
        self.backbone = backbone.requires_grad_(False).eval()
        self.noise_predictor, self.weights_note = _load_noise_predictor(noise_predictor, ckpt_path, use_ema)
        self.noise_predictor.requires_grad_(False).eval()
        self.protocol = protocol
        self.metric_set = M.build_metric_set(protocol, metric_names, weights_dir, allow_download)
        self.scorers = nn.ModuleDict(self.metric_set.scorers)  # registered: they move with the module
        self.methods = ([{"label": BICUBIC, "timesteps": None}] if bicubic else []) + study_methods(study)
        self.sampler_kwargs = dict(sampler or {})
        self.benchmarks = {k: dict(v or {}) for k, v in (benchmarks or {}).items()}
        self.test_metrics = nn.ModuleDict()  # set name -> method position -> column -> ImageQualityMetric
        self.output_dir = Path(output_dir)
        self.results: dict[str, Any] = {}
        # "<metric> (<set>/<method>)" -> images it failed on, "<set>" -> why nothing was scored (exit code 1)
        self.failures: dict[str, str] = {}
        self._rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        # Hydra's time-stamped run folder can differ by a second between ranks started by torchrun
        self.output_dir = Path(self.trainer.strategy.broadcast(str(self.hparams.output_dir), src=0))
        if self.hparams.compile:  # after the strategy has moved the networks to their device
            from invsr_pl.utils.compile import compile_for_inference, is_compiled

            if not is_compiled(self.noise_predictor):
                compile_for_inference(self.backbone, self.noise_predictor)

    def on_test_start(self) -> None:
        self._rows = []
        self.test_metrics = nn.ModuleDict()
        shown = [self._shown(n) for n in self._test_names()]
        if len(set(shown)) != len(shown):
            raise ValueError(f"two benchmarks have the same name: {shown}; give each its own name")
        for name, loader in zip(self._test_names(), _as_list(self.trainer.test_dataloaders), strict=True):
            paired = _has_gt(loader.dataset)
            per_method = {str(i): self.metric_set.metrics(paired) for i in range(len(self.methods))}
            self.test_metrics[name] = nn.ModuleDict(per_method).to(self.device)

    def _test_names(self) -> list[str]:
        names = getattr(self.trainer.datamodule, "test_names", None)
        return list(names) if names else [str(i) for i in range(len(_as_list(self.trainer.test_dataloaders)))]

    def _shown(self, name: str) -> str:
        """What the tables call test set ``name``: its benchmark's ``name`` if set, else the key."""
        return str(self.benchmarks.get(name, {}).get("name") or name)

    def _sampler(self, name: str) -> InvSRSampler:
        kwargs = dict(self.sampler_kwargs)
        if self.benchmarks.get(name, {}).get("color_fix"):
            kwargs["color_fix"] = self.benchmarks[name]["color_fix"]
        return InvSRSampler(self.backbone, self.noise_predictor, **kwargs)

    # ------------------------------------------------------------------ test loop
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        keep, indices = self._counted(dataloader_idx, batch_idx, len(batch["lq"]))
        if not any(keep):  # padding that Lightning's DistributedSampler repeats from another rank's share
            return
        lq, gt = batch["lq"][keep], batch["gt"][keep] if "gt" in batch else None
        names = [str(n) for n, k in zip(batch["name"], keep, strict=True) if k]
        bench = self._test_names()[dataloader_idx]
        sampler = self._sampler(bench)
        for position, method in enumerate(self.methods):
            if batch_idx == 0 and method["timesteps"] is not None:
                for _ in range(self.hparams.warmup):
                    sampler(lq, timesteps=method["timesteps"], generator=0)
            self._synchronize()
            start = time.perf_counter()
            sr = self._super_resolve(sampler, method["timesteps"], lq, names)  # (B, 3, s*h, s*w) [0, 1]
            self._synchronize()
            seconds = (time.perf_counter() - start) / len(lq)  # the method only: scoring is not timed
            if gt is not None:
                for name in names:
                    E.check_pair(f"{name}.png", sr.shape[1:], f"{name}.png", gt.shape[1:])
            scores, errors = M.score_images(self.test_metrics[bench][str(position)], sr, gt)
            image_dir = self._image_dir(bench, method["label"])
            for i, (index, name) in enumerate(zip(indices, names, strict=True)):
                if image_dir is not None:
                    write_image(image_dir / f"{name}.png", M.quantize_8bit(sr[i]).cpu())
                row = {"benchmark": self._shown(bench), "method": method["label"]}
                row |= {"timesteps": method["timesteps"]}
                row |= {"order": dataloader_idx * len(self.methods) + position, "index": index, "name": name}
                row |= {"rank": self.global_rank, "seconds": seconds, "errors": errors}
                self._rows.append(row | {k: v[i] for k, v in scores.items()})

    def _super_resolve(
        self, sampler: InvSRSampler, timesteps: list[int] | None, lq: Tensor, names: list[str]
    ) -> Tensor:
        """SR of ``lq`` (B,3,h,w) with ``timesteps``; ``None``: the bicubic baseline (the LQ bicubic-resized
        to the SR size, as the colour fix's reference)."""
        if timesteps is None:
            return upsample_reference(lq, (lq.shape[-2] * sampler.scale, lq.shape[-1] * sampler.scale))
        return sampler(
            lq, timesteps=timesteps, generator=E.sr_generator(self.hparams.seed, names, self.device)
        )

    def _counted(self, dataloader_idx: int, batch_idx: int, size: int) -> tuple[list[bool], list[int]]:
        """Which items of this batch count (not padding) and the dataset indices of those."""
        loader = _as_list(self.trainer.test_dataloaders)[dataloader_idx]
        indices, keep = E.batch_positions(loader, batch_idx, size)
        return keep, [i for i, k in zip(indices, keep, strict=True) if k]

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _image_dir(self, bench: str, label: str) -> Path | None:
        if not (self.hparams.save_images or "fid" in self.metric_set.specs):
            return None
        return self.output_dir / "images" / _safe(self._shown(bench)) / _safe(label)

    # ------------------------------------------------------------------ results
    def on_test_epoch_end(self) -> None:
        rows = E.merge_gathered(self._all_gather_objects(self._rows))
        self.failures = {}
        summary, logs, fid_missing = [], {}, {}
        world = self.trainer.world_size
        for bench_idx, bench in enumerate(self._test_names()):
            shown, scored = self._shown(bench), False
            for position, method in enumerate(self.methods):
                label = method["label"]
                metrics = self.test_metrics[bench][str(position)]
                # torchmetrics sums the states of every rank (each image counted once: padding is skipped)
                means: dict[str, float | None] = {k: float(m.compute()) for k, m in metrics.items()}
                mine = [r for r in rows if r["benchmark"] == shown and r["method"] == label]
                for key in metrics:  # images a metric failed on are left out of its mean, and reported
                    failed = [r for r in mine if r["errors"].get(key)]
                    if failed:
                        first = f"{failed[0]['name']}: {failed[0]['errors'][key]}"
                        self.failures[f"{key} ({shown}/{label})"] = (
                            f"failed on {len(failed)} image(s): {first}"
                        )
                if "fid" in self.metric_set.specs:
                    means["fid"] = (
                        self._fid(bench, bench_idx, label, fid_missing) if self.global_rank == 0 else None
                    )
                wall = max(sum(r["seconds"] for r in mine if r["rank"] == q) for q in range(world))
                stats = E.latency_summary([r["seconds"] for r in mine], wall_seconds=wall)
                base = {"benchmark": shown, "method": label, "timesteps": method["timesteps"]}
                summary.append(
                    base | {"num_images": len(mine)} | {k: means.get(k) for k in self.headers} | stats
                )
                logs |= {metric_key(shown, label, k): v for k, v in means.items() if v is not None}
                scored = scored or any(v is not None and v == v for v in means.values())  # NaN: not scored
            if not scored:
                self.failures[shown] = self._nothing_scored(bench_idx)
        # to every logger of the trainer (TensorBoard, CSV, MLflow, W&B): one scalar per set, row and metric
        self.log_dict(logs, rank_zero_only=True)
        self.results = self._write(summary, rows, self.metric_set.unavailable | self.failures | fid_missing)

    def _nothing_scored(self, bench_idx: int) -> str:
        """Why test set ``bench_idx`` has no metric value (it counts as a failure: exit code 1)."""
        paired = _has_gt(_as_list(self.trainer.test_dataloaders)[bench_idx].dataset)
        skipped = [k for k, s in self.metric_set.specs.items() if s.full_reference and not paired]
        reasons = []
        if skipped:
            reasons.append(f"it has no GT, so the full-reference metrics ({', '.join(skipped)}) do not apply")
        if self.metric_set.unavailable:
            reasons.append(f"{', '.join(self.metric_set.unavailable)} are unavailable (see 'unavailable:')")
        reason = "; ".join(reasons) or "no metric was selected"
        return f"no metric computed: {reason}; give it GT images or the weights of a no-reference metric"

    @property
    def headers(self) -> dict[str, str]:
        return self.metric_set.headers

    def _all_gather_objects(self, rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """Every rank's rows (``all_gather_object`` on the strategy's process group; Lightning has no object
        gather of its own)."""
        if self.trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return [rows]
        gathered: list[Any] = [None] * self.trainer.world_size
        dist.all_gather_object(gathered, rows)
        return gathered

    def _fid(self, bench: str, bench_idx: int, label: str, unavailable: dict[str, str]) -> float | None:
        dataset = _as_list(self.trainer.test_dataloaders)[bench_idx].dataset
        reference = self.benchmarks.get(bench, {}).get("fid_reference_dir")
        gt_dir = self.output_dir / "images" / _safe(self._shown(bench)) / "_gt"
        sr_dir, spec = self._image_dir(bench, label), self.metric_set.specs["fid"]
        key = f"fid ({bench})"
        return fid_score(self.scorers["fid"], spec, dataset, sr_dir, gt_dir, reference, key, unavailable)

    def _write(self, summary: list[dict], rows: list[dict], unavailable: dict[str, str]) -> dict[str, Any]:
        hp, protocol = self.hparams, self.protocol
        metadata = {
            "protocol": protocol.name, "protocol_description": protocol.description,
            "checkpoint": hp.ckpt_path, "backbone": hp.backbone_name, "weights": self.weights_note,
            "use_ema": hp.use_ema, "seed": hp.seed,
            "world_size": self.trainer.world_size, "device": str(self.device), "unavailable": unavailable,
            "methods": self.methods, "test_sets": self._test_names(),
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(), "torch": torch.__version__,
            "config": dict(hp),
        }  # fmt: skip
        report = E.report_text(
            summary,
            self.headers,
            protocol.name,
            protocol.description,
            unavailable,
            hp.ckpt_path,
            hp.backbone_name,
        )
        files: dict[str, Path] = {}
        if self.global_rank == 0:
            rank_zero_info(report)
            files = E.write_outputs(self.output_dir, summary, rows, self.headers, report, metadata)
            if hp.plot and summary:
                try:
                    x_key, y_key = E.choose_plot_axes(self.headers)
                except ValueError as err:  # e.g. metric_names=[psnr]: nothing to plot against
                    rank_zero_info(f"plot skipped: {err}")
                else:
                    path = self.output_dir / "fidelity_realism.png"
                    title = f"protocol {protocol.name}"
                    files["plot"] = E.fidelity_realism_plot(summary, x_key, y_key, self.headers, path, title)
        return {
            "summary": summary, "per_image": rows, "files": files, "unavailable": unavailable,
            "protocol": protocol, "headers": self.headers, "metadata": metadata,
        }  # fmt: skip


def fid_score(
    scorer: nn.Module,
    spec: M.MetricSpec,
    dataset: Any,
    sr_dir: Path,
    gt_dir: Path,
    reference_dir: str | None,
    key: str,
    unavailable: dict[str, str],
) -> float | None:
    """FID of one method's SR folder against the GT folder (protocol option ``mode``) or, for a set without
    GT, against ``reference_dir`` (``mode_no_reference``), as the official scripts do (docs/evaluation.md).

    A dataset without a ``gt_dir`` (synthesised GT, e.g. the built-in samples) has its GT written to
    ``gt_dir`` once. Without GT and without a reference folder, ``unavailable[key]`` says so and None is
    returned.
    """
    if _has_gt(dataset):
        if getattr(dataset, "gt_dir", None) is not None:
            gt_dir = Path(dataset.gt_dir)
        else:
            for i in range(len(dataset)):
                item = dataset[i]
                if not (gt_dir / f"{item['name']}.png").exists():
                    write_image(gt_dir / f"{item['name']}.png", item["gt"])
        return M.compute_fid(scorer, sr_dir, gt_dir, spec.options.get("mode", "clean"))
    if reference_dir:
        return M.compute_fid(scorer, sr_dir, reference_dir, spec.options.get("mode_no_reference", "clean"))
    unavailable[key] = "set without GT and without fid_reference_dir"
    return None


def _load_noise_predictor(
    noise_predictor: nn.Module | Callable[[], nn.Module], ckpt_path: str | None, use_ema: bool
) -> tuple[nn.Module, str]:
    """The noise predictor to evaluate, and a note saying which weights it holds."""
    default = noise_predictor if not isinstance(noise_predictor, nn.Module) else lambda: noise_predictor
    if ckpt_path is None:
        return default(), "random init (no ckpt_path)"
    return load_noise_predictor(str(ckpt_path), use_ema, default=default)


def metric_key(benchmark: str, method: str, metric: str) -> str:
    """``test/<set>/<method>/<metric>``, the logged key of one table cell. Characters that trackers refuse in
    metric names (MLflow: letters, digits, ``_-. /``; labels such as ``{250,150,50}`` have more) become
    ``_``."""
    return "/".join(["test", _safe(benchmark, "-_. "), _safe(method, "-_. "), metric])


def _safe(text: str, keep: str = "-_") -> str:
    return "".join(c if c.isalnum() or c in keep else "_" for c in str(text))


def _as_list(loaders: Any) -> list:
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def _has_gt(dataset: Any) -> bool:
    has_gt = getattr(dataset, "has_gt", None)
    return bool(has_gt) if has_gt is not None else len(dataset) > 0 and "gt" in dataset[0]
