"""The demo's engine: models loaded once, one request's settings, image files in, exact PNG files out.

No web framework here: the page (``invsr_pl.demo.app``) only turns form values into :class:`Settings`, calls
:meth:`Upscaler.upscale_file` / :meth:`Upscaler.upscale_batch` and shows what they return. Every request is
costed from the image header and its settings and refused in one line when it exceeds the
:class:`~invsr_pl.demo.budget.RequestBudget`, before any pixel is decoded; a running job obeys a
:class:`~invsr_pl.demo.stopping.StopSwitch` (cancel, ``max_job_seconds``). Every image is read
with ``read_image`` (EXIF orientation, ICC to sRGB, alpha and 16-bit kept), super-resolved by
:class:`~invsr_pl.pipelines.InvSRPipeline`, the project's one inference path (one generator per image seeded
with the request's seed, alpha upscaled with plain bicubic and re-attached, the OOM fallback), and written
with ``write_image`` at the input's bit depth (docs/sampling.md).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from invsr_pl.demo.budget import RequestBudget, RequestCost, request_cost
from invsr_pl.demo.errors import RequestError, visitor_message
from invsr_pl.demo.stopping import JobCancelled, JobTimeout, NetworkStops, StopSwitch
from invsr_pl.models import timesteps as ts
from invsr_pl.pipelines import InvSRPipeline
from invsr_pl.sampling.color_fix import COLOR_FIX_METHODS
from invsr_pl.sampling.oom import OutOfMemoryFallbackError
from invsr_pl.sampling.sampler import InvSRSampler
from invsr_pl.utils.atomic import atomic_write
from invsr_pl.utils.images import ImageReadError, output_name, read_image, resize_image, write_image
from invsr_pl.utils.seeding import DEFAULT_SEED

__all__ = ["SEED_MAX", "BatchResult", "RequestError", "Result", "Settings", "Upscaler", "batch_names"]

_REQUEST_PREFIX = "req-"  # request folders under the work folder (pruned after keep_seconds)
# torch.Generator.manual_seed takes seeds up to 2**64 - 1 (and wraps negatives); beyond that it overflows
SEED_MAX = 2**64 - 1


def _whole(name: str, value: object, low: int, high: int) -> int:
    """``value`` (an int, a float holding one, or such text: what a form or API caller sends) as an int in
    ``[low, high]``; :class:`RequestError` otherwise (never an overflow)."""
    number = value
    if isinstance(value, str):
        text = value.strip()
        try:
            number = int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                number = None
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int):
        raise RequestError(f"{name} must be a whole number, got {value!r}")
    if not low <= number <= high:
        raise RequestError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return number


@dataclass(frozen=True)
class Settings:
    """One request's sampling settings: the page's controls.

    Attributes:
        steps: number of sampling steps with the paper's schedule (docs/conventions.md), 1-5.
        timesteps: explicit strictly descending user timesteps (e.g. ``(200, 100)``); override ``steps``.
        chopping_size: LR patch size, a multiple of the sampler's modulus; 0: the whole image in one pass.
        color_fix: one of ``COLOR_FIX_METHODS``.
        seed: seed of each image's noise draws (equal seeds give equal outputs), 0 to :data:`SEED_MAX`.
    """

    steps: int = 1
    timesteps: tuple[int, ...] | None = None
    chopping_size: int = 128
    color_fix: str = "none"
    seed: int = DEFAULT_SEED

    @classmethod
    def from_form(
        cls,
        steps: float | None = 1,
        timesteps: str | None = "",
        chopping_size: float | None = 128,
        color_fix: str | None = "none",
        seed: float | None = DEFAULT_SEED,
    ) -> Settings:
        """Settings from the page's (or an API caller's) raw values; :class:`RequestError` on bad ones.

        ``timesteps`` is text such as ``"200, 100"``; empty means "use ``steps``". Values arrive as the
        caller sent them (the API takes any JSON), so every type and range is checked here.
        """
        if timesteps is not None and not isinstance(timesteps, str):
            raise RequestError(f"timesteps must be text such as 200,100, got {timesteps!r}")
        text = (timesteps or "").replace(" ", "")
        parsed: tuple[int, ...] | None = None
        if text:
            if text.count(",") >= ts.NUM_TRAIN_TIMESTEPS:  # before parsing a huge text
                raise RequestError(
                    f"timesteps: {text.count(',') + 1} values given; there are only {ts.NUM_TRAIN_TIMESTEPS}"
                )
            try:
                parsed = tuple(ts.validate_timesteps([int(v) for v in text.split(",") if v]))
            except ValueError as err:
                shown = timesteps if len(timesteps) <= 40 else timesteps[:37] + "..."
                raise RequestError(f"timesteps {shown!r}: {err} (expected e.g. 200,100)") from err
        if parsed is None:
            steps = _whole("steps", steps, 1, 5)
        else:  # ignored, but still a number
            steps = _whole("steps", steps, 0, ts.NUM_TRAIN_TIMESTEPS)
        chopping_size = _whole("chopping size", chopping_size, 0, 2**31 - 1)
        seed = _whole("seed", seed, 0, SEED_MAX)
        color_fix = color_fix or "none"
        if not isinstance(color_fix, str) or color_fix not in COLOR_FIX_METHODS:
            raise RequestError(f"colour fix must be one of {', '.join(COLOR_FIX_METHODS)}, got {color_fix!r}")
        return cls(steps, parsed, chopping_size, color_fix, seed)


@dataclass(frozen=True)
class Result:
    """One super-resolved image.

    Attributes:
        path: the exact output PNG (input bit depth, alpha kept), named as ``invsr-sr`` names it by default:
            ``<stem>.png``.
        before: 8-bit preview of the input, bicubic to the output size (or ``preview``'s size), for a
            before/after slider; None when previews were not asked for.
        after: the output at the preview size (``path`` itself when it is small enough); None likewise.
        input_size / output_size: (width, height) in pixels.
        bit_depth: 8 or 16; has_alpha: whether an alpha channel was carried through.
        timesteps: the user timesteps actually used; seconds: wall time from reading to the written file.
    """

    path: Path
    before: Path | None
    after: Path | None
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    bit_depth: int
    has_alpha: bool
    timesteps: tuple[int, ...]
    settings: Settings
    seconds: float

    def describe(self) -> str:
        """One line: sizes, time and the settings used (for the page)."""
        (w, h), (ow, oh), s = self.input_size, self.output_size, self.settings
        chop = f"chopping {s.chopping_size}" if s.chopping_size else "no chopping"
        kind = f"{self.bit_depth}-bit {'RGBA' if self.has_alpha else 'RGB'}"
        steps = ",".join(str(t) for t in self.timesteps)
        return (
            f"{w}x{h} -> {ow}x{oh} {kind} PNG in {self.seconds:.2f} s; {len(self.timesteps)} step(s) "
            f"(timesteps {steps}), {chop}, colour fix {s.color_fix}, seed {s.seed}"
        )


@dataclass
class BatchResult:
    """A batch: the zip of the written PNGs (None when nothing succeeded) and ``(file name, reason)`` per
    failed file."""

    zip_path: Path | None
    written: list[Result] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        total = len(self.written) + len(self.failed)
        return f"{len(self.written)} of {total} image(s) super-resolved in {self.seconds:.1f} s" + (
            f"; {len(self.failed)} failed (listed below)" if self.failed else ""
        )


def batch_names(paths: Sequence[Path]) -> list[str]:
    """The output name of each file of a batch: ``invsr-sr``'s rule (``output_name``), so ``<stem>.png``, and
    ``<stem>_<ext>.png`` for every file whose stem others share with another extension (``a.jpg``,
    ``a.png``); uploads of one name (from different folders) become ``<stem>_2.png``, ``<stem>_3.png`` ...
    Names are compared case-insensitively (a zip is unpacked on such file systems too)."""
    exts: dict[str, set[str]] = {}
    for p in paths:
        exts.setdefault(p.stem.casefold(), set()).add(p.suffix.lower())
    names: list[str] = []
    taken: set[str] = set()
    for p in paths:
        shared = len(exts[p.stem.casefold()]) > 1
        stem = f"{p.stem}_{p.suffix.lstrip('.').lower()}" if shared else p.stem
        name, n = output_name(stem), 1
        while name.casefold() in taken:
            n += 1
            name = output_name(f"{stem}_{n}")
        taken.add(name.casefold())
        names.append(name)
    return names


class Upscaler:
    """The loaded models and everything a request needs; one instance per demo process.

    Args:
        backbone: the frozen backbone (any family, or a tiny twin) on ``device`` (from
            ``invsr_pl.cli.sr.build_models``).
        noise_predictor: fp32 noise predictor on ``device``; its ``scale`` is the SR factor.
        device: where the networks run; each image's generator lives there (as in ``invsr-sr``).
        smoke: the networks are tiny smoke-mode ones, not InvSR weights (stated on the page).
        backbone_name / weights_name: what the page states as the backbone and noise-predictor weights.
        chopping_batch: patches per network call.
        max_megapixels: largest input accepted (width x height / 1e6), checked before decoding.
        max_steps / max_patches / max_work: the per-image budget (:class:`RequestBudget`); None: the
            default for ``max_megapixels`` (:meth:`RequestBudget.for_size_limit`).
        max_job_seconds: wall-clock limit of one job (a single image or a whole batch); a job past it is
            stopped at its next network call and reported; None: no limit.
        preview_max_side: longest side of the slider previews; the download is always full size.
        workdir: folder for outputs (a fresh temporary folder by default, removed by :meth:`close`).
        keep_seconds: request folders older than this are removed when a new request starts.
    """

    def __init__(
        self,
        backbone: nn.Module,
        noise_predictor: nn.Module | None,
        device: torch.device | str,
        *,
        smoke: bool = False,
        backbone_name: str = "",
        weights_name: str = "",
        chopping_batch: int = 8,
        max_megapixels: float = 4.0,
        max_steps: int | None = None,
        max_patches: int | None = None,
        max_work: float | None = None,
        max_job_seconds: float | None = 300.0,
        preview_max_side: int = 2048,
        workdir: str | Path | None = None,
        keep_seconds: float = 3600.0,
    ) -> None:
        if max_megapixels <= 0 or preview_max_side < 1 or chopping_batch < 1:
            raise ValueError("max_megapixels must be > 0, preview_max_side and chopping_batch >= 1")
        if max_job_seconds is not None and not max_job_seconds > 0:
            raise ValueError(f"max_job_seconds must be > 0 or None, got {max_job_seconds}")
        self.backbone = backbone
        self.noise_predictor = noise_predictor
        self.device = torch.device(device)
        self.smoke = smoke
        self.backbone_name = backbone_name
        self.weights_name = weights_name
        self.chopping_batch = chopping_batch
        self.max_megapixels = max_megapixels
        self.budget = RequestBudget.for_size_limit(max_megapixels, max_steps, max_patches, max_work)
        self.max_job_seconds = max_job_seconds
        self.preview_max_side = preview_max_side
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="invsr-demo-") if workdir is None else workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keep_seconds = keep_seconds
        # the one inference path (issue 19) on the loaded modules; a bar per image is noise in a server log
        self.pipeline = InvSRPipeline.from_backbone(backbone, noise_predictor)
        self.pipeline.set_progress_bar_config(disable=True)
        probe = InvSRSampler(backbone, noise_predictor, chopping_size=None)
        self.scale: int = probe.scale
        self.modulus: int = probe.modulus  # chopping sizes must be multiples of it
        self._stops = NetworkStops(backbone, noise_predictor)  # jobs stop at their next network call

    # ------------------------------------------------------------------ page facts

    def describe(self) -> str:
        """Markdown lines stating the backbone, weights, dtype and device (and smoke mode)."""
        device = str(self.device)
        if self.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(self.device)})"
        dtype = str(getattr(self.backbone, "dtype", "")).removeprefix("torch.")
        lines = [
            f"**Backbone** `{self.backbone_name}` ({dtype}) · **Noise predictor** `{self.weights_name}` · "
            f"**Device** `{device}` · **Scale** x{self.scale}"
        ]
        if self.smoke:
            lines.append(
                "**Smoke mode**: tiny networks and a random tiny noise predictor (a tiny `--backbone` "
                "without `--noise-predictor`), no download; the outputs only prove that the whole path runs."
            )
        return "\n\n".join(lines)

    def describe_limits(self) -> str:
        """One line stating the size limit, the per-image budget and the job time limit."""
        b = self.budget
        limit = f"; a job stops after {self.max_job_seconds:g} s" if self.max_job_seconds else ""
        return (
            f"Inputs up to {self.max_megapixels:g} MP; per image at most {b.max_steps} timesteps, "
            f"{b.max_patches} patches and {b.max_work:g} megapixel-steps of work{limit}."
        )

    # ------------------------------------------------------------------ requests

    def sampler(self, settings: Settings) -> InvSRSampler:
        """The sampler the request's settings describe: their check (:class:`RequestError` in one line), the
        schedule and the chopping the cost is counted from. Cheap: it holds references to the networks;
        the pipeline builds its own from the same settings."""
        try:
            return InvSRSampler(
                self.backbone,
                self.noise_predictor,
                num_steps=settings.steps,
                timesteps=settings.timesteps,
                chopping_size=settings.chopping_size or None,
                chopping_batch=self.chopping_batch,
                color_fix=settings.color_fix,
            )
        except ValueError as err:
            raise RequestError(str(err)) from err

    def new_switch(self) -> StopSwitch:
        """A :class:`StopSwitch` for one job with this demo's time limit (its clock starts now)."""
        return StopSwitch(self.max_job_seconds)

    def cost(self, size: tuple[int, int], sampler: InvSRSampler) -> RequestCost:
        """The cost of one ``(width, height)`` image with the request's sampler settings."""
        return request_cost(*size, len(sampler.timesteps), sampler.chopping_size, self.modulus)

    def check_request(self, path: str | Path, sampler: InvSRSampler) -> tuple[int, int]:
        """(width, height) of an image file from its header, when the file is an image within the size
        limit and its cost within the budget; :class:`RequestError` in one line otherwise. No decoding."""
        size = self.check_size(path)
        refusal = self.budget.refusal(self.cost(size, sampler))
        if refusal is not None:
            raise RequestError(f"{Path(path).name}: {refusal}")
        return size

    def check_size(self, path: str | Path) -> tuple[int, int]:
        """(width, height) of an image file from its header, before any decoding; :class:`RequestError`
        when the file is not an image or is larger than ``max_megapixels``."""
        name = Path(path).name
        try:
            with Image.open(path) as im:
                width, height = im.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            # Pillow's "cannot identify image file '<server path>'" says nothing the first part does not
            detail = "" if isinstance(err, UnidentifiedImageError) else f": {visitor_message(str(err))}"
            raise RequestError(f"{name} is not a readable image (png, jpg, bmp, webp, tif){detail}") from err
        megapixels = width * height / 1e6
        if megapixels > self.max_megapixels:
            raise RequestError(
                f"{name} is {width}x{height} ({megapixels:.1f} MP); this demo accepts images up to "
                f"{self.max_megapixels:g} MP (the x{self.scale} result of such an image would be "
                f"{self.scale**2 * megapixels:.0f} MP). Crop or downscale it, or run invsr-sr on it."
            )
        return width, height

    def new_request_dir(self) -> Path:
        """A fresh folder under ``workdir`` for one request; removes request folders older than
        ``keep_seconds`` (the page has served them long ago)."""
        now = time.time()
        for old in self.workdir.glob(f"{_REQUEST_PREFIX}*"):  # only folders this class made
            if old.is_dir() and now - old.stat().st_mtime > self.keep_seconds:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=_REQUEST_PREFIX, dir=self.workdir))

    def upscale_file(
        self,
        path: str | Path,
        settings: Settings,
        out_path: str | Path | None = None,
        previews: bool = True,
        stop: StopSwitch | None = None,
    ) -> Result:
        """Super-resolve one image file into an exact PNG (``out_path`` or ``<new dir>/<stem>.png``, the
        ``invsr-sr`` default name).

        Args:
            stop: the job's switch (cancel, time limit); default: a fresh :meth:`new_switch`.

        Raises:
            RequestError: bad settings, not an image, too large, over budget, or out of memory; its
                subclasses :class:`~invsr_pl.demo.stopping.JobCancelled` / ``JobTimeout`` when ``stop``
                stopped the job. Messages are one line without server paths.
        """
        start = time.perf_counter()
        stop = self.new_switch() if stop is None else stop
        path = Path(path)
        sampler = self.sampler(settings)
        self.check_request(path, sampler)  # header only: nothing decoded for a refused request
        try:
            with self._stops.watching(stop):
                image, alpha, bit_depth = read_image(path)
        except ImageReadError as err:
            raise RequestError(visitor_message(str(err))) from err  # "cannot read image <name>: why"
        if out_path is None:
            out_path = self.new_request_dir() / output_name(path.stem)
        out_path = Path(out_path)
        try:
            # the one inference path (issue 19): a fresh generator per image seeded with the request's seed,
            # the OOM fallback of invsr-sr (halve the chopping batch, then the size, and retry), alpha
            # upscaled bicubic and re-attached
            with self._stops.watching(stop):
                out = self.pipeline(
                    image if alpha is None else torch.cat([image, alpha]),
                    num_inference_steps=None if settings.timesteps else settings.steps,
                    timesteps=settings.timesteps,
                    chopping_size=settings.chopping_size,
                    chopping_batch_size=self.chopping_batch,
                    color_fix=settings.color_fix,
                    generator=settings.seed,
                    output_type="pt",
                ).images[0]  # (3 or 4, s*h, s*w) float32 in [0, 1], on the CPU
        except OutOfMemoryFallbackError as err:
            raise RequestError(f"{path.name}: {visitor_message(str(err))}") from err
        sr, alpha = (out, None) if alpha is None else (out[:3], out[3:])
        write_image(out_path, sr, alpha, bit_depth=bit_depth)
        before = after = None
        if previews:
            before, after = self._previews(image, alpha, sr, out_path)
        h, w = image.shape[-2:]
        return Result(
            path=out_path,
            before=before,
            after=after,
            input_size=(w, h),
            output_size=(sr.shape[-1], sr.shape[-2]),
            bit_depth=bit_depth,
            has_alpha=alpha is not None,
            timesteps=tuple(sampler.timesteps),
            settings=settings,
            seconds=time.perf_counter() - start,
        )

    def upscale_batch(
        self,
        paths: Sequence[str | Path],
        settings: Settings,
        progress: Callable[[int, int, str], None] | None = None,
        stop: StopSwitch | None = None,
    ) -> BatchResult:
        """Super-resolve several files; each failure is recorded with its reason and the rest go on.

        Every file is checked first (header, size, budget: no decoding), so unreadable and over-budget
        files are listed before any work. ``progress(i, n, name)`` is called before file ``i`` (0-based)
        of the ``n`` that passed. The PNGs are zipped under ``invsr-sr``'s names (:func:`batch_names`) into
        ``invsr_x<scale>_results.zip``. ``stop`` (default: a fresh :meth:`new_switch`) covers the
        whole batch: past the time limit the running file and the rest are listed as failed and what was
        written is zipped.

        Raises:
            RequestError: bad settings (for the whole batch, once).
            JobCancelled: the caller went away (nothing is zipped).
        """
        start = time.perf_counter()
        stop = self.new_switch() if stop is None else stop
        sampler = self.sampler(settings)  # bad settings fail the whole batch at once, not once per file
        result = BatchResult(zip_path=None)
        todo: list[Path] = []
        for path in map(Path, paths):
            try:
                self.check_request(path, sampler)
                todo.append(path)
            except RequestError as err:
                result.failed.append((path.name, str(err)))
        request_dir = self.new_request_dir()
        out_dir = request_dir / "results"
        out_dir.mkdir()
        for i, (path, name) in enumerate(zip(todo, batch_names(todo), strict=True)):
            if progress is not None:
                progress(i, len(todo), path.name)
            try:
                result.written.append(
                    self.upscale_file(path, settings, out_dir / name, previews=False, stop=stop)
                )
            except JobCancelled:
                raise
            except JobTimeout as err:  # the batch's time is spent: the rest are not started
                result.failed.append((path.name, str(err)))
                skipped = "not started: the job's time limit was reached"
                result.failed += [(p.name, skipped) for p in todo[i + 1 :]]
                break
            except RequestError as err:
                result.failed.append((path.name, str(err)))
            except Exception as err:  # noqa: BLE001 - one bad image must not stop the others; reported
                message = visitor_message(str(err))
                result.failed.append((path.name, f"{type(err).__name__}: {message}".rstrip(": ")))
        if result.written:
            result.zip_path = request_dir / f"invsr_x{self.scale}_results.zip"
            # never a half-written zip under its name; PNGs are compressed already
            with atomic_write(result.zip_path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                for r in result.written:
                    zf.write(r.path, arcname=r.path.name)
        result.seconds = time.perf_counter() - start
        return result

    def close(self) -> None:
        """Remove the stop hooks from the networks, and the work folder if this instance created it."""
        self._stops.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def _previews(self, image: Tensor, alpha: Tensor | None, sr: Tensor, out_path: Path) -> tuple[Path, Path]:
        """8-bit before (bicubic input) / after previews of equal size, long side <= ``preview_max_side``."""
        oh, ow = sr.shape[-2:]
        shrink = min(1.0, self.preview_max_side / max(oh, ow))
        size = (max(1, round(oh * shrink)), max(1, round(ow * shrink)))
        before = resize_image(image.to(sr.device), size)
        before_path = out_path.with_name(f"{out_path.stem}_before.png")
        write_image(before_path, before, None if alpha is None else resize_image(alpha, size))
        if shrink == 1.0:
            return before_path, out_path  # browsers show 8- and 16-bit PNGs alike
        after_path = out_path.with_name(f"{out_path.stem}_preview.png")
        after_alpha = None if alpha is None else F.interpolate(alpha[None], size=size, mode="area")[0]
        write_image(after_path, F.interpolate(sr[None], size=size, mode="area")[0], after_alpha)
        return before_path, after_path
