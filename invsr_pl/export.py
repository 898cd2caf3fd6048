"""``invsr-export CKPT OUT_DIR [--no-ema]``: the trained noise predictor out of a Lightning checkpoint.

Writes into OUT_DIR:

- ``model.safetensors`` + ``config.json`` (``NoisePredictor.save_pretrained``; load with
  ``NoisePredictor.from_pretrained(OUT_DIR)``);
- ``noise_predictor.pth``: the official format, a plain ``{name: fp32 tensor}`` dict with ``encoder.`` keys
  (INVSR_REFERENCE §7.3/§7.4), loadable by ``NoisePredictor.from_official`` and the official inference script.

Checkpoint layout read here (written by ``InvSRLitModule`` and the ``NoisePredictorEMA`` callback):
``checkpoint["ema_noise_predictor"]`` (EMA weights, NoisePredictor state-dict keys, no prefix),
``checkpoint["state_dict"]["noise_predictor.*"]`` (raw weights, used with ``--no-ema``) and
``checkpoint["noise_predictor_config"]`` (the NoisePredictor constructor arguments).
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from invsr_pl.models.noise_predictor import NoisePredictor

EMA_KEY = "ema_noise_predictor"  # = callbacks.ema.EMA_CHECKPOINT_KEY
CONFIG_KEY = "noise_predictor_config"  # written by InvSRLitModule.on_save_checkpoint
STATE_PREFIX = "noise_predictor."
OFFICIAL_NAME = "noise_predictor.pth"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint on the CPU with tensors-only unpickling (``weights_only=True``).

    ``train.py`` instantiates with ``_convert_="all"``, so our checkpoints hold only tensors and plain
    containers; a file that needs full unpickling is refused rather than trusted (it could run code).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds objects other than tensors and plain containers, so it is not loaded (unpickling "
            f"could run arbitrary code). If you trust the file, re-save it as plain tensors first. ({err})"
        ) from err


def noise_predictor_state(checkpoint: dict[str, Any], use_ema: bool = True) -> dict[str, Tensor]:
    """The noise predictor's weights (NoisePredictor state-dict keys, CPU fp32) from a loaded checkpoint."""
    if use_ema:
        if EMA_KEY not in checkpoint:
            raise KeyError(
                f"checkpoint has no {EMA_KEY!r} (trained without the EMA callback?); pass --no-ema to export "
                "the raw noise-predictor weights instead"
            )
        state = checkpoint[EMA_KEY]
    else:
        full = checkpoint.get("state_dict", {})
        state = {k[len(STATE_PREFIX) :]: v for k, v in full.items() if k.startswith(STATE_PREFIX)}
        if not state:
            raise KeyError(
                f"checkpoint state_dict has no {STATE_PREFIX!r} keys; is it an InvSR training checkpoint?"
            )
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def load_noise_predictor(
    path: str | Path, use_ema: bool = True, default: Callable[[], NoisePredictor] = NoisePredictor
) -> tuple[NoisePredictor, str]:
    """Any noise-predictor weights the project knows, plus a note saying which weights were loaded.

    Args:
        path: a ``save_pretrained`` folder (or its ``model.safetensors``), a Lightning ``.ckpt`` from
            ``train.py`` (EMA weights by default, architecture from the checkpoint), or a plain weight file
            such as the released ``noise_predictor_sd_turbo_v5.pth`` (architecture from ``default``).
        use_ema: ``.ckpt`` only: the EMA weights if the checkpoint has them, else the module's.
        default: builds the architecture for plain weight files (the paper configuration by default).

    Raises:
        FileNotFoundError: no such file or folder.
        RuntimeError / ValueError / KeyError: the weights do not fit (strict loading; the message says why).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"noise predictor {path} does not exist")
    if path.is_dir():
        return NoisePredictor.from_pretrained(path), f"exported folder {path}"
    if path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
        return NoisePredictor.from_pretrained(path.parent), f"exported folder {path.parent}"
    if path.suffix != ".ckpt":  # INVSR_REFERENCE §1, §7.3: official .pth / .safetensors, strict keys
        return default().load_checkpoint(path), f"weights file {path}"
    checkpoint = load_checkpoint(path)
    ema = use_ema and EMA_KEY in checkpoint
    model = NoisePredictor(**checkpoint[CONFIG_KEY]) if CONFIG_KEY in checkpoint else default()
    model.load_state_dict(noise_predictor_state(checkpoint, ema), strict=True)
    note = "EMA weights" if ema else "module weights" + (" (checkpoint has no EMA)" if use_ema else "")
    return model, f"{note} of {path}"


def export_noise_predictor(
    checkpoint_path: str | Path, out_dir: str | Path, use_ema: bool = True
) -> tuple[Path, Path]:
    """Export the (EMA) noise predictor of ``checkpoint_path`` into ``out_dir``.

    Returns:
        (folder written by ``save_pretrained``, path of the official-format ``.pth``).

    Raises:
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
    model.save_pretrained(out_dir)
    official = out_dir / OFFICIAL_NAME
    # a plain dict of fp32 tensors, like the released noise_predictor_sd_turbo_v5.pth (§7.3)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, official)
    return out_dir, official


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="invsr-export",
        description="Export the (EMA) noise predictor of an InvSR training checkpoint as safetensors + "
        "config.json and as an official-format .pth.",
    )
    parser.add_argument("checkpoint", type=Path, help="Lightning checkpoint (.ckpt) written by train.py")
    parser.add_argument("out_dir", type=Path, help="output folder (created if missing)")
    parser.add_argument(
        "--no-ema", action="store_true", help="export the raw weights instead of the EMA ones"
    )
    args = parser.parse_args(argv)
    try:
        folder, official = export_noise_predictor(args.checkpoint, args.out_dir, use_ema=not args.no_ema)
    except (FileNotFoundError, KeyError, RuntimeError, ValueError) as err:
        parser.exit(2, f"invsr-export: error: {err}\n")
    kind = "raw" if args.no_ema else "EMA"
    print(f"wrote {kind} noise predictor: {folder}/model.safetensors, {folder}/config.json, {official}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
