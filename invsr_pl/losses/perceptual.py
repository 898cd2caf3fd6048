"""LatentLPIPS: InvSR's perceptual distance computed directly on SD latents with a latent-adapted VGG16.

INVSR_REFERENCE §3: a plain VGG16 (no batch norm) whose first conv takes 4 latent channels and whose first
three max-pools are removed, then LPIPS-style unit normalisation, squared differences and five 1x1 heads.
The weights are InvSR's finetuned ``vgg16_sdturbo_lpips.pth``; the module's state dict has exactly that file's
38 keys, so it loads strictly.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from invsr_pl.utils.checkpoint import read_state_dict

__all__ = ["LPIPS_WEIGHTS_URL", "LPIPSWeightsNotFoundError", "LatentLPIPS"]

LPIPS_WEIGHTS_URL = "https://huggingface.co/OAOA/InvSR/resolve/main/vgg16_sdturbo_lpips.pth"
DEFAULT_WEIGHTS_PATH = "weights/vgg16_sdturbo_lpips.pth"

# torchvision vgg16 `features` indices per slice, keeping the original indices as module names (§3.2). The
# max-pools at 4, 9 and 16 are left out so a 64x64 latent keeps 64 px until the last slice; 23 is kept.
_SLICES: tuple[tuple[int, ...], ...] = (
    (0, 1, 2, 3),
    (5, 6, 7, 8),
    (10, 11, 12, 13, 14, 15),
    (17, 18, 19, 20, 21, 22),
    (23, 24, 25, 26, 27, 28, 29),
)
_CHANNELS = (64, 128, 256, 512, 512)
_EPS = 1e-10  # §3.3: f / (||f||_2 + 1e-10)


class LPIPSWeightsNotFoundError(FileNotFoundError):
    """The finetuned latent-LPIPS weights are missing; the message says where to get them."""


class _ScalingLayer(nn.Module):
    """The stock LPIPS ImageNet shift/scale buffers: unused in latent mode but part of the file (§3.2)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))


class _LinearHead(nn.Module):
    """Dropout then 1x1 conv C->1 without bias; attribute names give the released keys ``model.1.weight``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Dropout is inactive because the module is always in eval mode; kept for the key layout (§3.3).
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))
        # Trained LPIPS heads are non-negative; a uniform 1/C weighting keeps random_init distances >= 0 too.
        nn.init.constant_(self.model[1].weight, 1.0 / channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class _LatentVGG16(nn.Module):
    """VGG16 trunk sliced at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 with a 4-channel first conv."""

    def __init__(self, in_channels: int = 4) -> None:
        super().__init__()
        # Architecture only, never weights (they come from the InvSR file). Built on the meta device so the
        # unused 120M-parameter classifier costs nothing; the kept convs are materialised and re-initialised.
        with torch.device("meta"):
            features = torchvision.models.vgg16(weights=None).features
        features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1, device="meta")
        for i, indices in enumerate(_SLICES, start=1):
            block = nn.Sequential(OrderedDict((str(j), features[j]) for j in indices))
            block.to_empty(device="cpu")
            for layer in block:
                if isinstance(layer, nn.Conv2d):
                    layer.reset_parameters()
            setattr(self, f"slice{i}", block)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i in range(1, len(_SLICES) + 1):
            x = getattr(self, f"slice{i}")(x)
            feats.append(x)
        return feats


class LatentLPIPS(nn.Module):
    """Frozen latent LPIPS distance (InvSR's finetuned VGG16 on SD-Turbo latents), 14,716,736 parameters.

    The module is always in eval mode and its parameters never require grad; gradients flow to the inputs.
    The training loss in the paper is ``2.0 * LatentLPIPS(z0_hat, z0_gt)`` (INVSR_REFERENCE §4.3).

    Args:
        weights_path: path to ``vgg16_sdturbo_lpips.pth`` (download: ``LPIPS_WEIGHTS_URL``; the usual place is
            ``weights/vgg16_sdturbo_lpips.pth``). A ``.safetensors`` copy works too. Relative paths resolve
            against the working directory.
        random_init: keep random weights and ignore ``weights_path`` (tests and smoke runs only: the
            distance is then meaningless).

    Raises:
        LPIPSWeightsNotFoundError: (a ``FileNotFoundError``) when ``weights_path`` is None or not a file and
            ``random_init`` is False.
    """

    def __init__(self, weights_path: str | None = None, random_init: bool = False) -> None:
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _LatentVGG16(in_channels=4)
        # The released file stores every head twice (`lin{k}` and `lins.{k}`, §3.4). Registering the same
        # modules under both names makes state_dict() list both keys while parameters() counts them once;
        # `lins` is registered last so that, on loading, its copy is the one kept (it is the one used, §3.3).
        heads = [_LinearHead(c) for c in _CHANNELS]
        for k, head in enumerate(heads):
            self.add_module(f"lin{k}", head)
        self.lins = nn.ModuleList(heads)
        if not random_init:
            self.load_weights(weights_path)
        self.requires_grad_(False)
        self.eval()

    def load_weights(self, weights_path: str | Path | None) -> None:
        """Strictly load ``vgg16_sdturbo_lpips.pth`` (all 38 keys, ``lin*`` and ``lins.*`` included)."""
        if weights_path is None or not Path(weights_path).is_file():
            where = "no path given" if weights_path is None else f"{str(weights_path)!r} does not exist"
            raise LPIPSWeightsNotFoundError(
                f"latent LPIPS weights not found ({where}). Download {LPIPS_WEIGHTS_URL}, put it at "
                f"{DEFAULT_WEIGHTS_PATH} (or anywhere, and set model.lpips.weights_path to it), or set the "
                "LPIPS loss weight to 0 to train without it."
            )
        self.load_state_dict(read_state_dict(weights_path, "latent LPIPS weights"), strict=True)

    def train(self, mode: bool = True) -> LatentLPIPS:
        """Stay in eval mode whatever the caller asks: the metric is frozen (INVSR_REFERENCE §3.5)."""
        return super().train(False)

    def features(self, latent: Tensor) -> list[Tensor]:
        """VGG features (B, 64|128|256|512|512, *, *); a (B,4,64,64) latent gives 64, 64, 64, 64 and 32 px."""
        return self.net(latent)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Perceptual distance between two batches of latents.

        Args:
            x: (B, 4, h, w) float scaled SD latents (VAE sample * 0.18215), used as-is: there is no input
                normalisation in latent mode (§3.2). Neither input is clamped in training (§3.5).
            y: (B, 4, h, w) same shape as ``x``.

        Returns:
            (B,) float32 distances, >= 0 up to the sign of the learned heads, 0 for identical inputs.
        """
        if x.ndim != 4 or x.shape[1] != 4 or x.shape != y.shape:
            raise ValueError(
                f"x and y must both be (B, 4, h, w) latents, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        batch = x.shape[0]
        weight_dtype = self.net.slice1[0].weight.dtype
        feats = self.net(torch.cat([x, y], dim=0).to(weight_dtype))  # one trunk pass for both inputs
        total = x.new_zeros(batch, dtype=torch.float32)
        for feat, head in zip(feats, self.lins, strict=True):
            fx, fy = feat.float().split(batch, dim=0)
            fx = fx / (fx.norm(dim=1, keepdim=True) + _EPS)
            fy = fy / (fy.norm(dim=1, keepdim=True) + _EPS)
            diff = (fx - fy).square().to(feat.dtype)  # (B, C_l, h_l, w_l)
            total = total + head(diff).float().mean(dim=(1, 2, 3))  # spatial average per layer, §3.3
        return total
