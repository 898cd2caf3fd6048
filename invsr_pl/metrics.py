"""Image-quality metrics for evaluation: protocol specs, offline weight checks and torchmetrics adapters.

A *protocol* (``conf/protocol/*.yaml``) says exactly which implementation and settings each metric column
uses, because "LPIPS", "MANIQA" and "FID" mean different models across papers (USERS_AND_PEERS §4.5). Every
per-image metric is wrapped in :class:`ImageQualityMetric`, a torchmetrics ``Metric`` with ``sum`` +
``count`` states, so one instance per benchmark reduces correctly across ranks (ARCHITECTURE C4 rule 8). FID
is a folder-level score and is computed once per benchmark by :func:`compute_fid`.

Weights: nothing is downloaded unless downloads are allowed (``allow_download=True`` and ``HF_HUB_OFFLINE``
unset). Before a pyiqa/lpips model is constructed, :func:`required_weights` lists the files it would fetch
(resolved the way pyiqa 0.1.16 does: ``pyiqa.utils.download_util.load_file_from_url`` saves
``basename(url)`` under ``DEFAULT_CACHE_DIR = torch.hub.get_dir()/pyiqa``; torchvision backbones go to
``torch.hub.get_dir()/checkpoints``; CLIP to ``torch.hub.get_dir()/clip``; timm backbones to the Hugging
Face cache). A missing file makes the metric *unavailable* with a message naming the file, its URL and the
folder to put it in; the other metrics still run. Construction additionally runs under :func:`no_downloads`,
which turns any download attempt pyiqa makes into an error, so an unlisted file can never be fetched
silently.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

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
#: official script inherits this cap (USERS_AND_PEERS §4.1) and we keep it, so identical pairs stay finite and
#: are included in means. Tests assert it.
PSNR_IDENTICAL_DB = 80.0


class WeightsUnavailableError(RuntimeError):
    """A metric needs a weight file that is not on disk and downloads are not allowed."""


@dataclass(frozen=True)
class WeightFile:
    """One file a metric needs: ``folder/filename``, fetched from ``url`` (or a Hugging Face repo)."""

    filename: str
    folder: str
    url: str
    hint: str = ""

    @property
    def path(self) -> Path:
        return Path(self.folder) / self.filename

    def exists(self) -> bool:
        return self.path.is_file()

    def instructions(self) -> str:
        return self.hint or f"fetch {self.url} and save it as {self.path}"


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


# ----------------------------------------------------------------------------------------------- weight files
def weights_root(weights_dir: str | None = None) -> Path:
    """Root pyiqa/torchvision/CLIP resolve weights under: ``weights_dir``, else ``torch.hub.get_dir()``."""
    return Path(weights_dir).expanduser() if weights_dir else Path(torch.hub.get_dir())


def downloads_allowed(allow_download: bool) -> bool:
    """True only when the config allows it *and* the environment is not offline (``HF_HUB_OFFLINE=1``)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return bool(allow_download) and not offline


def _pyiqa_file(root: Path, url: str) -> WeightFile:
    # pyiqa.utils.download_util.load_file_from_url: model_dir or DEFAULT_CACHE_DIR / basename(url path).
    return WeightFile(url.split("?")[0].rsplit("/", 1)[-1], str(root / "pyiqa"), url)


def _torchvision_file(root: Path, weights: Any) -> WeightFile:
    # torch.hub.load_state_dict_from_url saves to <hub dir>/checkpoints/<basename(url)>.
    return WeightFile(weights.url.rsplit("/", 1)[-1], str(root / "checkpoints"), weights.url)


def _hf_file(repo_id: str, filename: str) -> WeightFile:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    # Present: the snapshot folder holding it. Absent: the repo's folder in the hub cache (snapshot layout).
    folder = str(Path(cached).parent) if isinstance(cached, str) else f"{constants.HF_HUB_CACHE}/<{repo_id}>"
    hint = (
        f"fetch {filename} of the HF repo {repo_id} into {constants.HF_HUB_CACHE} (`hf download {repo_id}`)"
    )
    return WeightFile(filename, folder, f"https://huggingface.co/{repo_id}/resolve/main/{filename}", hint)


def required_weights(spec: MetricSpec, root: Path) -> list[WeightFile]:
    """Files constructing ``spec`` would load, resolved as pyiqa 0.1.16 / lpips 0.1.4 resolve them.

    Args:
        spec: the metric.
        root: :func:`weights_root`.

    Returns:
        The list of files (empty for PSNR/SSIM, which need none).
    """
    import torchvision.models as tvm

    vgg, alex = (
        _torchvision_file(root, tvm.VGG16_Weights.IMAGENET1K_V1),
        _torchvision_file(root, tvm.AlexNet_Weights.IMAGENET1K_V1),
    )
    if spec.backend == "lpips":
        # The lpips package ships its linear heads (lpips/weights/v0.1/*.pth); only the torchvision trunk
        # is fetched.
        return [{"vgg": vgg, "alex": alex}[spec.name]]
    if spec.backend == "fid":
        from pyiqa.archs import inception

        return [_pyiqa_file(root, inception.FID_WEIGHTS_URL)]
    name = spec.name
    if name in ("psnr", "psnry", "ssim", "ssimc"):
        return []
    if name in ("niqe", "pi"):
        from pyiqa.archs import niqe_arch, nrqm_arch

        files = [_pyiqa_file(root, niqe_arch.default_model_urls["url"])]
        return files + ([_pyiqa_file(root, nrqm_arch.default_model_urls["url"])] if name == "pi" else [])
    if name in ("lpips", "lpips-vgg"):
        from pyiqa.archs import lpips_arch

        net = "vgg" if name == "lpips-vgg" else "alex"
        return [
            _pyiqa_file(root, lpips_arch.default_model_urls[f"0.1_{net}"]),
            {"vgg": vgg, "alex": alex}[net],
        ]
    if name == "dists":
        from pyiqa.archs import dists_arch

        return [_pyiqa_file(root, dists_arch.default_model_urls["url"]), vgg]
    if name == "clipiqa":
        from pyiqa.archs import clip_model

        url = clip_model._MODELS["RN50"]  # CLIPIQA's default backbone; pyiqa saves CLIP under <hub dir>/clip
        return [WeightFile(url.rsplit("/", 1)[-1], str(root / "clip"), url)]
    if name == "musiq":
        from pyiqa.archs import musiq_arch

        return [_pyiqa_file(root, musiq_arch.default_model_urls[spec.options.get("pretrained", "koniq10k")])]
    if name.startswith("maniqa"):
        from pyiqa.archs import maniqa_arch

        dataset = {"maniqa": "koniq", "maniqa-pipal": "pipal", "maniqa-kadid": "kadid"}[name]
        # MANIQA builds timm's vit_base_patch8_224 with pretrained=True before loading its own checkpoint.
        vit = _hf_file("timm/vit_base_patch8_224.augreg2_in21k_ft_in1k", "model.safetensors")
        return [_pyiqa_file(root, maniqa_arch.default_model_urls[dataset]), vit]
    raise ValueError(f"no weight list for pyiqa metric {name!r}; add it to required_weights")


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """Turn every download path pyiqa/torchvision/CLIP/HF use into :class:`WeightsUnavailableError`."""
    import pyiqa.utils.download_util as du
    import torch.hub as hub
    from pyiqa.archs import clip_model

    def refuse(url: str, *args: Any, **kwargs: Any) -> None:
        raise WeightsUnavailableError(f"download of {url} refused (downloads are disabled)")

    saved = (du.download_url_to_file, hub.download_url_to_file, clip_model._download)
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    du.download_url_to_file = hub.download_url_to_file = clip_model._download = refuse
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        du.download_url_to_file, hub.download_url_to_file, clip_model._download = saved
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


@contextlib.contextmanager
def _weights_root_override(root: Path) -> Iterator[None]:
    """Point torch.hub and pyiqa at ``root`` while a metric is constructed (a configured weights folder)."""
    import pyiqa.utils.download_util as du

    saved_hub, saved_pyiqa = torch.hub.get_dir(), du.DEFAULT_CACHE_DIR
    torch.hub.set_dir(str(root))
    du.DEFAULT_CACHE_DIR = str(root / "pyiqa")  # read at call time by load_file_from_url
    try:
        yield
    finally:
        torch.hub.set_dir(saved_hub)
        du.DEFAULT_CACHE_DIR = saved_pyiqa


# ----------------------------------------------------------------------------------------------- scorers
class LpipsScorer(nn.Module):
    """The ``lpips`` package's LPIPS (v0.1 heads) as the official script uses it (USERS_AND_PEERS §4.1).

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
        self.model = pyiqa.create_metric(name, device=device, **options)

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
    root = weights_root(weights_dir)
    allowed = downloads_allowed(allow_download)
    if not allowed:
        missing = [f for f in required_weights(spec, root) if not f.exists()]
        if missing:
            raise WeightsUnavailableError("; ".join(f.instructions() for f in missing))
    guard = contextlib.nullcontext() if allowed else no_downloads()
    root_ctx = _weights_root_override(root) if weights_dir else contextlib.nullcontext()
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
        except WeightsUnavailableError as err:
            unavailable[key] = f"weights unavailable: {err}"
        except Exception as err:  # a broken optional metric must not abort the run; say why instead
            unavailable[key] = f"construction failed: {type(err).__name__}: {err}"
    return scorers, unavailable


# ------------------------------------------------------------------------------------- torchmetrics adapter
class ImageQualityMetric(Metric):
    """Per-image mean of a scorer, as a torchmetrics ``Metric`` (sum + count states, summed across ranks).

    The official scripts report ``sum(per-image score) / N`` (USERS_AND_PEERS §4.1, §4.2); this is the same.

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


def make_metrics(
    scorers: Mapping[str, nn.Module], specs: Mapping[str, MetricSpec], paired: bool
) -> dict[str, ImageQualityMetric]:
    """Fresh per-benchmark metric instances sharing the (heavy) scorers; FID and, when not ``paired``, the
    full-reference metrics are left out."""
    return {
        key: ImageQualityMetric(scorers[key], specs[key].full_reference, specs[key].higher_better)
        for key in scorers
        if specs[key].backend != "fid" and (paired or not specs[key].full_reference)
    }


def compute_fid(scorer: nn.Module, sr_dir: str | Path, ref_dir: str | Path, mode: str) -> float:
    """FID between the image folders ``sr_dir`` and ``ref_dir`` with pyiqa (clean-fid ``mode``:
    ``clean`` | ``legacy_pytorch`` | ``legacy_tensorflow``, USERS_AND_PEERS §4.1/§4.2)."""
    model = scorer.model if isinstance(scorer, PyiqaScorer) else scorer
    return float(model(str(sr_dir), str(ref_dir), mode=mode, verbose=False))
