"""LatentLPIPS: InvSR's perceptual distance computed directly on VAE latents with a latent-adapted VGG16.

docs/method.md "Latent LPIPS": a plain VGG16 (no batch norm) whose first conv takes the latent channels and
whose first three max-pools are removed, then LPIPS-style unit normalisation, squared differences and five 1x1
heads. The weights are InvSR's finetuned ``vgg16_sdturbo_lpips.pth``; the module's state dict has exactly that
file's 38 keys, so it loads strictly, and :meth:`LatentLPIPS.save_weights` writes the same layout.

Training the metric (docs/latent_lpips.md) also lives here: the trunk can start from torchvision's ImageNet
VGG16 (first conv widened to the latent channels), the module can be unfrozen (``set_trainable``), its heads
clamped non-negative (``clamp_heads_``), and :class:`TwoAFCRanker` is the LPIPS paper's small network that
turns two distances into the probability that a human picks the second patch.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from invsr_pl.utils.checkpoint import read_state_dict

__all__ = [
    "LPIPS_WEIGHTS_URL",
    "VGG16_IMAGENET_FILE",
    "VGG16_IMAGENET_URL",
    "LPIPSWeightsNotFoundError",
    "LatentLPIPS",
    "TwoAFCRanker",
    "VGG16WeightsNotFoundError",
    "default_vgg16_weights_path",
]

LPIPS_WEIGHTS_URL = "https://huggingface.co/OAOA/InvSR/resolve/main/vgg16_sdturbo_lpips.pth"
DEFAULT_WEIGHTS_PATH = "weights/vgg16_sdturbo_lpips.pth"
# torchvision's ImageNet VGG16 (no batch norm), the trunk the LPIPS paper and the released metric start from.
VGG16_IMAGENET_URL = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
VGG16_IMAGENET_FILE = VGG16_IMAGENET_URL.rsplit("/", 1)[-1]  # vgg16-397923af.pth

# torchvision vgg16 `features` indices per slice, keeping the original indices as module names. The max-pools
# at 4, 9 and 16 are left out so a 64x64 latent keeps 64 px until the last slice; 23 is kept.
_SLICES: tuple[tuple[int, ...], ...] = (
    (0, 1, 2, 3),
    (5, 6, 7, 8),
    (10, 11, 12, 13, 14, 15),
    (17, 18, 19, 20, 21, 22),
    (23, 24, 25, 26, 27, 28, 29),
)
_WIDTH_MULTIPLIERS = (1, 2, 4, 8, 8)  # VGG16 tap widths / conv1 width: 64, 128, 256, 512, 512
_EPS = 1e-10  # f / (||f||_2 + 1e-10), as LPIPS


class LPIPSWeightsNotFoundError(FileNotFoundError):
    """The finetuned latent-LPIPS weights are missing; the message says where to get them."""


class VGG16WeightsNotFoundError(FileNotFoundError):
    """torchvision's ImageNet VGG16 file is missing (needed only to start training from ImageNet)."""


def default_vgg16_weights_path() -> Path:
    """Where torchvision keeps its ImageNet VGG16 file: ``<torch hub dir>/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_IMAGENET_FILE


class _ScalingLayer(nn.Module):
    """The stock LPIPS ImageNet shift/scale buffers: unused in latent mode but part of the file."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))


class _LinearHead(nn.Module):
    """Dropout then 1x1 conv C->1 without bias; attribute names give the released keys ``model.1.weight``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # The LPIPS paper trains the heads with dropout; when the metric is used frozen it is in eval mode.
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))
        # Trained LPIPS heads are non-negative; a uniform 1/C weighting keeps random_init distances >= 0 too,
        # and is the (non-negative) starting point when the heads are trained.
        nn.init.constant_(self.model[1].weight, 1.0 / channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class _LatentVGG16(nn.Module):
    """VGG16 trunk sliced at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 with an ``in_channels`` first conv.

    ``base_channels`` scales every width (64 = VGG16; smaller values give the tiny CPU twin used by the quick
    start and the tests); the layer indices, hence the state-dict keys, are the same for every width.
    """

    def __init__(self, in_channels: int = 4, base_channels: int = 64) -> None:
        super().__init__()
        # Layer list only: built on the meta device so the unused 120M-parameter classifier costs nothing;
        # the kept convs are re-created at the requested widths and initialised.
        with torch.device("meta"):
            features = torchvision.models.vgg16(weights=None).features
        width = in_channels
        for i, indices in enumerate(_SLICES, start=1):
            layers = OrderedDict()
            for j in indices:
                layer = features[j]
                if isinstance(layer, nn.Conv2d):
                    out = layer.out_channels * base_channels // 64
                    layer = nn.Conv2d(width, out, kernel_size=3, padding=1)
                    # VGG's own initialisation (as torchvision's): He-normal weights, zero biases. Without
                    # biases the trunk is scale-free, so a from-scratch metric works for any latent scale.
                    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(layer.bias)
                    width = out
                elif isinstance(layer, nn.ReLU):
                    layer = nn.ReLU(inplace=True)  # on a conv output, as torchvision's VGG16
                else:
                    layer = nn.MaxPool2d(kernel_size=2, stride=2)
                layers[str(j)] = layer
            setattr(self, f"slice{i}", nn.Sequential(layers))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i in range(1, len(_SLICES) + 1):
            x = getattr(self, f"slice{i}")(x)
            feats.append(x)
        return feats

    def load_imagenet(self, path: Path) -> None:
        """Copy torchvision's ImageNet VGG16 convs; conv1_1 is widened by repeating its channel-0 filters.

        The released InvSR module widens its first conv the same way (docs/latent_lpips.md, "Network").
        """
        state = read_state_dict(path, "torchvision ImageNet VGG16 weights")
        for i, indices in enumerate(_SLICES, start=1):
            block = getattr(self, f"slice{i}")
            for j in indices:
                layer = getattr(block, str(j))
                if not isinstance(layer, nn.Conv2d):
                    continue
                weight, bias = state.get(f"features.{j}.weight"), state.get(f"features.{j}.bias")
                if weight is None or bias is None:
                    raise ValueError(f"{path} is not torchvision's VGG16 file: features.{j} is missing")
                if j == 0:
                    weight = weight[:, :1].repeat(1, layer.in_channels, 1, 1)
                if weight.shape != layer.weight.shape:
                    raise ValueError(
                        f"{path}: features.{j}.weight is {tuple(weight.shape)}, expected "
                        f"{tuple(layer.weight.shape)} (the ImageNet trunk needs base_channels=64)"
                    )
                with torch.no_grad():
                    layer.weight.copy_(weight)
                    layer.bias.copy_(bias)


class LatentLPIPS(nn.Module):
    """Latent LPIPS distance (InvSR's finetuned VGG16 on SD-Turbo latents), 14,716,736 parameters.

    By default the module is a frozen metric: always in eval mode, parameters never require grad, gradients
    flow to the inputs only. InvSR's loss is ``2.0 * LatentLPIPS(z0_hat, z0_gt)`` (docs/method.md, "Losses").
    :meth:`set_trainable` unfreezes it for training the metric itself (docs/latent_lpips.md).

    Args:
        weights_path: path to ``vgg16_sdturbo_lpips.pth`` (download: ``LPIPS_WEIGHTS_URL``; the usual place is
            ``weights/vgg16_sdturbo_lpips.pth``) or to a file written by :meth:`save_weights`. A
            ``.safetensors`` copy works too. Relative paths resolve against the working directory.
        random_init: do not load ``weights_path``: the heads start uniform (1/C) and the trunk random, or
            from ImageNet with ``imagenet_trunk`` (the starting point for training; a random frozen metric is
            meaningless and only for tests and smoke runs).
        imagenet_trunk: with ``random_init``, start the trunk from torchvision's ImageNet VGG16
            (``vgg16_weights_path``), conv1_1 widened to ``in_channels`` by repeating its channel-0 filters.
        vgg16_weights_path: torchvision's ``vgg16-397923af.pth``; ``None`` = torchvision's own cache
            (:func:`default_vgg16_weights_path`). Nothing is downloaded.
        in_channels: latent channels of the VAE in front (4 for SD-Turbo/SDXL, 16 for SD3/FLUX).
        base_channels: width of conv1 (64 = VGG16 and the released file; other widths are tiny twins).

    Raises:
        LPIPSWeightsNotFoundError: (a ``FileNotFoundError``) when ``weights_path`` is None or not a file and
            ``random_init`` is False.
        VGG16WeightsNotFoundError: ``imagenet_trunk`` and the VGG16 file is absent (the message names it,
            its URL and where it goes).
    """

    def __init__(
        self,
        weights_path: str | None = None,
        random_init: bool = False,
        imagenet_trunk: bool = False,
        vgg16_weights_path: str | None = None,
        in_channels: int = 4,
        base_channels: int = 64,
    ) -> None:
        super().__init__()
        if in_channels < 1 or base_channels < 1 or base_channels % 8:
            raise ValueError(
                f"in_channels must be >= 1 and base_channels a positive multiple of 8, got "
                f"{in_channels} and {base_channels}"
            )
        if imagenet_trunk and not random_init:
            raise ValueError(
                "imagenet_trunk=True starts a metric for training and needs random_init=True; a weights file "
                "(weights_path) replaces the whole trunk anyway"
            )
        if imagenet_trunk and base_channels != 64:
            raise ValueError(f"the ImageNet VGG16 trunk has base_channels=64, got {base_channels}")
        self.in_channels = int(in_channels)
        self.base_channels = int(base_channels)
        self._frozen = True
        self.weights_source: str | None = None  # the file the weights came from (None: initialised here)
        self.scaling_layer = _ScalingLayer()
        self.net = _LatentVGG16(in_channels=self.in_channels, base_channels=self.base_channels)
        # The released file stores every head twice (`lin{k}` and `lins.{k}`). Registering the same modules
        # under both names makes state_dict() list both keys while parameters() counts them once; `lins` is
        # registered last so that, on loading, its copy is the one kept (it is the one used).
        heads = [_LinearHead(self.base_channels * m) for m in _WIDTH_MULTIPLIERS]
        for k, head in enumerate(heads):
            self.add_module(f"lin{k}", head)
        self.lins = nn.ModuleList(heads)
        if imagenet_trunk:
            self.net.load_imagenet(self._vgg16_file(vgg16_weights_path))
        if not random_init:
            self.load_weights(weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _vgg16_file(path: str | None) -> Path:
        target = Path(path) if path is not None else default_vgg16_weights_path()
        if not target.is_file():
            raise VGG16WeightsNotFoundError(
                f"torchvision's ImageNet VGG16 weights {VGG16_IMAGENET_FILE} not found at {target}. Download "
                f"{VGG16_IMAGENET_URL} and put it there (or anywhere, and set "
                "model.lpips.vgg16_weights_path), "
                "or train the trunk from scratch with model.lpips.imagenet_trunk=false."
            )
        return target

    def load_weights(self, weights_path: str | Path | None) -> None:
        """Strictly load ``vgg16_sdturbo_lpips.pth`` (all 38 keys, ``lin*`` and ``lins.*`` included)."""
        if weights_path is None or not Path(weights_path).is_file():
            where = "no path given" if weights_path is None else f"{str(weights_path)!r} does not exist"
            raise LPIPSWeightsNotFoundError(
                f"latent LPIPS weights not found ({where}). Download {LPIPS_WEIGHTS_URL}, put it at "
                f"{DEFAULT_WEIGHTS_PATH} (or anywhere, and set model.lpips.weights_path to it), or set the "
                "LPIPS loss weight to 0 to train without it."
            )
        state = read_state_dict(weights_path, "latent LPIPS weights")
        conv1 = state.get("net.slice1.0.weight")
        expected = tuple(self.net.slice1[0].weight.shape)
        if conv1 is not None and tuple(conv1.shape) != expected:
            raise ValueError(
                f"{weights_path}: first conv is {tuple(conv1.shape)} (out, in_channels, 3, 3), this module "
                f"expects {expected}; set in_channels / base_channels to match the file"
            )
        self.load_state_dict(state, strict=True)
        self.weights_source = str(weights_path)

    # ------------------------------------------------------------------ training the metric
    def set_trainable(self, heads: bool = True, trunk: bool = False) -> LatentLPIPS:
        """Unfreeze for training the metric: ``heads`` only is the LPIPS paper's "lin" mode, ``heads`` and
        ``trunk`` its "tune" mode. Once anything is trainable, ``train()`` follows the requested mode (dropout
        in the heads is active in training, as in the paper); with nothing trainable it is a frozen metric."""
        self.net.requires_grad_(trunk)
        self.lins.requires_grad_(heads)
        self._frozen = not (heads or trunk)
        return self.train(self.training)

    def clamp_heads_(self) -> None:
        """Clamp the linear heads to be non-negative (the LPIPS paper does this after every step)."""
        with torch.no_grad():
            for head in self.lins:
                head.model[1].weight.clamp_(min=0.0)

    def save_weights(self, path: str | Path) -> Path:
        """Write the weights in the layout of ``vgg16_sdturbo_lpips.pth``: a plain dict of 38 contiguous CPU
        float32 tensors (``lin*`` and ``lins.*`` as separate copies) that ``LatentLPIPS(weights_path=)``
        loads.

        The file is written next to its destination and renamed into place, so a crash never leaves a
        half-written file; an existing file is replaced only by a complete one.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = OrderedDict(
            (k, v.detach().to("cpu", torch.float32).clone().contiguous())
            for k, v in self.state_dict().items()
        )
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def train(self, mode: bool = True) -> LatentLPIPS:
        """A frozen metric stays in eval mode whatever the caller asks; a trainable one follows ``mode``."""
        return super().train(False if self._frozen else mode)

    # ------------------------------------------------------------------ distances
    def features(self, latent: Tensor) -> list[Tensor]:
        """VGG features (B, 64|128|256|512|512, *, *) at base 64; a (B,4,64,64) latent gives 64, 64, 64, 64
        and 32 px."""
        return self.net(latent)

    def _check(self, *latents: Tensor) -> None:
        first = latents[0]
        if (
            first.ndim != 4
            or first.shape[1] != self.in_channels
            or any(t.shape != first.shape for t in latents)
        ):
            shapes = " and ".join(str(tuple(t.shape)) for t in latents)
            raise ValueError(f"inputs must all be (B, {self.in_channels}, h, w) latents, got {shapes}")

    def _distances(self, reference: Tensor, others: list[Tensor]) -> list[Tensor]:
        """One trunk pass over [reference, *others]; the (B,) float32 distance of each to the reference."""
        batch = reference.shape[0]
        weight_dtype = self.net.slice1[0].weight.dtype
        feats = self.net(torch.cat([reference, *others], dim=0).to(weight_dtype))
        totals = [reference.new_zeros(batch, dtype=torch.float32) for _ in others]
        for feat, head in zip(feats, self.lins, strict=True):
            f = feat.float()
            f = f / (f.norm(dim=1, keepdim=True) + _EPS)
            parts = f.split(batch, dim=0)
            for k, other in enumerate(parts[1:]):
                diff = (parts[0] - other).square().to(feat.dtype)  # (B, C_l, h_l, w_l)
                totals[k] = totals[k] + head(diff).float().mean(dim=(1, 2, 3))  # spatial mean per tap
        return totals

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Perceptual distance between two batches of latents.

        Args:
            x: (B, in_channels, h, w) float scaled latents (VAE sample * scaling factor), used as-is: there is
                no input normalisation in latent mode. Neither input is clamped in InvSR training.
            y: same shape as ``x``.

        Returns:
            (B,) float32 distances, >= 0 for non-negative heads, 0 for identical inputs.
        """
        self._check(x, y)
        return self._distances(x, [y])[0]

    def distances_2afc(self, ref: Tensor, p0: Tensor, p1: Tensor) -> tuple[Tensor, Tensor]:
        """(d(ref, p0), d(ref, p1)), each (B,) float32, from one trunk pass over the three (B, C, h, w)
        batches (the reference's features are shared; same values as two ``forward`` calls)."""
        self._check(ref, p0, p1)
        d0, d1 = self._distances(ref, [p0, p1])
        return d0, d1


class TwoAFCRanker(nn.Module):
    """The LPIPS paper's ranking network G: from two distances to the logit of "a human picks p1".

    Input per triplet: (d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)); two 1x1 layers of ``hidden``
    channels with LeakyReLU(0.2), then one output channel. The paper ends with a sigmoid and a BCE loss
    against the human judgment; here the sigmoid is folded into ``binary_cross_entropy_with_logits`` (the
    same loss, numerically stable).

    Args:
        hidden: width of the two hidden layers (32 in the paper).
        eps: ratio stabiliser (0.1 in the LPIPS release).
    """

    def __init__(self, hidden: int = 32, eps: float = 0.1) -> None:
        super().__init__()
        self.eps = float(eps)
        self.model = nn.Sequential(
            nn.Conv2d(5, hidden, kernel_size=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, hidden, kernel_size=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, 1, kernel_size=1),
        )

    def forward(self, d0: Tensor, d1: Tensor) -> Tensor:
        """``d0``, ``d1``: (B,) distances ref-p0, ref-p1 -> (B,) float logits of P(p1 judged closer)."""
        e = self.eps
        x = torch.stack([d0, d1, d0 - d1, d0 / (d1 + e), d1 / (d0 + e)], dim=1)  # (B, 5)
        return self.model(x[:, :, None, None]).view(-1)

    def loss(self, d0: Tensor, d1: Tensor, judge: Tensor) -> Tensor:
        """Mean BCE between G(d0, d1) and ``judge`` (B,) in [0, 1], the fraction of people who chose p1."""
        logits = self(d0, d1)
        return nn.functional.binary_cross_entropy_with_logits(logits, judge.to(logits.dtype))
