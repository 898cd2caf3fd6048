"""Image-quality metrics: protocols, the one metric factory, 8-bit scoring, and the torchmetrics adapter.

A *protocol* (``conf/protocol/*.yaml``) says exactly which implementation and settings each metric column
uses, because "LPIPS", "MANIQA" and "FID" mean different models across papers (docs/evaluation.md).
:func:`build_metric_set` is the one factory: it turns (protocol, column names) into scorers plus the reasons
any column is unavailable (weight files: :mod:`invsr_pl.metrics.weights`). Validation during training
(``InvSRLitModule``) and evaluation (``InvSREvaluation``) both score through it and :func:`score_images`,
so a validation number and a table number for the same weights and images are the same number.

Every per-image metric is wrapped in :class:`ImageQualityMetric`, a torchmetrics ``Metric`` with ``sum`` +
``count`` states, so one instance per (image set, method) reduces correctly across ranks. FID is a
folder-level score and is computed once per set by :func:`compute_fid`.

Colour: PSNR/SSIM on Y use pyiqa's BT.601 transform (``color_space: ycbcr``, MATLAB ``rgb2ycbcr``); no
other colour transform is applied on the metric path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from torchmetrics import Metric

from invsr_pl.metrics import weights as W
from invsr_pl.utils.images import quantize_8bit
from invsr_pl.utils.quiet import library_prints

#: Column order of the tables (the paper's Table order: fidelity first, then perceptual, then no-reference).
METRIC_ORDER = (
    "psnr",
    "ssim",
    "lpips_vgg",
    "lpips_alex",
    "dists",
    "niqe",
    "pi",
    "clipiqa",
    "musiq",
    "maniqa",
    "fid",
)

#: PSNR of an identical pair. pyiqa computes 10*log10(1 / (mse + 1e-8)), so mse = 0 gives exactly 80 dB; the
#: official script inherits this cap and we keep it, so identical pairs stay finite and are included in
#: means (docs/evaluation.md). Tests assert it.
PSNR_IDENTICAL_DB = 80.0

#: The protocol files (``conf/protocol/<name>.yaml``).
PROTOCOL_DIR = Path(__file__).resolve().parents[2] / "conf" / "protocol"
#: The protocol validation during training scores with (the paper's own, so curves match its tables).
VALIDATION_PROTOCOL = "invsr"


@dataclass(frozen=True)
class MetricSpec:
    """How one table column is computed.

    Args:
        key: column key (one of :data:`METRIC_ORDER`).
        label: column header, e.g. ``"LPIPS-VGG"``.
        backend: ``"pyiqa"`` (``pyiqa.create_metric(name, **options)``), ``"lpips"`` (the ``lpips`` package,
            ``LPIPS(net=name)`` on [-1, 1] inputs) or ``"fid"`` (pyiqa FID between two folders).
        name: pyiqa metric name or lpips network (``"vgg"`` / ``"alex"``).
        higher_better: direction shown as an arrow in the header.
        full_reference: needs the GT image (skipped on LQ-only benchmarks).
        options: extra keyword arguments (pyiqa ``create_metric`` kwargs; for FID ``mode`` and
            ``mode_no_reference``).
    """

    key: str
    label: str
    backend: str
    name: str
    higher_better: bool
    full_reference: bool
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in ("pyiqa", "lpips", "fid"):
            raise ValueError(f"metric {self.key!r}: unknown backend {self.backend!r} (pyiqa | lpips | fid)")

    @property
    def header(self) -> str:
        return f"{self.label}{'↑' if self.higher_better else '↓'}"


class Protocol:
    """A named set of metric implementations and settings (``conf/protocol/<name>.yaml``).

    Args:
        name: protocol name printed with every table (``"invsr"``, ``"osediff"``).
        description: one line saying whose scripts it reproduces.
        metrics: column key -> keyword arguments of :class:`MetricSpec` (without ``key``).
    """

    def __init__(self, name: str, description: str, metrics: Mapping[str, Mapping[str, Any]]) -> None:
        self.name = name
        self.description = description
        unknown = sorted(set(metrics) - set(METRIC_ORDER))
        if unknown:
            raise ValueError(f"protocol {name!r}: unknown metric keys {unknown}; known: {list(METRIC_ORDER)}")
        self.specs = {k: MetricSpec(key=k, **dict(metrics[k])) for k in METRIC_ORDER if k in metrics}

    def select(self, keys: Sequence[str]) -> tuple[dict[str, MetricSpec], dict[str, str]]:
        """Specs for ``keys`` in table order, plus ``{key: reason}`` for keys the protocol lacks."""
        bad = [k for k in keys if k not in METRIC_ORDER]
        if bad:
            raise ValueError(f"unknown metric names {bad}; choose from {list(METRIC_ORDER)}")
        chosen = {k: self.specs[k] for k in METRIC_ORDER if k in keys and k in self.specs}
        missing = {k: f"not part of protocol {self.name!r}" for k in keys if k not in self.specs}
        return chosen, missing

    def __repr__(self) -> str:
        return f"Protocol({self.name!r}: {', '.join(s.header for s in self.specs.values())})"


def load_protocol(name: str, directory: str | Path = PROTOCOL_DIR) -> Protocol:
    """The protocol ``<directory>/<name>.yaml`` (the file Hydra composes for ``protocol=<name>``)."""
    path = Path(directory) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(directory).glob("*.yaml"))
        raise FileNotFoundError(f"no protocol {name!r} ({path}); known: {known}")
    cfg = {k: v for k, v in yaml.safe_load(path.read_text()).items() if not k.startswith("_")}
    return Protocol(**cfg)


# ----------------------------------------------------------------------------------------------- scorers
class LpipsScorer(nn.Module):
    """The ``lpips`` package's LPIPS (v0.1 heads) as the official script uses it (docs/evaluation.md).

    ``forward(sr, gt)``: (B,3,H,W) float in [0,1] each -> (B,) float32 distances (lower is better).

    Args:
        net: ``"vgg"`` or ``"alex"``.
        random_trunk: random torchvision trunk instead of the ImageNet one (tests only: needs no download).
    """

    def __init__(self, net: str, random_trunk: bool = False) -> None:
        super().__init__()
        import lpips

        model = lpips.LPIPS(net=net, pnet_rand=random_trunk, verbose=False)
        self.model = model.eval().requires_grad_(False)

    def forward(self, sr: Tensor, gt: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        sr, gt = sr.to(device), gt.to(device)
        return self.model(sr * 2 - 1, gt * 2 - 1).flatten().float()  # lpips expects [-1, 1]


class PyiqaScorer(nn.Module):
    """A pyiqa metric: ``forward(sr, gt=None)`` with (B,3,H,W) float in [0,1] -> (B,) float32 scores."""

    def __init__(self, name: str, full_reference: bool, device: torch.device, **options: Any) -> None:
        super().__init__()
        import pyiqa

        self.full_reference = full_reference
        # frozen: it moves with its LightningModule, and DDP must not wait for gradients of a metric
        with library_prints():  # pyiqa prints "Loading pretrained model ..." per network (utils/quiet.py)
            self.model = pyiqa.create_metric(name, device=device, **options).requires_grad_(False)

    def forward(self, sr: Tensor, gt: Tensor | None = None) -> Tensor:
        out = self.model(sr, gt) if self.full_reference else self.model(sr)
        return out.reshape(sr.shape[0], -1).mean(dim=1).float()


def build_scorer(
    spec: MetricSpec,
    device: torch.device | str = "cpu",
    weights_dir: str | None = None,
    allow_download: bool = False,
) -> nn.Module:
    """Construct the model behind ``spec`` without ever downloading unless allowed.

    Raises:
        WeightsUnavailableError: a weight file is missing and downloads are off; the message says what to
            fetch and where to put it.
    """
    device = torch.device(device)
    root = W.weights_root(weights_dir)
    allowed = W.downloads_allowed(allow_download)
    if not allowed:
        missing = [f for f in W.required_weights(spec, root) if not f.exists()]
        if missing:
            raise W.WeightsUnavailableError("; ".join(f.instructions() for f in missing))
    guard = contextlib.nullcontext() if allowed else W.no_downloads()
    root_ctx = W.weights_root_override(root) if weights_dir else contextlib.nullcontext()
    with guard, root_ctx:
        if spec.backend == "lpips":
            return LpipsScorer(spec.name).to(device)
        if spec.backend == "fid":
            return PyiqaScorer("fid", full_reference=False, device=device)
        return PyiqaScorer(spec.name, spec.full_reference, device, **dict(spec.options))


def build_scorers(
    specs: Mapping[str, MetricSpec],
    device: torch.device | str = "cpu",
    weights_dir: str | None = None,
    allow_download: bool = False,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Build every scorer that can be built; the rest are returned as ``{key: reason}`` (never raised)."""
    scorers, unavailable = {}, {}
    for key, spec in specs.items():
        try:
            scorers[key] = build_scorer(spec, device, weights_dir, allow_download)
        except W.WeightsUnavailableError as err:
            unavailable[key] = f"weights unavailable: {err}"
        except Exception as err:  # a broken optional metric must not abort the run; say why instead
            unavailable[key] = f"construction failed: {type(err).__name__}: {err}"
    return scorers, unavailable


# ------------------------------------------------------------------------------------- torchmetrics adapter
class ImageQualityMetric(Metric):
    """Per-image mean of a scorer, as a torchmetrics ``Metric`` (sum + count states, summed across ranks).

    The official scripts report ``sum(per-image score) / N`` (docs/evaluation.md); this is the same.

    Args:
        scorer: module mapping ``(sr, gt)`` (full-reference) or ``(sr,)`` to (B,) scores.
        full_reference: whether ``update`` needs ``target``.
        higher_better: direction of the better score.
    """

    full_state_update = False

    def __init__(self, scorer: Callable[..., Tensor], full_reference: bool, higher_better: bool) -> None:
        super().__init__()
        self.scorer = scorer
        self.full_reference = full_reference
        self.higher_better = higher_better  # (torchmetrics makes `higher_is_better` a class constant)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.last_scores: Tensor | None = None

    @torch.no_grad()
    def update(self, preds: Tensor, target: Tensor | None = None) -> None:
        """Score a batch: ``preds``/``target`` (B,3,H,W) float in [0,1], same shape; keeps ``last_scores``."""
        if self.full_reference:
            if target is None:
                raise ValueError("full-reference metric needs target (GT) images")
            if preds.shape != target.shape:
                raise ValueError(f"SR shape {tuple(preds.shape)} != GT shape {tuple(target.shape)}")
            scores = self.scorer(preds, target)
        else:
            scores = self.scorer(preds)
        scores = scores.detach().to(torch.float64).reshape(-1)
        self.last_scores = scores.cpu()
        self.total += scores.sum().to(self.total.device)
        self.count += scores.numel()

    def compute(self) -> Tensor:
        """Mean over every image seen (on all ranks); NaN before any update."""
        if int(self.count) == 0:
            return torch.tensor(math.nan, dtype=torch.float64)
        return self.total / self.count


# ------------------------------------------------------------------------------------------ the one factory
@dataclass
class MetricSet:
    """The scorers of one protocol, built once and shared by every image set and method.

    Attributes:
        protocol: the protocol they come from.
        specs: available column key -> spec, in table order.
        scorers: available column key -> scorer module (on CPU until moved with its LightningModule).
        unavailable: requested column key -> reason it is not computed (not in the protocol, weights missing,
            construction failed).
    """

    protocol: Protocol
    specs: dict[str, MetricSpec]
    scorers: dict[str, nn.Module]
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        """Column key -> table header (``"PSNR↑"``) of every available column, FID included."""
        return {k: s.header for k, s in self.specs.items()}

    def metrics(self, paired: bool) -> nn.ModuleDict:
        """Fresh per-image metrics (one per column, FID excluded) for one image set and method; without GT
        (``paired=False``) the full-reference columns are left out."""
        return nn.ModuleDict(
            {
                key: ImageQualityMetric(self.scorers[key], spec.full_reference, spec.higher_better)
                for key, spec in self.specs.items()
                if spec.backend != "fid" and (paired or not spec.full_reference)
            }
        )


def build_metric_set(
    protocol: Protocol,
    names: Sequence[str],
    weights_dir: str | None = None,
    allow_download: bool = False,
) -> MetricSet:
    """The one metric factory: scorers for the columns ``names`` of ``protocol`` (table order).

    Never raises for a column it cannot build: the column goes to :attr:`MetricSet.unavailable` with the
    reason (for missing weights: the file to fetch and the folder to put it in).
    """
    specs, unavailable = protocol.select(list(names))
    scorers, missing = build_scorers(specs, "cpu", weights_dir, allow_download)
    unavailable.update(missing)
    return MetricSet(protocol, {k: s for k, s in specs.items() if k in scorers}, scorers, unavailable)


# ------------------------------------------------------------------------------------------ scoring
def score_images(
    metrics: Mapping[str, ImageQualityMetric], sr: Tensor, gt: Tensor | None
) -> tuple[dict[str, list[float | None]], dict[str, str]]:
    """Round ``sr`` to 8 bits and update every metric; the scoring path of validation *and* evaluation.

    Args:
        metrics: from :meth:`MetricSet.metrics`.
        sr: (B, 3, H, W) float in [0, 1], the method's output.
        gt: (B, 3, H, W) float in [0, 1] on the 8-bit grid (read from 8-bit files), or ``None`` (no GT).

    Returns:
        ``({key: [score per image]}, {key: error})``: a metric that raises (e.g. NIQE on an image too small)
        gets ``None`` scores and its error message, is left out of its mean, and the others still run.

    Raises:
        ValueError: ``sr`` and ``gt`` differ in shape (wrong scale or a mismatched pair).
    """
    if gt is not None and sr.shape != gt.shape:
        raise ValueError(f"SR shape {tuple(sr.shape)} != GT shape {tuple(gt.shape)} (wrong scale?)")
    sr = quantize_8bit(sr.float())
    scores: dict[str, list[float | None]] = {}
    errors: dict[str, str] = {}
    for key, metric in metrics.items():
        try:
            metric.update(sr, gt)
            scores[key] = metric.last_scores.tolist()
        except Exception as err:  # one broken metric must not stop the others; the error is reported
            scores[key], errors[key] = [None] * sr.shape[0], f"{type(err).__name__}: {err}"
    return scores, errors


def compute_fid(scorer: nn.Module, sr_dir: str | Path, ref_dir: str | Path, mode: str) -> float:
    """FID between the image folders ``sr_dir`` and ``ref_dir`` with pyiqa (clean-fid ``mode``:
    ``clean`` | ``legacy_pytorch`` | ``legacy_tensorflow``, docs/evaluation.md)."""
    model = scorer.model if isinstance(scorer, PyiqaScorer) else scorer
    return float(model(str(sr_dir), str(ref_dir), mode=mode, verbose=False))
