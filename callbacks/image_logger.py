"""Validation image grids: LQ (bicubic-upsampled) | SR for each step count | GT, on rank zero."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torchvision.utils import make_grid, save_image


class ValidationImageLogger(L.Callback):
    """Logs the images the module kept from its last validation run.

    Reads ``pl_module.last_val_images`` after validation: a dict with ``"lq"`` (N,3,h,w) in [0,1],
    ``"sr"`` either a tensor (N,3,H,W) or a dict ``{num_steps: (N,3,H,W)}`` in [0,1], and optionally
    ``"gt"`` (N,3,H,W).
    Each grid row is one image: LQ upsampled bicubically to (H,W) | SR for each step count (ascending) | GT.
    The grid goes to every TensorBoard logger as ``val/lq_sr_gt`` (other loggers, e.g. CSV, are skipped) and,
    with ``save_png``, to ``<output_dir>/images/val/iter_<iteration>.png``; both labelled with the module's
    InvSR iteration (``pl_module.iteration``; ``trainer.global_step`` counts G and D steps).

    Args:
        max_images: rows per grid (the first images of the stored batch).
        save_png: also write the grid as a PNG under ``output_dir``.
        output_dir: folder for PNGs; ``None`` uses ``trainer.default_root_dir``.
        every_n_validations: log only every n-th validation run (sanity checks are never logged).
    """

    def __init__(
        self,
        max_images: int = 4,
        save_png: bool = True,
        output_dir: str | None = None,
        every_n_validations: int = 1,
    ) -> None:
        super().__init__()
        if max_images < 1 or every_n_validations < 1:
            raise ValueError("max_images and every_n_validations must be >= 1")
        self.max_images = max_images
        self.save_png = save_png
        self.output_dir = output_dir
        self.every_n_validations = every_n_validations
        self._validations = 0
        self.last_png: Path | None = None

    @staticmethod
    def build_grid(images: dict[str, Any], max_images: int) -> tuple[Tensor, int]:
        """Returns a (3, rows*H, cols*W) grid in [0,1] and the number of columns."""
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
        return make_grid(tiles, nrow=len(cols), padding=2, pad_value=1.0), len(cols)

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
        grid, _ = self.build_grid(images, self.max_images)
        # labelled in InvSR iterations (one G + one D step), not trainer.global_step (docs/training.md)
        step = int(getattr(pl_module, "iteration", trainer.global_step))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/lq_sr_gt", grid, global_step=step)
        if self.save_png:
            folder = Path(self.output_dir or trainer.default_root_dir) / "images" / "val"
            folder.mkdir(parents=True, exist_ok=True)
            self.last_png = folder / f"iter_{step:07d}.png"
            save_image(grid, self.last_png)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = int(state_dict.get("validations", 0))
