"""LatentLPIPSLitModule: trains (or scores) a latent LPIPS on 2AFC judgments (docs/latent_lpips.md).

The LPIPS paper's recipe with a frozen VAE encoder in front: the three patches of a triplet are encoded to
scaled latents, the latent VGG16 gives d0 = d(ref, p0) and d1 = d(ref, p1), the paper's ranking network turns
(d0, d1) into the probability that a human picks p1, and binary cross-entropy against the human judgment is
the loss. "lin" trains the five linear heads on a frozen trunk, "tune" trains the trunk too; the heads are
clamped non-negative after every optimiser step. Validation and test report the 2AFC score per category and
overall. The trained metric is exported in the layout of ``vgg16_sdturbo_lpips.pth``.

Batches: ``{"ref", "p0", "p1": (B, 3, P, P) float32 in [0, 1], "judge": (B,) float32 in [0, 1], "category":
(B,) int64, "name": list[str]}`` (``datamodules.two_afc``); P must be a multiple of the VAE factor (8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import Metric

from invsr_pl.losses.perceptual import LatentLPIPS, TwoAFCRanker
from invsr_pl.utils.checkpoint import drop_frozen
from invsr_pl.utils.seeding import stable_seed

__all__ = [
    "MODES",
    "LatentLPIPSLitModule",
    "TwoAFCScore",
    "export_checkpoint",
    "lr_factor",
    "two_afc_score",
]

MODES = ("lin", "tune")
# The frozen VAE is rebuilt from its own weights; it never goes into checkpoints.
NOT_CHECKPOINTED = ("backbone.", "val_score.", "test_score.")
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def two_afc_score(d0: Tensor, d1: Tensor, judge: Tensor) -> Tensor:
    """Per-triplet 2AFC agreement of a distance with the human judgment (the LPIPS paper's score).

    Args:
        d0, d1: (B,) distances ref-p0 and ref-p1.
        judge: (B,) fraction of people who judged p1 closer.

    Returns:
        (B,) float32: ``judge`` where the distance prefers p1 (d1 < d0), ``1 - judge`` where it prefers p0,
        0.5 on ties. Its mean is the 2AFC score (humans agree with other humans ~74% on BAPPS val).
    """
    judge = judge.float()
    prefer_p1 = (d1 < d0).float()
    prefer_p0 = (d0 < d1).float()
    return prefer_p1 * judge + prefer_p0 * (1.0 - judge) + (1.0 - prefer_p1 - prefer_p0) * 0.5


class TwoAFCScore(Metric):
    """2AFC score per category and overall, summed over batches and devices.

    ``compute()`` returns ``{"<category>": mean score, ..., "overall": mean over categories}`` (the LPIPS
    paper reports each category and their average); categories without triplets are left out.
    """

    full_state_update = False

    def __init__(self, categories: list[str]) -> None:
        super().__init__()
        if not categories:
            raise ValueError("TwoAFCScore needs at least one category")
        self.categories = list(categories)
        n = len(self.categories)
        self.add_state("total", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: Tensor, category: Tensor) -> None:  # (B,) float, (B,) int64
        if category.numel() and (category.min() < 0 or category.max() >= len(self.categories)):
            raise ValueError(f"category index out of range for {len(self.categories)} categories")
        self.total.index_add_(0, category, scores.to(self.total.dtype))
        self.count.index_add_(0, category, torch.ones_like(scores, dtype=self.count.dtype))

    def compute(self) -> dict[str, Tensor]:
        seen = self.count > 0
        per = self.total / self.count.clamp(min=1)
        out = {c: per[i].float() for i, c in enumerate(self.categories) if seen[i]}
        out["overall"] = per[seen].mean().float() if seen.any() else torch.tensor(float("nan"))
        return out


def lr_factor(epoch: int, constant_epochs: int, decay_epochs: int) -> float:
    """Learning-rate factor of 0-based ``epoch``: 1 for ``constant_epochs`` epochs (and one more), then
    lowered by 1 / ``decay_epochs`` after each epoch, so the last of the ``constant + decay`` epochs runs at
    1 / ``decay_epochs`` and the rate would reach 0 after it (the LPIPS release's schedule: 5 + 5 epochs)."""
    if decay_epochs <= 0:
        return 1.0
    return max(0.0, min(1.0, (constant_epochs + decay_epochs - epoch) / decay_epochs))


class LatentLPIPSLitModule(L.LightningModule):
    """Trains / scores a :class:`LatentLPIPS` on 2AFC triplets behind a frozen VAE encoder.

    Arguments = keys of ``conf/model/latent_lpips.yaml``.

    Args:
        backbone: the frozen model whose VAE encodes the patches: a ``FrozenBackbone`` (SD-Turbo, SDXL-Turbo,
            SD3.5, the tiny twins) or a diffusers ``AutoencoderKL``. Latents are scaled as in InvSR training:
            ``(z - shift_factor) * scaling_factor`` (no shift for SD-Turbo, 0.18215 scaling).
        lpips: a ``LatentLPIPS``, or a factory (``functools.partial`` / Hydra ``_partial_``) called with
            ``in_channels`` = the VAE's latent channels.
        mode: ``"tune"`` (trunk and heads trained) or ``"lin"`` (heads only, trunk frozen), as in the paper.
            ``None`` = nothing trained: score only (evaluation of given weights).
        optimizer: factory for the optimiser of the trained parameters (heads [+ trunk] + ranking network);
            the paper: Adam, lr 1e-4, betas (0.5, 0.999).
        constant_epochs, decay_epochs: the learning-rate schedule (:func:`lr_factor`), 5 + 5 in the paper.
        ranker_hidden, ranker_eps: the ranking network's width and ratio stabiliser (:class:`TwoAFCRanker`).
        sample_posterior: training latents are posterior samples (as InvSR's training latents are), which
            also augments the data; validation and test always use the posterior mean (deterministic scores).
        export_path: where to write the trained metric (``vgg16_sdturbo_lpips.pth`` layout) at the end of
            fitting; ``None`` = do not export (``export_checkpoint`` does it later from a checkpoint).
        output_dir: where ``trainer.test`` writes ``two_afc_scores.csv`` and ``two_afc_scores.md`` (the 2AFC
            score per category and overall, the weights scored, the triplet counts); ``None`` = no files.
        seed: base of the per-step posterior-sampling generator.
    """

    def __init__(
        self,
        backbone: nn.Module,
        lpips: LatentLPIPS | Callable[..., LatentLPIPS],
        mode: str | None = "tune",
        optimizer: OptimizerFactory | None = None,
        constant_epochs: int = 5,
        decay_epochs: int = 5,
        ranker_hidden: int = 32,
        ranker_eps: float = 0.1,
        sample_posterior: bool = True,
        export_path: str | None = None,
        output_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None (score only), got {mode!r}")
        if constant_epochs < 0 or decay_epochs < 0:
            raise ValueError("constant_epochs and decay_epochs must be >= 0")
        self.save_hyperparameters(ignore=["backbone", "lpips", "optimizer"])
        self.backbone = backbone.requires_grad_(False).eval()
        self.latent_channels, self.vae_factor = _vae_geometry(backbone)
        if not isinstance(lpips, nn.Module):
            lpips = lpips(in_channels=self.latent_channels)
        if lpips.in_channels != self.latent_channels:
            raise ValueError(
                f"the latent LPIPS takes {lpips.in_channels} channels but the VAE gives "
                f"{self.latent_channels}; "
                "set model.lpips.in_channels (or leave it to the module: pass a factory)"
            )
        self.lpips = lpips
        self.ranker = TwoAFCRanker(hidden=ranker_hidden, eps=ranker_eps)
        if mode is not None:
            self.lpips.set_trainable(heads=True, trunk=mode == "tune")
        else:
            self.ranker.requires_grad_(False)
        self.mode = mode
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-4, betas=(0.5, 0.999))
        self.val_score: TwoAFCScore | None = None
        self.test_score: TwoAFCScore | None = None

    # ------------------------------------------------------------------ encoding and distances
    @torch.no_grad()
    def encode(self, images: Tensor, sample: bool, generator: torch.Generator | None = None) -> Tensor:
        """(N, 3, P, P) float in [0, 1] -> (N, C, P/8, P/8) float32 scaled latents of the frozen VAE."""
        if images.shape[-1] % self.vae_factor or images.shape[-2] % self.vae_factor:
            raise ValueError(f"patch size {tuple(images.shape[-2:])} must be a multiple of {self.vae_factor}")
        return _encode(self.backbone, images, sample=sample, generator=generator)

    def distances(self, batch: dict[str, Any], sample: bool, generator: torch.Generator | None = None):
        """(d0, d1), each (B,) float32: latent LPIPS of (ref, p0) and (ref, p1); one VAE and one VGG pass."""
        b = batch["ref"].shape[0]
        latents = self.encode(torch.cat([batch["ref"], batch["p0"], batch["p1"]]), sample, generator)
        ref, p0, p1 = latents.split(b)
        return self.lpips.distances_2afc(ref, p0, p1)

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Deterministic (d0, d1) for a batch of triplets (posterior mean latents)."""
        return self.distances(batch, sample=False)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.mode is None:
            raise RuntimeError("mode=None scores weights and cannot train; set model.mode=tune or lin")
        generator = None
        if self.hparams.sample_posterior:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(stable_seed(self.hparams.seed, "vae", self.global_rank, self.global_step))
        d0, d1 = self.distances(batch, sample=self.hparams.sample_posterior, generator=generator)
        loss = self.ranker.loss(d0, d1, batch["judge"])
        with torch.no_grad():
            score = two_afc_score(d0, d1, batch["judge"]).mean()
        b = batch["ref"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/2afc", score, batch_size=b)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.lpips.clamp_heads_()  # the paper keeps the linear heads non-negative after every step

    def _score(self, batch: dict[str, Any], metric: TwoAFCScore, prefix: str) -> None:
        d0, d1 = self.distances(batch, sample=False)
        metric.update(two_afc_score(d0, d1, batch["judge"]), batch["category"])
        if self.mode is not None:
            loss = self.ranker.loss(d0, d1, batch["judge"])
            self.log(f"{prefix}/loss", loss, batch_size=batch["ref"].shape[0], sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score(batch, self.val_score, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score(batch, self.test_score, "test")

    def _log_scores(self, metric: TwoAFCScore, prefix: str) -> dict[str, float]:
        values = metric.compute()
        metric.reset()
        for name, value in values.items():
            key = f"{prefix}/2afc" if name == "overall" else f"{prefix}/2afc/{name}"
            self.log(key, value)
        summary = {k: round(float(v), 4) for k, v in values.items()}
        rank_zero_info(f"{prefix} 2AFC score: {summary}")
        return summary

    def on_validation_epoch_end(self) -> None:
        self._log_scores(self.val_score, "val")

    def on_test_epoch_end(self) -> None:
        counts = self.test_score.count.detach().cpu()
        self.last_test_scores = self._log_scores(self.test_score, "test")
        if self.hparams.output_dir:
            self._write_scores(Path(self.hparams.output_dir), self.last_test_scores, counts)

    @rank_zero_only
    def _write_scores(self, folder: Path, scores: dict[str, float], counts: Tensor) -> None:
        """``two_afc_scores.csv`` / ``.md``: one row per category plus the overall mean of the categories."""
        folder.mkdir(parents=True, exist_ok=True)
        weights = getattr(self.lpips, "weights_source", None) or "(in-memory weights)"
        total = int(counts.sum())
        rows = [
            (c, scores[c], int(counts[i])) for i, c in enumerate(self.test_score.categories) if c in scores
        ]
        rows.append(("overall (mean of categories)", scores["overall"], total))
        csv = "category,two_afc,triplets\n" + "".join(f"{c},{v:.4f},{n}\n" for c, v, n in rows)
        md = (
            f"# 2AFC score of the latent LPIPS\n\nweights: `{weights}`\n\n| category | 2AFC | triplets |\n"
            "|---|---|---|\n" + "".join(f"| {c} | {v:.4f} | {n} |\n" for c, v, n in rows)
        )
        for name, text in (("two_afc_scores.csv", csv), ("two_afc_scores.md", md)):
            tmp = folder / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(folder / name)  # complete files only
        rank_zero_info(f"2AFC scores written to {folder / 'two_afc_scores.md'}")

    # ------------------------------------------------------------------ set-up and optimisation
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "categories"):
            raise TypeError(
                "LatentLPIPSLitModule needs a 2AFC data module (datamodules.two_afc.TwoAFCDataModule)"
            )
        if stage in ("fit", "validate") and datamodule.categories("validate"):
            self.val_score = TwoAFCScore(datamodule.categories("validate"))
        if stage == "test":
            self.test_score = TwoAFCScore(datamodule.categories("test"))

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in [*self.lpips.parameters(), *self.ranker.parameters()] if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        c, d = self.hparams.constant_epochs, self.hparams.decay_epochs
        scheduler = LambdaLR(optimizer, lambda epoch: lr_factor(epoch, c, d))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def train(self, mode: bool = True) -> LatentLPIPSLitModule:
        super().train(mode)
        self.backbone.eval()  # the VAE is frozen whatever the trainer asks
        return self

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        return drop_frozen(sd, NOT_CHECKPOINTED, prefix)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(NOT_CHECKPOINTED)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"latent LPIPS checkpoint does not match: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}"
            )
        return result

    # ------------------------------------------------------------------ export
    def on_fit_end(self) -> None:
        if self.hparams.export_path and self.mode is not None:
            self._export(self.hparams.export_path)

    @rank_zero_only
    def _export(self, path: str) -> None:
        written = self.lpips.save_weights(path)
        rank_zero_info(f"latent LPIPS weights written to {written} (load with LatentLPIPS(weights_path=...))")


def _vae_geometry(backbone: nn.Module) -> tuple[int, int]:
    """(latent channels, spatial factor) of a FrozenBackbone or a diffusers AutoencoderKL."""
    if isinstance(backbone, AutoencoderKL):
        return int(backbone.config.latent_channels), 2 ** (len(backbone.config.block_out_channels) - 1)
    if hasattr(backbone, "latent_channels") and hasattr(backbone, "vae_scale_factor"):
        return int(backbone.latent_channels), int(backbone.vae_scale_factor)
    raise TypeError(
        f"backbone must be a FrozenBackbone or a diffusers AutoencoderKL, got {type(backbone).__name__}"
    )


def _encode(backbone: nn.Module, images: Tensor, sample: bool, generator: torch.Generator | None) -> Tensor:
    if not isinstance(backbone, AutoencoderKL):
        return backbone.encode(images, generator=generator, sample=sample)  # FrozenBackbone: one encode path
    # A bare AutoencoderKL: diffusers pipelines scale its latents as (z - shift_factor) * scaling_factor.
    weight = next(backbone.parameters())
    posterior = backbone.encode(images.to(weight.device, weight.dtype) * 2.0 - 1.0).latent_dist
    latent = posterior.mean.float()
    if sample:
        noise = randn_tensor(latent.shape, generator=generator, device=latent.device, dtype=torch.float32)
        latent = latent + posterior.std.float() * noise
    shift = getattr(backbone.config, "shift_factor", None) or 0.0
    return (latent - shift) * float(backbone.config.scaling_factor)


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the latent LPIPS of a ``train.py`` checkpoint in the ``vgg16_sdturbo_lpips.pth`` layout.

    The widths come from the checkpoint itself, so tiny and full metrics, 4- and 16-channel VAEs all work.

    Raises:
        FileNotFoundError: no checkpoint at ``checkpoint``.
        ValueError: the checkpoint holds no latent LPIPS (``lpips.*`` keys).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    weights = {
        k[len("lpips.") :]: v for k, v in state.get("state_dict", {}).items() if k.startswith("lpips.")
    }
    if "net.slice1.0.weight" not in weights:
        raise ValueError(f"{path} holds no latent LPIPS (no lpips.* keys): is it a latent_lpips run?")
    base, in_channels = weights["net.slice1.0.weight"].shape[:2]
    metric = LatentLPIPS(random_init=True, in_channels=int(in_channels), base_channels=int(base))
    metric.load_state_dict(weights, strict=True)
    return metric.save_weights(output)
