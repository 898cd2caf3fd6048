"""The quick start learns: a short run on the tiny trained SD-Turbo twin super-resolves recognisable photos.

Validation before training (the untrained noise predictor) and after a short run on the same four sample
photos (``experiment=quickstart``; the logged value uses the EMA weights, which start as the untrained
ones). Reference points, on Y as the module scores (docs/evaluation.md): plain bicubic
upsampling, and the backbone's own ceiling for this inversion, the VAE round trip of the bicubic image (what a
perfect noise predictor with a perfect one-step denoiser could return).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from invsr_pl.metrics.factory import quantize_8bit
from invsr_pl.metrics.report import sr_generator
from invsr_pl.sampling.color_fix import rgb_to_ycbcr_bt601
from train import train

MakeCfg = Callable[..., DictConfig]
ITERATIONS = 60


def _y(image: torch.Tensor) -> torch.Tensor:
    return rgb_to_ycbcr_bt601(image)[:, :1]


def _vae_round_trip_psnr(model, lq: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean Y-PSNR of decode(encode(bicubic x4 LQ)) against GT: the inversion's ceiling on this backbone."""
    with torch.no_grad():
        up = F.interpolate(lq, size=gt.shape[-2:], mode="bicubic", align_corners=False)
        out = model.backbone.decode(model.backbone.encode(up, sample=False))
    psnr = peak_signal_noise_ratio(_y(out), _y(gt), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return float(psnr.mean())


def _sr_psnr(model, lq: torch.Tensor, gt: torch.Tensor, names: list[str]) -> float:
    """Mean Y-PSNR of 8-bit 1-step SR, sampled as validation samples it (same sampler, same seeded draws)."""
    model.eval()
    with torch.no_grad():
        sr = quantize_8bit(model(lq, num_steps=1, generator=sr_generator(model.hparams.seed, names, "cpu")))
    psnr = peak_signal_noise_ratio(_y(sr), _y(gt), data_range=1.0, reduction="none", dim=(1, 2, 3))
    return float(psnr.mean())


@pytest.mark.slow
def test_quickstart_learns_to_super_resolve(train_cfg: MakeCfg) -> None:
    cfg = train_cfg(
        "experiment=quickstart",
        "train=false",  # build only: validate the untrained noise predictor first, then fit here
        f"model.max_iterations={ITERATIONS}",
        f"trainer.val_check_interval={ITERATIONS}",
        f"callbacks.model_checkpoint.every_n_iterations={ITERATIONS}",
    )
    assert cfg.model.backbone._target_.endswith("load_tiny_trained_sd_turbo")
    _, objects = train(cfg)
    trainer, model, datamodule = objects["trainer"], objects["model"], objects["datamodule"]
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()))  # the four validation photos, one batch
    lq, gt = batch["lq"], batch["gt"]  # (4, 3, 32, 32), (4, 3, 128, 128)
    assert len(gt) == 4
    before = _sr_psnr(
        model, lq, gt, list(batch["name"])
    )  # the untrained noise predictor, as validation samples it
    trainer.fit(model, datamodule=datamodule)
    after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    sr = model.last_val_images["sr"][1]  # (4, 3, 128, 128): the last validation's 1-step SR
    ceiling = _vae_round_trip_psnr(model, lq, gt)
    summary = (
        f"psnr_1step {before:.2f} -> {after['val/psnr_1step']:.2f} dB, bicubic "
        f"{after['val/psnr_bicubic']:.2f} dB, VAE round trip of bicubic {ceiling:.2f} dB; ssim_1step "
        f"{after['val/ssim_1step']:.3f} (bicubic {after['val/ssim_bicubic']:.3f})"
    )
    print(summary)
    # learns: a clear rise from the untrained noise predictor (measured 22.05 -> 22.84 dB with the
    # attention-free tiny noise predictor; 21.99 -> 22.85 with attention), near the ceiling (23.79 dB);
    # bicubic 26.93 dB
    assert after["val/psnr_1step"] >= before + 0.4, summary
    assert after["val/psnr_1step"] >= ceiling - 1.5, summary
    # near bicubic: the tiny VAE's 8x compression costs ~3 dB against bicubic; SD-Turbo's VAE costs far less
    assert after["val/psnr_1step"] >= after["val/psnr_bicubic"] - 6.0, summary
    assert after["val/psnr_1step"] >= 18.0, summary

    # recognisable photos: structure close to the GT's (SSIM on Y, per image, against bicubic's), and each SR
    # nearer to its own photo than to any other of the four (a noise image or a wrong one would fail)
    bicubic = F.interpolate(lq, size=gt.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    ssim_sr = structural_similarity_index_measure(_y(sr), _y(gt), data_range=1.0, reduction="none")
    ssim_bicubic = structural_similarity_index_measure(_y(bicubic), _y(gt), data_range=1.0, reduction="none")
    assert float(ssim_sr.min()) > 0.45, (ssim_sr, ssim_bicubic)
    # measured: SSIM 0.49 / 0.53 / 0.68 / 0.77 against bicubic 0.73 / 0.65 / 0.83 / 0.84 (ratios >= 0.67)
    assert float((ssim_sr / ssim_bicubic).min()) > 0.6, (ssim_sr, ssim_bicubic)
    distance = (sr[:, None] - gt[None]).pow(2).mean(dim=(2, 3, 4))  # (SR i, GT j) mean squared error
    assert torch.equal(distance.argmin(dim=1), torch.arange(len(gt))), distance
