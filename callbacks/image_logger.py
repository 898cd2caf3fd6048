"""Validation image grids: LQ (bicubic-upsampled) | SR for each step count | GT, with column labels, to every
experiment tracker and to PNG files, on rank zero (docs/tracking.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid, save_image

from invsr_pl.utils.atomic import atomic_path

PADDING = 2  # pixels between tiles (make_grid's padding)
IMAGE_KEY = "val/lq_sr_gt"


def column_labels(images: dict[str, Any]) -> list[str]:
    """``["LQ", "SR 1 step", "SR 3 steps", "GT"]`` for the columns :meth:`ValidationImageLogger.build_grid`
    draws from ``images`` (a single SR tensor is ``"SR"``; no ``"gt"``: no GT column)."""
    sr = images.get("sr")
    steps = sorted(sr) if isinstance(sr, dict) else [None]
    srs = ["SR" if n is None else f"SR {n} step{'s' if int(n) != 1 else ''}" for n in steps]
    return ["LQ", *srs, *(["GT"] if images.get("gt") is not None else [])]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def add_labels(grid: Tensor, labels: list[str]) -> Tensor:
    """``grid`` (3, H, W) in [0, 1] from :meth:`ValidationImageLogger.build_grid` with a white strip on top
    naming each column, centred over it; returns (3, H + strip, W) in [0, 1].

    The text shrinks until every label fits its column (tiles of 64 px and more stay readable)."""
    _, height, width = grid.shape
    tile = (width - PADDING) // len(labels) - PADDING
    size = max(8, min(16, tile // 6))
    font = _font(size)
    while size > 6 and max(font.getlength(t) for t in labels) > tile - 2:
        size -= 1
        font = _font(size)
    strip = size + 8
    pixels = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    canvas = Image.new("RGB", (width, height + strip), "white")
    canvas.paste(Image.fromarray(pixels), (0, strip))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):
        centre = PADDING + i * (tile + PADDING) + tile / 2
        draw.text((centre, strip / 2 + 1), text, fill="black", font=font, anchor="mm")
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


class ValidationImageLogger(L.Callback):
    """Logs the images the module kept from its last validation run.

    Reads ``pl_module.last_val_images`` after validation: a dict with ``"lq"`` (N,3,h,w) in [0,1],
    ``"sr"`` either a tensor (N,3,H,W) or a dict ``{num_steps: (N,3,H,W)}`` in [0,1], and optionally
    ``"gt"`` (N,3,H,W).
    Each grid row is one image: LQ upsampled bicubically to (H,W) | SR for each step count (ascending) | GT,
    under a strip of column labels (``LQ | SR 1 step | SR 3 steps | GT``). The grid goes, as ``val/lq_sr_gt``
    at the module's InvSR iteration (``pl_module.iteration``; ``trainer.global_step`` counts G and D steps),
    to every tracker in its own way: TensorBoard ``add_image``, MLflow ``log_image`` (a run artifact under
    ``images/``, with a step slider in the UI), W&B ``wandb.Image`` (captioned with the labels); CSV and other
    loggers get none. With ``save_png`` it is also written to ``<output_dir>/images/val/<filename>.png``.

    Args:
        max_images: rows per grid (the first images of the stored batch).
        save_png: also write the grid as a PNG under ``output_dir``.
        output_dir: folder for PNGs; ``None`` uses ``trainer.default_root_dir``.
        every_n_validations: log only every n-th validation run (sanity checks are never logged).
        filename: PNG name without extension, formatted with ``iteration``; the checkpoints' zero-padding
            (``conf/callbacks/model_checkpoint.yaml``), so that grids and checkpoints sort together.
    """

    def __init__(
        self,
        max_images: int = 4,
        save_png: bool = True,
        output_dir: str | None = None,
        every_n_validations: int = 1,
        filename: str = "iter_{iteration:08d}",
    ) -> None:
        super().__init__()
        if max_images < 1 or every_n_validations < 1:
            raise ValueError("max_images and every_n_validations must be >= 1")
        try:
            filename.format(iteration=0)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"filename {filename!r} must format with {{iteration}} only: {err}") from err
        self.max_images = max_images
        self.save_png = save_png
        self.output_dir = output_dir
        self.every_n_validations = every_n_validations
        self.filename = filename
        self._validations = 0
        self.last_png: Path | None = None

    @staticmethod
    def build_grid(images: dict[str, Any], max_images: int) -> tuple[Tensor, int]:
        """A (3, rows*H, cols*W) grid in [0,1] (no labels: :func:`add_labels`) and its column count."""
        lq, sr, gt = images.get("lq"), images.get("sr"), images.get("gt")
        if lq is None or sr is None:
            raise KeyError("last_val_images needs at least 'lq' and 'sr'")
        srs = [sr[k] for k in sorted(sr)] if isinstance(sr, dict) else [sr]
        size = srs[0].shape[-2:]
        n = min(max_images, lq.shape[0])
        cols = [F.interpolate(lq[:n].float(), size=size, mode="bicubic", align_corners=False)]
        cols += [s[:n].float() for s in srs]
        if gt is not None:
            cols.append(gt[:n].float())
        cols = [c.detach().cpu().clamp(0, 1) for c in cols]
        tiles = torch.stack(cols, dim=1).flatten(0, 1)  # (n*cols,3,H,W), row-major: one image per row
        return make_grid(tiles, nrow=len(cols), padding=PADDING, pad_value=1.0), len(cols)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        images = getattr(pl_module, "last_val_images", None)
        if not images:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        labels = column_labels(images)
        grid = add_labels(self.build_grid(images, self.max_images)[0], labels)
        # labelled in InvSR iterations (one G + one D step), not trainer.global_step (docs/training.md)
        step = int(getattr(pl_module, "iteration", trainer.global_step))
        for logger in trainer.loggers:
            self._log_to(logger, grid, labels, step)
        if self.save_png:
            folder = Path(self.output_dir or trainer.default_root_dir) / "images" / "val"
            folder.mkdir(parents=True, exist_ok=True)
            self.last_png = folder / f"{self.filename.format(iteration=step)}.png"
            with atomic_path(self.last_png) as tmp:
                save_image(grid, tmp, format="png")

    @staticmethod
    def _log_to(logger: Any, grid: Tensor, labels: list[str], step: int) -> None:
        """``grid`` (3,H,W) in [0,1] to one Lightning logger, the way that tracker shows images."""
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(IMAGE_KEY, grid, global_step=step)
        elif isinstance(logger, MLFlowLogger):
            pixels = (grid * 255).round().byte().permute(1, 2, 0).numpy()  # HWC uint8, as log_image takes
            logger.experiment.log_image(logger.run_id, pixels, key=IMAGE_KEY, step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=IMAGE_KEY, images=[grid], step=step, caption=[" | ".join(labels)])

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))
