"""Finding a prior's diffusers folder: a local folder, the local hub cache, or the hub (docs/backbones.md).

One lookup for every backbone, and one error that says what to download and where when the weights are
not there: the hub is often unreachable (clusters, this project's CI), so the local cache is tried first
and the hub only when it is not disabled.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from invsr_pl.utils.offline import hub_offline

__all__ = [
    "BackboneWeightsNotFound",
    "WeightsSpec",
    "fp16_variant",
    "load_part",
    "not_found",
    "resolve_folder",
]


class BackboneWeightsNotFound(FileNotFoundError):
    """A prior's weights are in neither the given folder nor the local hub cache; the hub is unreachable."""


class WeightsSpec:
    """What a prior's folder must hold, for the lookup and its error message.

    Args:
        name: the prior's name in messages (``"SD-Turbo"``).
        model_id: its hub id (``"stabilityai/sd-turbo"``).
        subfolders: the subfolders a local copy must have.
        layout: the files expected, written out for the error message.
        hub_patterns: ``allow_patterns`` of the hub download (only what the backbone loads).
        note: extra advice (e.g. a gated licence), appended to the error.
    """

    def __init__(
        self,
        name: str,
        model_id: str,
        subfolders: Sequence[str],
        layout: str,
        hub_patterns: Sequence[str],
        note: str = "",
    ) -> None:
        self.name, self.model_id, self.layout, self.note = name, model_id, layout, note
        self.subfolders, self.hub_patterns = tuple(subfolders), list(hub_patterns)


def not_found(
    spec: WeightsSpec, model: str, reason: str, config_key: str = "model.backbone.model"
) -> BackboneWeightsNotFound:
    """The one error for missing prior weights: what is missing, what to download, where to point."""
    local = "/path/to/" + spec.model_id.rsplit("/", 1)[-1]
    return BackboneWeightsNotFound(
        f"{spec.name} weights for {model!r} could not be loaded: {reason}. Download them once where the "
        f"Hugging Face hub is reachable (e.g. `hf download {spec.model_id} --local-dir {local}`), then point "
        f"the config at the folder: `{config_key}={local}`. The folder must have the diffusers layout: "
        f"{spec.layout}.{(' ' + spec.note) if spec.note else ''}"
    )


def resolve_folder(spec: WeightsSpec, model: str, revision: str | None, cache_dir: str | None) -> Path:
    """Local folder with the diffusers layout for ``model`` (a folder path or a hub id); never waits on the
    network when offline: the local cache is tried first, the hub only when it is not disabled.

    Raises:
        BackboneWeightsNotFound: not a complete folder, not cached, and the hub is offline or fails.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [sub for sub in spec.subfolders if not (path / sub).is_dir()]
        if missing:
            raise not_found(spec, model, f"the folder {path} lacks the subfolders {missing}")
        return path
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise not_found(spec, model, f"the folder {path} does not exist")

    from huggingface_hub import snapshot_download

    kwargs = {"revision": revision, "cache_dir": cache_dir, "allow_patterns": spec.hub_patterns}
    try:
        return Path(snapshot_download(model, local_files_only=True, **kwargs))
    except Exception as local_err:  # noqa: BLE001 - any cache miss falls through to the hub or a clear error
        if hub_offline():
            raise not_found(
                spec,
                model,
                "it is not an existing folder, not in the local Hugging Face cache, and the hub is offline "
                "(HF_HUB_OFFLINE=1)",
            ) from local_err
    try:
        return Path(snapshot_download(model, **kwargs))
    except Exception as err:  # noqa: BLE001 - network/auth errors of several libraries
        raise not_found(
            spec, model, f"download from the Hugging Face hub failed ({type(err).__name__}: {err})"
        ) from err


def fp16_variant(folder: str | Path, subfolder: str, dtype: torch.dtype) -> str | None:
    """``"fp16"`` when ``folder/subfolder`` holds diffusers' fp16 variant and it is the file to load (fp16
    weights, or the only copy there, e.g. what the hub patterns of a ``WeightsSpec`` fetch), else None."""
    files = {p.name for p in Path(folder, subfolder).glob("*.safetensors")}
    has_fp16 = any(".fp16." in name for name in files)
    has_plain = any(".fp16." not in name for name in files)
    return "fp16" if has_fp16 and (dtype == torch.float16 or not has_plain) else None


def load_part(
    model_cls: Any, folder: str | Path, subfolder: str, weights_dtype: torch.dtype, **kwargs: Any
) -> Any:
    """``model_cls.from_pretrained`` of one component of a prior's folder, choosing the fp16 variant by
    :func:`fp16_variant` for ``weights_dtype`` (the run's weight dtype); ``kwargs`` carry the library's
    dtype argument (diffusers ``torch_dtype``, transformers ``dtype``). Missing files raise ``OSError``."""
    variant = fp16_variant(folder, subfolder, weights_dtype)
    return model_cls.from_pretrained(str(folder), subfolder=subfolder, variant=variant, **kwargs)
