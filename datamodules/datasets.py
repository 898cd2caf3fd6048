"""Image datasets (files are decoded by ``invsr_pl.utils.images.read_image``): HR folders for training
(:class:`GTImageFolder`) and LQ/GT folders for evaluation (:class:`PairedImageFolder`).

Samples are unbatched dicts of CHW ``float32`` tensors in [0, 1]:

- ``GTImageFolder[i] -> {"gt": (3, gt_size, gt_size)}``; the LQ is synthesised later, batch-wise on the device
  (docs/data.md#degradation-pipeline "GPU degradation", done by ``SRDataModule.on_after_batch_transfer``).
- ``PairedImageFolder[i] -> {"lq": (3, h, w), "gt": (3, scale*h, scale*w), "name": str}``, or ``{"lq",
  "name"}`` when there is no GT folder (no-reference benchmarks such as RealSet80).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from datamodules.transforms import RandomCropFlip
from invsr_pl.utils.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    list_images,
    normalise_extensions,
    read_image,
)
from invsr_pl.utils.seeding import stable_seed

__all__ = [
    "IMAGE_EXTENSIONS",
    "GTImageFolder",
    "ImageSource",
    "PairedImageFolder",
    "SeededDataset",
    "image_size",
]

log = logging.getLogger(__name__)

# Header errors Pillow raises for truncated / corrupt / non-image files.
_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


# ---------------------------------------------------------------------------------------- file access
def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image from its header only (after EXIF rotation), without decoding pixels.

    Raises:
        ImageReadError: the header cannot be parsed (message names the file).
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation; 5-8 swap the axes
    except _READ_ERRORS as err:
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


# --------------------------------------------------------------------------------------------------- seeding
class SeededDataset(Dataset):
    """A dataset whose random transforms draw from its own ``torch.Generator``.

    The generator is created lazily in the process that uses it. ``SRDataModule`` calls :meth:`reseed` from
    its ``worker_init_fn`` with a seed derived from (seed, rank, worker), and in the main process when there
    are no workers. Used alone, a dataset seeds itself from ``seed`` (plus ``torch.initial_seed()`` inside a
    DataLoader worker, which PyTorch already varies per worker and epoch), so two workers never repeat each
    other's crops.
    """

    seed: int

    def reseed(self, seed: int) -> None:
        """Restart this process's random stream from ``seed``."""
        self._generator = torch.Generator().manual_seed(int(seed))

    @property
    def generator(self) -> torch.Generator:
        gen = getattr(self, "_generator", None)
        if gen is None:
            info = get_worker_info()
            parts = (self.seed, "worker", torch.initial_seed()) if info is not None else (self.seed, "main")
            self.reseed(stable_seed(*parts))
            gen = self._generator
        return gen

    def __getstate__(self) -> dict:
        # Worker processes get a fresh stream (see ``generator``), never a copy of the parent's.
        state = self.__dict__.copy()
        state["_generator"] = None
        return state


# ---------------------------------------------------------------------------------------- training set
@dataclass(frozen=True)
class ImageSource:
    """One folder (or file list) of HR training images.

    Args:
        root: folder to scan; also the base for relative paths in ``file_list``.
        file_list: text file with one image path per line (blank lines and ``#`` comments ignored); its order
            is kept. Relative paths resolve against ``root`` if given, else the list file's folder.
        length: keep only the first ``length`` images after sorting (the paper uses the first 20,000 FFHQ
            images, docs/data.md#degradation-pipeline); ``None`` keeps all.
        recursive: scan sub-folders too (FFHQ keeps its images in 1000-image sub-folders).
        extensions: accepted suffixes, case-insensitive.
        pattern: optional glob on the POSIX path relative to ``root`` (``fnmatch``, ``*`` also crosses
            ``/``), e.g. ``"0000*/*.png"``; applied before ``length``.
        repeat: integer sampling weight: each image appears ``repeat`` times per epoch.
    """

    root: str | None = None
    file_list: str | None = None
    length: int | None = None
    recursive: bool = True
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    pattern: str | None = None
    repeat: int = 1

    def __post_init__(self) -> None:
        if self.root is None and self.file_list is None:
            raise ValueError("an image source needs a root folder or a file_list")
        if self.length is not None and self.length < 1:
            raise ValueError(f"length must be >= 1 or None, got {self.length}")
        if self.repeat < 1:
            raise ValueError(f"repeat must be an integer >= 1, got {self.repeat}")
        object.__setattr__(self, "extensions", normalise_extensions(self.extensions))

    @classmethod
    def coerce(cls, spec: ImageSource | Mapping | str | os.PathLike) -> ImageSource:
        """Accept an ``ImageSource``, a mapping with its field names (Hydra YAML), or a bare folder path."""
        if isinstance(spec, ImageSource):
            return spec
        if isinstance(spec, (str, os.PathLike)):
            return cls(root=str(spec))
        if isinstance(spec, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = set(spec) - known - {"_target_"}
            if unknown:
                raise ValueError(
                    f"unknown image source keys {sorted(unknown)}; expected some of {sorted(known)}"
                )
            kwargs = {k: spec[k] for k in known if k in spec}
            if "extensions" in kwargs:
                kwargs["extensions"] = tuple(kwargs["extensions"])
            return cls(**kwargs)
        raise TypeError(f"cannot make an ImageSource from {type(spec).__name__}")

    def files(self) -> list[Path]:
        """The selected files, in order, before ``repeat``. Raises ``FileNotFoundError`` if none are found."""
        if self.file_list is not None:
            list_path = Path(self.file_list).expanduser()
            if not list_path.is_file():
                raise FileNotFoundError(f"image file list not found: {list_path}")
            base = Path(self.root).expanduser() if self.root is not None else list_path.parent
            lines = (ln.strip() for ln in list_path.read_text(encoding="utf-8").splitlines())
            files = [base / ln for ln in lines if ln and not ln.startswith("#")]
        else:
            files = list_images(self.root, recursive=self.recursive, extensions=self.extensions)
            if self.pattern is not None:
                root = Path(self.root).expanduser()
                files = [
                    p for p in files if fnmatch.fnmatchcase(p.relative_to(root).as_posix(), self.pattern)
                ]
        if self.length is not None:
            files = files[: self.length]
        if not files:
            raise FileNotFoundError(
                f"no images with suffix {self.extensions} in {self.file_list or self.root}"
            )
        return files


class GTImageFolder(SeededDataset):
    """HR training images from one or more sources, as random ``gt_size`` crops.

    See docs/data.md#training-images.

    Per sample: decode, horizontal flip with probability ``hflip_prob``, random ``gt_size`` crop; a side
    shorter than ``gt_size`` is reflect-padded bottom/right (cv2 BORDER_REFLECT_101). No resize, no rotation.

    A file that cannot be decoded is skipped with a warning and a running count (:attr:`num_skipped`, per
    process), and the next index (``i + 1``, wrapping) is used instead, so a bad file never stops an epoch;
    after ``max_consecutive_skips`` failures in a row the error is raised, since then the data itself is
    broken.

    Args:
        sources: :class:`ImageSource` objects, mappings of their fields (YAML), or folder paths.
        gt_size: crop side in pixels (512 in the paper).
        hflip_prob: left-right flip probability (0.5 in the paper).
        seed: seed of the crop/flip stream when the dataset is used without ``SRDataModule``.
        max_consecutive_skips: unreadable files tolerated in a row for one sample.

    Item: ``{"gt": (3, gt_size, gt_size) float32 in [0, 1]}``.
    """

    def __init__(
        self,
        sources: Sequence[ImageSource | Mapping | str],
        gt_size: int = 512,
        hflip_prob: float = 0.5,
        seed: int = 0,
        max_consecutive_skips: int = 20,
    ) -> None:
        if isinstance(sources, (str, os.PathLike, Mapping, ImageSource)):
            sources = [sources]
        self.sources = [ImageSource.coerce(s) for s in sources]
        if not self.sources:
            raise ValueError("GTImageFolder needs at least one image source")
        self.files: list[Path] = []
        self.source_sizes: list[int] = []  # per source, after length and repeat
        for src in self.sources:
            files = src.files() * src.repeat
            self.files.extend(files)
            self.source_sizes.append(len(files))
        self.transform = RandomCropFlip(gt_size, hflip_prob)
        self.gt_size = int(gt_size)
        self.seed = int(seed)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        n = len(self.files)
        for attempt in range(self.max_consecutive_skips + 1):
            path = self.files[(index + attempt) % n]
            try:
                img = read_image(path).image  # (3, H, W) float32 in [0, 1]
            except ImageReadError as err:
                if attempt == self.max_consecutive_skips:
                    raise ImageReadError(
                        f"{self.max_consecutive_skips + 1} unreadable training images in a row from "
                        f"index {index}; last: {err}"
                    ) from err
                self.num_skipped += 1
                log.warning(
                    "skipping unreadable training image (%d skipped so far): %s", self.num_skipped, err
                )
                continue
            return {"gt": self.transform(img, self.generator)}
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        return f"GTImageFolder({len(self)} images from {len(self.sources)} sources, {self.transform})"


# ---------------------------------------------------------------------------------------- paired sets
def _index_by_name(root: Path, recursive: bool, extensions: tuple[str, ...]) -> dict[str, Path]:
    """name (relative path without suffix, POSIX) -> file; two files with one name is an error."""
    index: dict[str, Path] = {}
    for path in list_images(root, recursive=recursive, extensions=extensions):
        name = path.relative_to(root).with_suffix("").as_posix()
        if name in index:
            raise ValueError(
                f"two images share the name {name!r} in {root}: {index[name].name} and {path.name}"
            )
        index[name] = path
    return index


def _describe(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class PairedImageFolder(Dataset):
    """LQ images matched by name to GT images that are exactly ``scale`` times larger, or LQ images alone.

    Names are file paths relative to the folder without the suffix, so ``lq/0001.png`` pairs with
    ``gt/0001.jpg``. At construction the names are matched (a missing partner or an empty folder is an error
    that names the files); with ``check_sizes`` every header is read too (cheap: no pixel decoding), so a
    wrong size or an unreadable header fails before evaluation starts. Sizes are checked again at load, and
    decode errors name the file. :meth:`validate` with ``decode=True`` decodes everything up front.

    Args:
        lq_dir: folder of LQ images.
        gt_dir: folder of GT images, or ``None`` for a no-reference set.
        scale: GT side / LQ side (4 for InvSR).
        extensions: accepted suffixes, case-insensitive.
        recursive: include sub-folders (names then contain ``/``).
        limit: keep the first ``limit`` names in sorted order (e.g. 16 validation images,
            docs/data.md#validation-set); ``None`` keeps all.
        check_sizes: read every header at construction to check sizes and readability.

    Item: ``{"lq": (3, h, w), "gt": (3, scale*h, scale*w), "name": str}`` (``float32`` in [0, 1]); no
    ``"gt"`` key when ``gt_dir`` is ``None``.
    """

    def __init__(
        self,
        lq_dir: str,
        gt_dir: str | None = None,
        scale: int = 4,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        recursive: bool = False,
        limit: int | None = None,
        check_sizes: bool = True,
    ) -> None:
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        exts = normalise_extensions(extensions)
        self.lq_dir = Path(lq_dir).expanduser()
        self.gt_dir = Path(gt_dir).expanduser() if gt_dir is not None else None
        self.scale = int(scale)
        lq = _index_by_name(self.lq_dir, recursive, exts)
        if not lq:
            raise FileNotFoundError(f"no images with suffix {exts} in LQ folder {self.lq_dir}")
        self.lq_files = lq
        self.gt_files: dict[str, Path] | None = None
        if self.gt_dir is not None:
            gt = _index_by_name(self.gt_dir, recursive, exts)
            no_gt = sorted(set(lq) - set(gt))
            no_lq = sorted(set(gt) - set(lq))
            if no_gt:
                raise FileNotFoundError(
                    f"no GT image in {self.gt_dir} for LQ image(s) {_describe([lq[n].name for n in no_gt])}"
                )
            if no_lq:
                raise FileNotFoundError(
                    f"no LQ image in {self.lq_dir} for GT image(s) {_describe([gt[n].name for n in no_lq])}"
                )
            self.gt_files = gt
        self.names = sorted(lq)[:limit]
        if check_sizes:
            self.validate(decode=False)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def has_gt(self) -> bool:
        return self.gt_files is not None

    def _check_pair(self, name: str, lq_hw: tuple[int, int], gt_hw: tuple[int, int]) -> None:
        want = (lq_hw[0] * self.scale, lq_hw[1] * self.scale)
        if gt_hw != want:
            raise ValueError(
                f"GT {self.gt_files[name]} is {gt_hw[0]}x{gt_hw[1]} but LQ {self.lq_files[name]} is "
                f"{lq_hw[0]}x{lq_hw[1]}; with scale {self.scale} the GT must be {want[0]}x{want[1]}"
            )

    def validate(self, decode: bool = False) -> None:
        """Check every file of the selected names: readable header (or full decode) and GT = scale x LQ.

        Raises:
            ImageReadError / ValueError: on the first bad file, naming it.
        """
        for name in self.names:
            if decode:
                lq_hw = tuple(read_image(self.lq_files[name]).image.shape[-2:])
                gt_hw = tuple(read_image(self.gt_files[name]).image.shape[-2:]) if self.has_gt else None
            else:
                lq_hw = image_size(self.lq_files[name])
                gt_hw = image_size(self.gt_files[name]) if self.has_gt else None
            if gt_hw is not None:
                self._check_pair(name, lq_hw, gt_hw)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        name = self.names[index]
        lq = read_image(self.lq_files[name]).image
        item: dict[str, Tensor | str] = {"lq": lq, "name": name}
        if self.gt_files is not None:
            gt = read_image(self.gt_files[name]).image
            self._check_pair(name, tuple(lq.shape[-2:]), tuple(gt.shape[-2:]))
            item["gt"] = gt
        return item

    def __repr__(self) -> str:
        gt = f", gt_dir={str(self.gt_dir)!r}" if self.gt_dir is not None else ""
        return f"PairedImageFolder({len(self)} images, lq_dir={str(self.lq_dir)!r}{gt}, scale={self.scale})"
