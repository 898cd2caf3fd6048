"""Metric weight files: where pyiqa / lpips / torchvision / CLIP look for them, and a guard against downloads.

Nothing is downloaded unless downloads are allowed (``allow_download=True`` and ``HF_HUB_OFFLINE`` unset).
Before a metric model is constructed, :func:`required_weights` lists the files it would fetch, resolved the
way pyiqa 0.1.16 does: ``pyiqa.utils.download_util.load_file_from_url`` saves ``basename(url)`` under
``DEFAULT_CACHE_DIR = torch.hub.get_dir()/pyiqa``; torchvision backbones go to
``torch.hub.get_dir()/checkpoints``; CLIP to ``torch.hub.get_dir()/clip``; timm backbones to the Hugging Face
cache. A missing file makes the metric *unavailable* with a message naming the file, its URL and the folder to
put it in (docs/evaluation.md).
Construction additionally runs under :func:`no_downloads`, which turns any download attempt into an error, so
an unlisted file can never be fetched silently.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from invsr_pl.utils.offline import hub_offline


class MetricSpecLike(Protocol):
    """What :func:`required_weights` reads of a ``factory.MetricSpec`` (a protocol, not an import: factory
    imports this module, and the layers allow no cycle, not even under ``TYPE_CHECKING``)."""

    backend: str
    name: str
    options: dict[str, Any]


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


# ---------------------------------------------------------------------------------------------- locations
def weights_root(weights_dir: str | None = None) -> Path:
    """Root pyiqa/torchvision/CLIP resolve weights under: ``weights_dir``, else ``torch.hub.get_dir()``."""
    return Path(weights_dir).expanduser() if weights_dir else Path(torch.hub.get_dir())


def downloads_allowed(allow_download: bool) -> bool:
    """True only when the config allows it *and* the environment is not offline (``HF_HUB_OFFLINE=1``)."""
    return bool(allow_download) and not hub_offline()


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


def required_weights(spec: MetricSpecLike, root: Path) -> list[WeightFile]:
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
def weights_root_override(root: Path) -> Iterator[None]:
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
