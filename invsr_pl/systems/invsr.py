"""InvSRLitModule: the InvSR training system (docs/training.md); it orchestrates, the models compute.

Per iteration: generator (noise predictor) step, then discriminator step; manual optimisation with micro-batch
accumulation, gradient clipping from the model config and a non-finite guard. Validation samples through
:class:`InvSRSampler` (the one inference path) and reports PSNR/SSIM on Y per number of sampling steps.

AMP: ``manual_backward`` and ``LightningOptimizer.step`` go through the trainer's precision plugin. Under
"16-mixed" it scales the loss in ``manual_backward``; inside ``opt.step()`` it unscales the gradients *before*
``on_before_optimizer_step`` and its GradScaler skips steps with inf/NaN gradients. So we clip in
``on_before_optimizer_step``, where gradients are unscaled for every precision. (One GradScaler serves both
optimisers; the official trainer keeps two, docs/training.md.)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from invsr_pl.losses.adversarial import clamp_fake, generator_adv_loss, hinge_d_loss
from invsr_pl.metrics.factory import (
    VALIDATION_PROTOCOL,
    MetricSet,
    build_metric_set,
    load_protocol,
    score_images,
)
from invsr_pl.metrics.report import batch_positions, sr_generator
from invsr_pl.models.timesteps import to_index, validate_timesteps
from invsr_pl.sampling.color_fix import upsample_reference
from invsr_pl.sampling.sampler import InvSRSampler
from invsr_pl.utils.checkpoint import (
    CONFIG_KEY,
    CONSECUTIVE_NONFINITE_KEY,
    ITERATION_KEY,
    SKIPPED_STEPS_KEY,
    drop_frozen,
    read_state_dict,
)
from invsr_pl.utils.provenance import PROVENANCE_KEY
from invsr_pl.utils.seeding import stable_seed

if TYPE_CHECKING:
    from invsr_pl.losses.perceptual import LatentLPIPS
    from invsr_pl.models.backbone import FrozenBackbone
    from invsr_pl.models.discriminator import LatentDiscriminator
    from invsr_pl.models.noise_predictor import NoisePredictor

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


# Frozen parts are never checkpointed (docs/lightning.md); they are rebuilt from their own weight files.
class NonFiniteLossError(RuntimeError):
    """Training stopped after ``max_consecutive_nonfinite`` skipped steps in a row (train.py: exit 3)."""


NOT_CHECKPOINTED = ("backbone.", "lpips.", "val_metrics.", "test_metrics.")


def warmup_factor(scheduler_steps: int, warmup_steps: int) -> float:
    """Linear warm-up: iteration j (after j - 1 scheduler steps) uses ``min(j / warmup, 1)`` of the lr.

    docs/training.md: the official trainer is off by one (iteration 1 uses the full lr).
    """
    return 1.0 if warmup_steps <= 0 else min((scheduler_steps + 1) / warmup_steps, 1.0)


class InvSRLitModule(L.LightningModule):
    """Trains the InvSR noise predictor against a frozen SD-Turbo with L2 + latent LPIPS + latent GAN losses.

    Batches: train ``{"lq": (B,3,h,w), "gt": (B,3,s*h,s*w)}`` float32 in [0,1], already degraded by the data
    module; val adds ``"name"``; ``s`` = ``noise_predictor.scale``. Arguments = keys of conf/model/invsr.yaml.
    """

    def __init__(
        self,
        backbone: FrozenBackbone,
        noise_predictor: NoisePredictor,
        discriminator: LatentDiscriminator | None = None,
        lpips: LatentLPIPS | None = None,
        optimizer_g: OptimizerFactory | None = None,
        optimizer_d: OptimizerFactory | None = None,
        l2_weight: float = 1.0,
        lpips_weight: float = 2.0,
        gan_weight: float = 0.1,
        train_timesteps: Sequence[int] = (250, 200, 150, 100),
        dis_warmup_steps: int = 10_000,
        dis_update_freq: int = 1,
        lr_warmup_steps: int = 2000,
        micro_batch_size: int | None = None,
        grad_clip_g: float | None = None,
        grad_clip_d: float | None = None,
        max_consecutive_nonfinite: int = 10,
        gradient_checkpointing: bool = True,
        max_iterations: int | None = None,
        seed: int = 123456,
        val_num_steps: Sequence[int] = (1, 5),
        color_fix: str = "none",
        chopping_size: int = 128,
        val_lpips: bool = True,
        val_keep_images: int = 4,
        noise_predictor_init: str | None = None,
        discriminator_init: str | None = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        super().__init__()
        if lpips is None and lpips_weight > 0:
            raise ValueError(f"lpips_weight={lpips_weight} needs an `lpips` module (or set lpips_weight: 0)")
        if min(dis_update_freq, max_consecutive_nonfinite, micro_batch_size or 1) < 1:
            raise ValueError("dis_update_freq, max_consecutive_nonfinite and micro_batch_size must be >= 1")
        modules = ["backbone", "noise_predictor", "discriminator", "lpips", "optimizer_g", "optimizer_d"]
        self.save_hyperparameters(ignore=modules)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold no backbone/LPIPS weights (docs/lightning.md)
        self.backbone = backbone.requires_grad_(False).eval()  # frozen before DDP wraps (docs/lightning.md)
        self.noise_predictor = noise_predictor
        self.discriminator = discriminator
        if gradient_checkpointing:  # the UNet and D are checkpointed in training, as the reference trainer
            self.backbone.enable_gradient_checkpointing()
            if discriminator is not None:
                discriminator.enable_gradient_checkpointing()
        self._load_init_weights(noise_predictor_init, discriminator_init)
        if compile:
            self._compile({} if compile is True else dict(compile))
        self.lpips = lpips.requires_grad_(False).eval() if lpips is not None else None
        # docs/training.md: AdamW for G; Adam with coupled weight decay for D; lr 5e-5, default betas.
        self.optimizer_g = optimizer_g or partial(torch.optim.AdamW, lr=5e-5, weight_decay=0.0)
        self.optimizer_d = optimizer_d or partial(torch.optim.Adam, lr=5e-5, weight_decay=1e-3)
        self.train_timesteps = validate_timesteps(list(train_timesteps))
        self.register_buffer("train_indices", to_index(self.train_timesteps), persistent=False)
        self.val_num_steps = [int(n) for n in val_num_steps]
        # one Metric per step count and split (test: per test set), reduced across ranks by torchmetrics;
        # built in setup(), before the strategy moves the module, once we know whether LPIPS weights exist
        self.val_metrics: nn.ModuleDict | None = None
        self.test_metrics = nn.ModuleList()
        self.iteration = 0  # our own counter: trainer.global_step counts G and D steps (docs/lightning.md)
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.last_val_images: dict[str, Any] | None = None
        self._last_step_time: float | None = None

    def forward(
        self,
        lq: Tensor,
        num_steps: int = 1,
        timesteps: list[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Super-resolve ``lq`` (B,3,h,w) in [0,1] to (B,3,s*h,s*w) float32 in [0,1] with InvSRSampler."""
        hp = self.hparams
        sampler = InvSRSampler(
            self.backbone,
            self.noise_predictor,
            num_steps=num_steps,
            timesteps=timesteps,
            chopping_size=hp.chopping_size,
            color_fix=hp.color_fix,
        )
        return sampler(lq, generator=generator)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        lq, gt = batch["lq"], batch["gt"]
        self.iteration += 1
        k, hp = self.iteration, self.hparams
        # training randomness is a function of (seed, rank, iteration): exact resume without saved RNG states,
        # distinct streams per rank (docs/training.md: seed + rank)
        seed = stable_seed(hp.seed, "iteration", self.global_rank, k)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        # docs/training.md: one starting timestep per sample, uniform over the configured set
        choice = torch.randint(len(self.train_timesteps), (lq.shape[0],), generator=gen, device=self.device)
        index = self.train_indices[choice]  # (B,) long diffusion index = t - 1
        scale = getattr(self.noise_predictor, "scale", None)
        if scale is not None and tuple(gt.shape[-2:]) != (lq.shape[-2] * scale, lq.shape[-1] * scale):
            raise ValueError(
                f"training pair LQ {tuple(lq.shape[-2:])} / GT {tuple(gt.shape[-2:])} is not x{scale} (the "
                "noise predictor's scale): data.degradation.scale and model.noise_predictor.scale differ; "
                "set both with the top-level `scale` key"
            )
        # docs/training.md: G gets the adversarial term after the D warm-up; D trains from iteration 1,
        # every iteration during the warm-up (k < dis_warmup_steps, as the reference) and then every
        # dis_update_freq-th iteration (docs/training.md)
        adversarial = self.discriminator is not None and hp.gan_weight > 0 and k > hp.dis_warmup_steps
        fakes = self._generator_step(lq, gt, index, gen, adversarial)
        update_d = k < hp.dis_warmup_steps or k % hp.dis_update_freq == 0
        update_d = update_d and self.discriminator is not None
        d_ok = self._discriminator_step(fakes, lq.shape[0]) if update_d and fakes is not None else True
        if fakes is not None:
            self.lr_schedulers().step()  # the G warm-up counts G updates; skipped steps do not advance it
        if fakes is not None and d_ok:
            self.consecutive_nonfinite = 0
        self._log_step(lq.shape[0])
        if hp.max_iterations is not None and k >= hp.max_iterations:
            self.trainer.should_stop = True

    def _generator_step(self, lq: Tensor, gt: Tensor, index: Tensor, gen: torch.Generator, adversarial: bool):
        """Accumulated G update over micro-batches (docs/training.md). Returns [(fake, real, index)] per
        micro-batch for D
        (fake = clamped detached x0_hat, real = GT latent, both (b,4,H/8,W/8)), or None if skipped."""
        opt_g = self._optimizers()[0]
        chunks = self._micro_batches(lq, gt, index)
        opt_g.zero_grad()
        per_sample: dict[str, list[Tensor]] = {}
        fakes = []
        for i, (lq_i, gt_i, idx_i) in enumerate(chunks):
            # all-reduce on the last micro-batch only; D frozen while G steps (docs/lightning.md)
            with opt_g.toggle_model(sync_grad=i == len(chunks) - 1):
                terms, x0, z_gt = self._generator_losses(lq_i, gt_i, idx_i, gen, adversarial)
                self.manual_backward(terms["loss"].sum() / lq.shape[0])  # = batch mean over all micro-batches
            fakes.append((clamp_fake(x0.detach()), z_gt, idx_i))
            for name, value in terms.items():
                per_sample.setdefault(name, []).append(value.detach())
        means = self._term_means({k: torch.cat(v) for k, v in per_sample.items()}, index)
        if not self._step_if_finite(opt_g, self.noise_predictor, means["loss"], "generator", means):
            return None
        logs = {f"train/{k}": v for k, v in means.items() if not math.isnan(v)}  # absent timesteps are NaN
        self.log_dict(logs, batch_size=lq.shape[0])
        return fakes

    def _generator_losses(
        self, lq: Tensor, gt: Tensor, index: Tensor, gen: torch.Generator, adversarial: bool
    ):
        """Per-sample terms {l2, lpips, gan_g, loss} (b,) float32; x0_hat and GT latent (b,4,H/8,W/8)."""
        hp = self.hparams
        with torch.no_grad():
            # bicubic to the GT size, no antialias, no clamp; posterior samples (docs/training.md)
            lq_up = F.interpolate(lq, size=gt.shape[-2:], mode="bicubic", align_corners=False)
            z_lq = self.backbone.encode(lq_up, generator=gen)
            z_gt = self.backbone.encode(gt, generator=gen)
        noise = self.noise_predictor(lq, index).sample(generator=gen)  # reparameterised
        # docs/training.md: z_t = z_lq + sigma * noise; gradients flow through the frozen UNet into the NP
        x0, _ = self.backbone.invert_step(z_lq, noise, index)
        zero = x0.new_zeros(x0.shape[0])
        terms = {"l2": (x0 - z_gt).pow(2).mean(dim=(1, 2, 3))}
        terms["lpips"] = self.lpips(x0, z_gt).float().view(-1) if hp.lpips_weight > 0 else zero
        terms["gan_g"] = zero  # logged as zeros during the D warm-up, like the official trainer
        if adversarial:
            logits = self.discriminator(clamp_fake(x0), index, self._prompt(len(index)))
            terms["gan_g"] = generator_adv_loss(logits).float()
        weighted = hp.l2_weight * terms["l2"] + hp.lpips_weight * terms["lpips"]
        terms["loss"] = weighted + hp.gan_weight * terms["gan_g"]
        return terms, x0, z_gt

    def _discriminator_step(self, fakes: list[tuple[Tensor, Tensor, Tensor]], batch_size: int) -> bool:
        """Accumulated hinge D update (docs/method.md) on the G step's micro-batches; False if skipped."""
        opt_d = self._optimizers()[1]
        opt_d.zero_grad()
        sums = []  # per micro-batch: summed D loss, mean real logit and mean fake logit times b
        for i, (fake, real, idx) in enumerate(fakes):
            with opt_d.toggle_model(sync_grad=i == len(fakes) - 1):
                logits = self.discriminator(
                    torch.cat([real, fake]), idx.repeat(2), self._prompt(2 * len(idx))
                )
                real_fake = list(zip(*(head.detach().float().chunk(2) for head in logits), strict=True))
                loss = hinge_d_loss(*zip(*(head.chunk(2) for head in logits), strict=True))  # (b,)
                self.manual_backward(loss.sum() / batch_size)
            heads_mean = [torch.stack([h.mean() for h in heads]).mean() * len(idx) for heads in real_fake]
            sums.append(torch.stack([loss.detach().sum(), *heads_mean]))
        values = (torch.stack(sums).sum(0) / batch_size).tolist()
        means = dict(zip(["d_loss", "d_real", "d_fake"], values, strict=True))
        if not self._step_if_finite(opt_d, self.discriminator, means["d_loss"], "discriminator", means):
            return False
        self.log_dict({f"train/{k}": v for k, v in means.items()}, batch_size=batch_size)
        return True

    def _step_if_finite(self, opt, model: nn.Module, loss: float, what: str, terms: dict[str, float]) -> bool:
        """Step ``opt`` unless the loss or (without a GradScaler) the gradients are non-finite on any rank.
        Under "16-mixed", gradient overflow is the GradScaler's business (it skips and lowers the scale)."""
        bad = not math.isfinite(loss)
        if not bad and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            bad = not bool(torch.isfinite(norm))  # grads are all-reduced here, so every rank agrees
            self.log(f"train/grad_norm_{what[0]}", norm.float(), batch_size=1)
        if self.trainer.strategy.reduce_boolean_decision(bad, all=False):
            opt.zero_grad()  # no optimizer step: weights and optimizer state stay as they were
            self._record_nonfinite(what, terms)
            return False
        opt.step()  # clipping happens in on_before_optimizer_step, after any AMP unscale
        return True

    def _record_nonfinite(self, what: str, terms: dict[str, float]) -> None:
        self.skipped_steps += 1
        self.consecutive_nonfinite += 1
        detail = ", ".join(f"{k}={v:.4g}" for k, v in terms.items() if "_t" not in k)
        msg = (
            f"non-finite {what} loss or gradients at iteration {self.iteration} (trainer.global_step "
            f"{self.global_step}), step skipped; loss terms: {detail}"
        )
        limit = self.hparams.max_consecutive_nonfinite
        if self.consecutive_nonfinite >= limit:
            raise NonFiniteLossError(
                f"Stopping after {limit} consecutive non-finite steps (max_consecutive_nonfinite). {msg}"
            )
        rank_zero_warn(msg)

    def _log_step(self, batch_size: int) -> None:
        now = time.perf_counter()
        logs = {"train/skipped_steps": float(self.skipped_steps), "train/iteration": float(self.iteration)}
        # "step" is the x-axis of every logger (Lightning's own is the batch count, one less than the
        # iteration here); InvSR iterations label curves, grids and checkpoints alike (docs/tracking.md)
        logs["step"] = float(self.iteration)
        for name, opt in zip(["lr_g", "lr_d"], self._optimizers(), strict=False):
            logs[f"train/{name}"] = opt.param_groups[0]["lr"]
        if self._last_step_time is not None:  # images/s over all ranks, from one iteration start to the next
            logs["train/throughput"] = batch_size * self.trainer.world_size / (now - self._last_step_time)
        self._last_step_time = now
        self.log_dict(logs, batch_size=batch_size)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # curves at the iteration, as in _log_step. Not synced: every rank holds the same value, and a synced
        # one added an all_reduce that a 2-rank sweep job hung in, its peer waiting in a metric's all_gather
        # (utils/quiet.py drops Lightning's advice to sync it)
        self.log("step", float(self.iteration), batch_size=1)
        srs = self._score_batch(batch, batch_idx, self.val_metrics, self.trainer.val_dataloaders, "val")
        if not srs:  # only padding of Lightning's DistributedSampler on this rank
            return
        keep = self.hparams.val_keep_images  # for the image logger callback (rank zero reads it)
        self.last_val_images = {
            "lq": batch["lq"][:keep].detach().cpu(),
            "gt": batch["gt"][:keep].detach().cpu(),
            "sr": {n: sr[:keep].detach().cpu() for n, sr in srs.items()},
        }

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score a paired test set like validation, logged as ``test/<set name>/psnr_<n>step`` etc."""
        loaders = self.trainer.test_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        prefix = f"test/{self._test_names()[dataloader_idx]}"
        self._score_batch(batch, batch_idx, self.test_metrics[dataloader_idx], loader, prefix)

    def _score_batch(
        self, batch: dict[str, Any], batch_idx: int, metrics: nn.ModuleDict, loader: Any, prefix: str
    ) -> dict[int, Tensor]:
        """SR per ``val_num_steps`` and the bicubic baseline, scored exactly as ``evaluate.py`` scores them
        (:func:`invsr_pl.metrics.factory.score_images`: 8-bit SR, protocol ``invsr``) and logged as
        ``<prefix>/<metric>_<n>step`` / ``<prefix>/<metric>_bicubic``. Returns {n: SR (B,3,H,W) in [0, 1]}."""
        _, keep = batch_positions(loader, batch_idx, len(batch["lq"]))
        lq, gt = batch["lq"][keep], batch["gt"][keep]
        names = [str(n) for n, k in zip(batch.get("name") or range(len(keep)), keep, strict=True) if k]
        srs: dict[int, Tensor] = {}
        for label, n in [(f"{n}step", n) for n in self.val_num_steps] + [("bicubic", None)]:
            if names:  # (none: padding only; the metrics are still logged so that every rank syncs them)
                if n is None:
                    sr = upsample_reference(lq, tuple(gt.shape[-2:]))
                else:  # seeded per image and method as in evaluation, so both give the same numbers
                    gen = sr_generator(self.hparams.seed, names, self.device)
                    sr = srs[n] = self(lq, num_steps=n, generator=gen)
                score_images(metrics[label], sr, gt)
            for key, metric in metrics[label].items():
                self.log(
                    f"{prefix}/{key}_{label}", metric, batch_size=max(len(names), 1), add_dataloader_idx=False
                )
        return srs

    # ------------------------------------------------------------------ optimisers
    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[LambdaLR]]:
        opt_g = self.optimizer_g(self.noise_predictor.parameters())
        optimizers = [opt_g]
        if self.discriminator is not None:
            optimizers.append(self.optimizer_d(self.discriminator.parameters()))
        # manual mode: we step the scheduler after each G update; Lightning saves and restores its state
        return optimizers, [
            LambdaLR(opt_g, partial(warmup_factor, warmup_steps=self.hparams.lr_warmup_steps))
        ]

    # ------------------------------------------------------------------ other hooks
    def setup(self, stage: str) -> None:
        test = stage == "test" and not len(self.test_metrics)
        if self.val_metrics is not None and not test:
            return
        # the evaluation protocol's scorers, built once (never downloading) and shared by every metric set
        names = ["psnr", "ssim"] + (["lpips_vgg"] if self.hparams.val_lpips else [])
        metric_set = build_metric_set(load_protocol(VALIDATION_PROTOCOL), names)
        for key, reason in metric_set.unavailable.items():
            rank_zero_warn(f"validation metric {key} is not computed: {reason}")
        if self.val_metrics is None:
            self.val_metrics = self._metric_set(metric_set)
        if test:
            self.test_metrics.extend(self._metric_set(metric_set) for _ in self._test_names())

    def _metric_set(self, metric_set: MetricSet) -> nn.ModuleDict:
        """{"<n>step" | "bicubic": {"psnr" | "ssim" | "lpips_vgg": ImageQualityMetric}}: fresh metrics of the
        one factory (``evaluate.py`` scores with the same); LPIPS-VGG only with ``val_lpips`` and its weights
        on disk (otherwise a warning names the missing file)."""
        labels = [f"{n}step" for n in self.val_num_steps] + ["bicubic"]
        return nn.ModuleDict({label: metric_set.metrics(paired=True) for label in labels})

    def _test_names(self) -> list[str]:
        names = getattr(self.trainer.datamodule, "test_names", None) if self._trainer is not None else None
        return (
            list(names)
            if names
            else [str(i) for i in range(max(1, len(self.trainer.test_dataloaders or [])))]
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        clip = (
            self.hparams.grad_clip_g if optimizer is self.trainer.optimizers[0] else self.hparams.grad_clip_d
        )
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        sd = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        return drop_frozen(sd, NOT_CHECKPOINTED, prefix)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        # frozen parts are absent from checkpoints by design: do not report them as missing
        result.missing_keys[:] = [k for k in result.missing_keys if not k.startswith(NOT_CHECKPOINTED)]
        return result

    # What the run trains against (invsr_pl.utils.provenance.training_provenance of the composed config), set
    # by train.py after instantiation: only the launcher sees the whole config; None records nothing.
    provenance: dict[str, Any] | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.provenance is not None:  # evaluate.py / invsr-sr score on this backbone by default
            checkpoint[PROVENANCE_KEY] = self.provenance
        checkpoint[ITERATION_KEY] = self.iteration
        checkpoint[SKIPPED_STEPS_KEY] = self.skipped_steps
        checkpoint[CONSECUTIVE_NONFINITE_KEY] = self.consecutive_nonfinite
        config = getattr(self.noise_predictor, "config", None)
        if config is not None:  # lets invsr-export rebuild the NoisePredictor without the Hydra config
            checkpoint[CONFIG_KEY] = dict(config)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.iteration = int(checkpoint.get(ITERATION_KEY, 0))
        self.skipped_steps = int(checkpoint.get(SKIPPED_STEPS_KEY, 0))
        self.consecutive_nonfinite = int(checkpoint.get(CONSECUTIVE_NONFINITE_KEY, 0))

    # ------------------------------------------------------------------ initial weights, compile
    def _load_init_weights(self, noise_predictor_init: str | None, discriminator_init: str | None) -> None:
        """Start from released weights (official layout, strict), e.g. ``noise_predictor_sd_turbo_v5.pth``.

        Only the weights: optimiser, schedule and iteration count start fresh (resuming is ``ckpt_path``).
        """
        inits = {"noise_predictor_init": noise_predictor_init, "discriminator_init": discriminator_init}
        for key, path in inits.items():
            if path is not None and not os.path.isfile(os.path.expanduser(str(path))):
                raise FileNotFoundError(
                    f"model.{key}={path} not found: put the weight file there (the released files are "
                    "noise_predictor_sd_turbo_v5.pth / discriminator_sd_turbo_v5.pth in paths.weights_dir), "
                    f"or set model.{key}=null to start from random weights"
                )
        if noise_predictor_init is not None:
            self.noise_predictor.load_checkpoint(os.path.expanduser(str(noise_predictor_init)))
        if discriminator_init is not None:
            if self.discriminator is None:
                raise ValueError("model.discriminator_init is set but the model has no discriminator")
            # the strict loader of LatentDiscriminator.from_official, applied to the configured instance
            state = read_state_dict(os.path.expanduser(str(discriminator_init)), "discriminator checkpoint")
            self.discriminator.load_state_dict(state, strict=True)

    def _compile(self, options: dict[str, Any]) -> None:
        """``torch.compile`` the noise predictor, UNet and discriminator in place (``nn.Module.compile``), so
        parameter names and state-dict keys stay free of ``_orig_mod.`` (docs/training.md). ``options`` are
        ``torch.compile`` kwargs (``mode``, ``backend``, ...); training shapes are fixed crops."""
        parts = [self.noise_predictor, self.backbone.denoiser, self.discriminator]
        for part in parts:
            if part is not None:
                part.compile(**options)

    # ------------------------------------------------------------------ helpers
    def _optimizers(self) -> list:
        opts = self.optimizers()
        return opts if isinstance(opts, list) else [opts]

    def _prompt(self, batch_size: int) -> Tensor:
        """Positive-prompt embeddings (b,77,D) float32 (docs/training.md, docs/conventions.md)."""
        return self.backbone.prompt_embeds.expand(batch_size, -1, -1).float()

    def _micro_batches(self, lq: Tensor, gt: Tensor, index: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        size = self.hparams.micro_batch_size or lq.shape[0]  # ceil(B / size) passes (docs/training.md)
        return list(zip(lq.split(size), gt.split(size), index.split(size), strict=True))

    def _term_means(self, terms: dict[str, Tensor], index: Tensor) -> dict[str, float]:
        """Batch means of per-sample terms (B,), overall and per starting timestep (l2_t250, ...; NaN where a
        timestep was not drawn), with one device sync."""
        hit = index[:, None] == self.train_indices[None]  # (B, T)
        stacked = torch.stack(list(terms.values()))  # (N, B)
        per_t = torch.where(hit[None], stacked[:, :, None], 0.0).sum(1) / hit.sum(0)  # (N, T); 0/0 = NaN
        values = torch.cat([stacked.mean(1), per_t.flatten()]).tolist()
        return dict(
            zip([*terms, *(f"{n}_t{t}" for n in terms for t in self.train_timesteps)], values, strict=True)
        )
