"""The one noise-predictor loader: every weight source the project knows (docs/checkpoints.md).

``invsr-sr``, the demo, ``evaluate.py``, ``invsr-export`` and :class:`invsr_pl.pipelines.InvSRPipeline` all
load a noise predictor through :func:`load_noise_predictor`. The file formats themselves (safe reading,
checkpoint keys) are :mod:`invsr_pl.utils.checkpoint`'s; this module only decides which model to build.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from invsr_pl.models.noise_predictor import CONFIG_NAME, NoisePredictor
from invsr_pl.utils.checkpoint import CONFIG_KEY, EMA_KEY, load_checkpoint, noise_predictor_state

__all__ = ["load_noise_predictor"]


def load_noise_predictor(
    path: str | Path, use_ema: bool = True, default: Callable[[], NoisePredictor] | None = None
) -> tuple[NoisePredictor, str]:
    """Any noise-predictor weights the project knows, plus a note saying which weights were loaded.

    Args:
        path: a ``save_pretrained`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), or
            its ``.safetensors`` file; a pipeline folder written by ``invsr-export`` (its
            ``noise_predictor/`` subfolder is used); a Lightning ``.ckpt`` from ``train.py`` (EMA weights
            by default, architecture from the checkpoint); or a plain weight file such as the released
            ``noise_predictor_sd_turbo_v5.pth`` (architecture from ``default``, strict keys).
        use_ema: ``.ckpt`` only: the EMA weights if the checkpoint has them, else the module's.
        default: builds the architecture for plain weight files (``NoisePredictor()``, the paper's, if None).

    Returns:
        ``(model, note)``: the fp32 model on the CPU in train mode (as constructed), and e.g.
        ``"EMA weights of run/last.ckpt"``.

    Raises:
        FileNotFoundError: no such file or folder, or a folder without a noise-predictor ``config.json``.
        WeightFileError: the file cannot be read safely (one line naming it).
        RuntimeError / ValueError / KeyError: the weights do not fit (strict loading; the message says why).
    """
    default = default or NoisePredictor
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"noise predictor {path} does not exist")
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() and (path / "noise_predictor" / CONFIG_NAME).is_file():
            return NoisePredictor.from_pretrained(path / "noise_predictor"), f"pipeline folder {path}"
        return NoisePredictor.from_pretrained(path), f"exported folder {path}"
    if path.suffix == ".safetensors" and (path.parent / CONFIG_NAME).is_file():
        return NoisePredictor.from_pretrained(path.parent), f"exported folder {path.parent}"
    if path.suffix != ".ckpt":  # the released .pth / .safetensors: strict keys (docs/checkpoints.md)
        return default().load_checkpoint(path), f"weights file {path}"
    checkpoint = load_checkpoint(path)
    ema = use_ema and EMA_KEY in checkpoint
    model = NoisePredictor(**checkpoint[CONFIG_KEY]) if CONFIG_KEY in checkpoint else default()
    model.load_state_dict(noise_predictor_state(checkpoint, ema), strict=True)
    note = "EMA weights" if ema else "module weights" + (" (checkpoint has no EMA)" if use_ema else "")
    return model, f"{note} of {path}"
