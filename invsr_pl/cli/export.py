"""``invsr-export CKPT OUT_DIR [--no-ema] [--base-model NAME] [--with-backbone]``: a pipeline folder.

Writes into OUT_DIR (each file atomically, permissions 0666 & ~umask, typically 0644; docs/checkpoints.md):

- ``noise_predictor/config.json`` + ``noise_predictor/diffusion_pytorch_model.safetensors``
  (``NoisePredictor.save_pretrained``; read back with ``NoisePredictor.from_pretrained(OUT_DIR,
  subfolder="noise_predictor")``);
- ``model_index.json``: an :class:`~invsr_pl.pipelines.InvSRPipeline` folder that names its backbone
  (``base_model``, ``base_revision``) instead of holding it, so ``InvSRPipeline.from_pretrained(OUT_DIR)``
  loads the backbone (SD-Turbo, SDXL-Turbo, SD3.5 Large Turbo or a tiny twin; ``base_family`` names which)
  from the hub or its folder; ``--with-backbone`` copies the backbone in as well;
- ``noise_predictor.pth``: the official format, a plain ``{name: fp32 tensor}`` dict with ``encoder.`` keys,
  loadable by ``NoisePredictor.from_official`` and the official inference script;
- ``invsr_provenance.json``: the checkpoint's ``invsr_provenance`` record, unchanged, when it has one.

The backbone named is the one the checkpoint records (its provenance), else ``--base-model`` (default
``stabilityai/sd-turbo``); naming another one than recorded is a setup error.
Exit codes: 0 written, 2 setup error (missing, unreadable or unsafe checkpoint, wrong contents, bad OUT_DIR,
a backbone other than the recorded one, a backbone that cannot be loaded for ``--with-backbone``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from invsr_pl.models.backbones import family_of
from invsr_pl.models.builtin import BUILTIN_BACKBONES
from invsr_pl.models.noise_predictor import NoisePredictor
from invsr_pl.models.sd_turbo import DEFAULT_MODEL_ID, POSITIVE_PROMPT
from invsr_pl.pipelines import InvSRPipeline, model_index
from invsr_pl.utils.atomic import atomic_path, atomic_write
from invsr_pl.utils.checkpoint import CONFIG_KEY, WeightFileError, load_checkpoint, noise_predictor_state
from invsr_pl.utils.provenance import EXPORT_FILE, PROVENANCE_KEY, BackboneMismatchError, check_backbone

__all__ = ["NOISE_PREDICTOR_FOLDER", "OFFICIAL_NAME", "export_pipeline", "main"]

OFFICIAL_NAME = "noise_predictor.pth"
NOISE_PREDICTOR_FOLDER = "noise_predictor"


def _copy_tree_atomically(scratch: Path, out_dir: Path) -> None:
    """Every file under ``scratch`` to the same place under ``out_dir``, each appearing atomically."""
    for written in sorted(p for p in scratch.rglob("*") if p.is_file()):
        target = out_dir / written.relative_to(scratch)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(written, tmp)


def _base(provenance: dict[str, Any] | None, base_model: str | None, path: Path) -> tuple[str, str | None]:
    """(backbone name, revision) the export names: the recorded one, else ``base_model`` or SD-Turbo."""
    if provenance is None:
        return base_model or DEFAULT_MODEL_ID, None
    if base_model is not None:
        check_backbone(
            provenance, base_model, weights=path, requested_as=f"--base-model {base_model}", accept_hint=""
        )
    recorded = provenance["backbone"]
    return str(recorded.get("name")), recorded.get("revision")


def export_pipeline(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    use_ema: bool = True,
    base_model: str | None = None,
    with_backbone: bool = False,
) -> dict[str, Path]:
    """Export the (EMA) noise predictor of ``checkpoint_path`` into ``out_dir`` as a pipeline folder.

    Returns:
        ``{"folder", "noise_predictor", "official", "provenance" (if recorded)}`` paths written.

    Raises:
        FileNotFoundError: no such checkpoint.
        WeightFileError: the checkpoint cannot be read safely.
        KeyError: the checkpoint lacks the EMA weights (without ``--no-ema``) or the noise-predictor config.
        RuntimeError: the weights do not match the recorded config (strict load).
        BackboneMismatchError: ``base_model`` is not the backbone the checkpoint records.
    """
    checkpoint_path, out_dir = Path(checkpoint_path), Path(out_dir)
    checkpoint = load_checkpoint(checkpoint_path)
    if CONFIG_KEY not in checkpoint:
        raise KeyError(f"checkpoint has no {CONFIG_KEY!r}; it was not written by InvSRLitModule")
    model = NoisePredictor(**checkpoint[CONFIG_KEY])
    model.load_state_dict(noise_predictor_state(checkpoint, use_ema), strict=True)
    provenance = checkpoint.get(PROVENANCE_KEY)
    base, revision = _base(provenance, base_model, checkpoint_path)
    prompt = (provenance or {}).get("prompt") or POSITIVE_PROMPT
    recorded = (provenance or {}).get("backbone") or {}
    # the family the checkpoint's model/backbone option names (a folder's name says nothing), else the name's
    family = family_of(base, recorded.get("choice"))
    config = recorded.get("config") if isinstance(recorded.get("config"), dict) else None
    out_dir.mkdir(parents=True, exist_ok=True)
    # everything is written into a scratch folder beside out_dir first; each file then lands atomically
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export.") as scratch_name:
        scratch = Path(scratch_name)
        if with_backbone:
            pipe = InvSRPipeline.from_backbone_name(
                base,
                noise_predictor=model,
                revision=revision,
                prompt=prompt,
                family=None if base in BUILTIN_BACKBONES else family,
                recorded=config,  # a tiny twin rebuilt exactly as trained
            )
            pipe.save_pretrained(scratch)
        else:
            model.save_pretrained(scratch / NOISE_PREDICTOR_FOLDER)
            index = model_index(base, revision, prompt, family=family)
            (scratch / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if provenance is not None:  # as recorded, for evaluate.py / invsr-sr / the demo to read back
            (scratch / EXPORT_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _copy_tree_atomically(scratch, out_dir)
    official = out_dir / OFFICIAL_NAME
    with atomic_write(official) as f:
        # a plain dict of fp32 tensors, like the released noise_predictor_sd_turbo_v5.pth
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f)
    written = {"folder": out_dir, "noise_predictor": out_dir / NOISE_PREDICTOR_FOLDER, "official": official}
    if provenance is not None:
        written["provenance"] = out_dir / EXPORT_FILE
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="invsr-export",
        description="Export the (EMA) noise predictor of an InvSR training checkpoint as a diffusers "
        "pipeline folder (noise_predictor/ + model_index.json naming the backbone) and as an "
        "official-format .pth. "
        "Exit codes: 0 written, 2 setup error.",
    )
    parser.add_argument("checkpoint", type=Path, help="Lightning checkpoint (.ckpt) written by train.py")
    parser.add_argument("out_dir", type=Path, help="output folder (created if missing)")
    parser.add_argument(
        "--no-ema", action="store_true", help="export the raw weights instead of the EMA ones"
    )
    parser.add_argument(
        "--base-model",
        default=None,
        help=f"backbone the folder names (hub id, folder, or {', '.join(BUILTIN_BACKBONES)}); default: the "
        f"one the checkpoint records, else {DEFAULT_MODEL_ID}",
    )
    parser.add_argument(
        "--with-backbone",
        action="store_true",
        help="also copy the backbone (VAE, UNet or transformer, scheduler, text encoder or the fixed prompt "
        "embedding) into the folder (SD-Turbo: 2 GB)",
    )
    args = parser.parse_args(argv)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        print(f"invsr-export: error: {args.out_dir} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        written = export_pipeline(
            args.checkpoint,
            args.out_dir,
            use_ema=not args.no_ema,
            base_model=args.base_model,
            with_backbone=args.with_backbone,
        )
    except (
        FileNotFoundError,
        WeightFileError,
        KeyError,
        RuntimeError,
        ValueError,
        OSError,
        BackboneMismatchError,
    ) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(
            f"invsr-export: error: {message.splitlines()[0] if message else type(err).__name__}",
            file=sys.stderr,
        )
        return 2
    kind = "raw" if args.no_ema else "EMA"
    extra = f", {written['provenance']}" if "provenance" in written else ""
    print(
        f"wrote {kind} noise predictor as a pipeline folder {written['folder']} "
        f"({written['noise_predictor']}/, model_index.json{extra}) and {written['official']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
