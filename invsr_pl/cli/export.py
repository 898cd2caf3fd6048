"""``invsr-export CKPT OUT_DIR [--no-ema]``: the trained noise predictor out of a Lightning checkpoint.

Writes into OUT_DIR (each file atomically, permissions 0666 & ~umask, typically 0644):

- ``model.safetensors`` + ``config.json`` (``NoisePredictor.save_pretrained``; load with
  ``NoisePredictor.from_pretrained(OUT_DIR)``);
- ``noise_predictor.pth``: the official format, a plain ``{name: fp32 tensor}`` dict with ``encoder.`` keys
  (docs/checkpoints.md), loadable by ``NoisePredictor.from_official`` and the official inference script.

The checkpoint format and every reader live in :mod:`invsr_pl.utils.checkpoint`.
Exit codes: 0 written, 2 setup error (missing, unreadable or unsafe checkpoint, wrong contents, bad OUT_DIR).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from invsr_pl.models.noise_predictor import NoisePredictor
from invsr_pl.utils.atomic import atomic_path, atomic_write
from invsr_pl.utils.checkpoint import (
    CONFIG_KEY,
    WeightFileError,
    load_checkpoint,
    noise_predictor_state,
)

__all__ = ["OFFICIAL_NAME", "export_noise_predictor", "main"]

OFFICIAL_NAME = "noise_predictor.pth"


def export_noise_predictor(
    checkpoint_path: str | Path, out_dir: str | Path, use_ema: bool = True
) -> tuple[Path, Path]:
    """Export the (EMA) noise predictor of ``checkpoint_path`` into ``out_dir``.

    Returns:
        (folder written by ``save_pretrained``, path of the official-format ``.pth``).

    Raises:
        FileNotFoundError: no such checkpoint.
        WeightFileError: the checkpoint cannot be read safely.
        KeyError: the checkpoint lacks the EMA weights (without ``--no-ema``) or the noise-predictor config.
        RuntimeError: the weights do not match the recorded config (strict load).
    """
    checkpoint = load_checkpoint(checkpoint_path)
    if CONFIG_KEY not in checkpoint:
        raise KeyError(f"checkpoint has no {CONFIG_KEY!r}; it was not written by InvSRLitModule")
    model = NoisePredictor(**checkpoint[CONFIG_KEY])
    model.load_state_dict(noise_predictor_state(checkpoint, use_ema), strict=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # save_pretrained writes into a scratch folder beside out_dir; each file then lands atomically
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export.") as scratch:
        model.save_pretrained(scratch)
        for written in sorted(Path(scratch).iterdir()):
            with atomic_path(out_dir / written.name) as tmp:
                shutil.copyfile(written, tmp)
    official = out_dir / OFFICIAL_NAME
    with atomic_write(official) as f:
        # a plain dict of fp32 tensors, like the released noise_predictor_sd_turbo_v5.pth
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f)
    return out_dir, official


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="invsr-export",
        description="Export the (EMA) noise predictor of an InvSR training checkpoint as safetensors + "
        "config.json and as an official-format .pth. Exit codes: 0 written, 2 setup error.",
    )
    parser.add_argument("checkpoint", type=Path, help="Lightning checkpoint (.ckpt) written by train.py")
    parser.add_argument("out_dir", type=Path, help="output folder (created if missing)")
    parser.add_argument(
        "--no-ema", action="store_true", help="export the raw weights instead of the EMA ones"
    )
    args = parser.parse_args(argv)
    if args.out_dir.exists() and not args.out_dir.is_dir():
        print(f"invsr-export: error: {args.out_dir} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        folder, official = export_noise_predictor(args.checkpoint, args.out_dir, use_ema=not args.no_ema)
    except (FileNotFoundError, WeightFileError, KeyError, RuntimeError, ValueError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"invsr-export: error: {message}", file=sys.stderr)
        return 2
    kind = "raw" if args.no_ema else "EMA"
    print(
        f"wrote {kind} noise predictor: {folder}/diffusion_pytorch_model.safetensors, "
        f"{folder}/config.json, {official}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
