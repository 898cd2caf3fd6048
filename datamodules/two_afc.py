"""2AFC perceptual-judgment data (BAPPS layout) to train and score the latent LPIPS (docs/latent_lpips.md).

A 2AFC triplet is a reference patch, two distorted versions of it, and the fraction of people who judged the
second one (p1) closer to the reference. On disk (the public BAPPS layout)::

    <root>/2afc/<split>/<category>/ref/<stem>.png
                                  /p0/<stem>.png
                                  /p1/<stem>.png
                                  /judge/<stem>.npy      # one float in [0, 1]: the fraction preferring p1

``split`` is ``train`` or ``val``; BAPPS' categories are ``traditional``, ``cnn``, ``mix`` (train) and
``traditional``, ``cnn``, ``superres``, ``deblur``, ``color``, ``frameinterp`` (val). Every dataset item is

    {"ref", "p0", "p1": (3, P, P) float32 in [0, 1], "judge": () float32 in [0, 1],
     "category": () int64 index into ``dataset.categories``, "name": "<category>/<stem>"}

and :class:`TwoAFCDataModule` batches them (``judge`` and ``category`` become (B,) tensors).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from invsr_pl.utils.batching import derive_batch
from invsr_pl.utils.images import list_images, read_image, write_image
from invsr_pl.utils.seeding import stable_seed

__all__ = [
    "PATCH_PARTS",
    "TwoAFCDataModule",
    "TwoAFCFolder",
    "TwoAFCLayoutError",
    "write_two_afc_tree",
]

PATCH_PARTS = ("ref", "p0", "p1")
_LAYOUT = "<root>/2afc/{train,val}/<category>/{ref,p0,p1}/<stem>.png and .../<category>/judge/<stem>.npy"


class TwoAFCLayoutError(FileNotFoundError):
    """The folder does not have the BAPPS 2AFC layout; the message says what is missing and what is wanted."""


def _describe(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _split_dir(root: Path, split: str) -> Path:
    """``root/2afc/<split>`` (root = the BAPPS folder) or ``root/<split>`` (root = its ``2afc`` folder)."""
    if not root.is_dir():
        raise TwoAFCLayoutError(f"2AFC folder not found: {root} (expected {_LAYOUT})")
    for candidate in (root / "2afc" / split, root / split):
        if candidate.is_dir():
            return candidate
    base = root / "2afc" if (root / "2afc").is_dir() else root
    found = sorted(p.name for p in base.iterdir() if p.is_dir())
    raise TwoAFCLayoutError(
        f"no {split!r} split under {base} (found folders: {_describe(found) or 'none'}); expected {_LAYOUT}"
    )


class TwoAFCFolder(Dataset):
    """A BAPPS-layout 2AFC split on disk (see the module docstring for the layout and the item format).

    Args:
        root: the BAPPS folder (holding ``2afc/``) or its ``2afc`` folder.
        split: ``"train"`` or ``"val"`` (any sub-folder name of ``2afc`` works).
        categories: categories to read, in this order; ``None`` = every sub-folder of the split, sorted.
        patch_size: side of the patches fed to the model. Patches of another size are resized to it
            (bilinear, antialiased), as the LPIPS reference loader resizes every patch to 64.

    Raises:
        TwoAFCLayoutError: a missing split, category or ``ref``/``p0``/``p1``/``judge`` folder, an empty
            category, or files whose stems do not match across the four folders (the message names them).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        categories: Sequence[str] | None = None,
        patch_size: int = 64,
    ) -> None:
        if patch_size < 8:
            raise ValueError(f"patch_size must be >= 8, got {patch_size}")
        self.root = Path(root).expanduser()
        self.split = str(split)
        self.patch_size = int(patch_size)
        split_dir = _split_dir(self.root, self.split)
        available = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if categories is None:
            categories = available
        missing = [c for c in categories if c not in available]
        if missing or not categories:
            raise TwoAFCLayoutError(
                f"{split_dir}: categories {missing or '(none)'} not found; available: "
                f"{_describe(available) or 'none'} (expected {_LAYOUT})"
            )
        self.categories: list[str] = [str(c) for c in categories]
        self.items: list[tuple[int, str]] = []  # (category index, stem)
        self._dirs: list[Path] = []
        for index, category in enumerate(self.categories):
            folder = split_dir / category
            stems = self._category_stems(folder)
            self._dirs.append(folder)
            self.items.extend((index, stem) for stem in stems)

    @staticmethod
    def _category_stems(folder: Path) -> list[str]:
        absent = [part for part in (*PATCH_PARTS, "judge") if not (folder / part).is_dir()]
        if absent:
            raise TwoAFCLayoutError(f"{folder}: missing sub-folder(s) {absent}; expected {_LAYOUT}")
        stems = {part: {p.stem for p in list_images(folder / part)} for part in PATCH_PARTS}
        stems["judge"] = {p.stem for p in (folder / "judge").iterdir() if p.suffix == ".npy"}
        ref = stems["ref"]
        if not ref:
            raise TwoAFCLayoutError(f"{folder}/ref holds no images; expected {_LAYOUT}")
        for part in ("p0", "p1", "judge"):
            if stems[part] != ref:
                lacking = sorted(ref - stems[part])
                extra = sorted(stems[part] - ref)
                raise TwoAFCLayoutError(
                    f"{folder}: {part}/ does not match ref/ ({len(stems[part])} vs {len(ref)} files; "
                    f"missing in {part}/: {_describe(lacking) or 'none'}; "
                    f"not in ref/: {_describe(extra) or 'none'})"
                )
        return sorted(ref)

    def __len__(self) -> int:
        return len(self.items)

    def _patch(self, folder: Path, stem: str) -> Tensor:
        matches = [
            p for p in folder.glob(f"{stem}.*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")
        ]
        image = read_image(sorted(matches)[0]).image  # (3, H, W) float32 in [0, 1]
        if image.shape[-2:] != (self.patch_size, self.patch_size):
            image = F.interpolate(
                image[None], size=(self.patch_size, self.patch_size), mode="bilinear", antialias=True
            )[0].clamp(0, 1)
        return image

    def _judge(self, path: Path) -> Tensor:
        value = np.load(path, allow_pickle=False)
        if value.size != 1 or not np.isfinite(value).all() or not 0.0 <= float(value.reshape(-1)[0]) <= 1.0:
            raise ValueError(f"{path}: a judgment must be one number in [0, 1], got {value!r}")
        return torch.tensor(float(value.reshape(-1)[0]), dtype=torch.float32)

    def __getitem__(self, index: int) -> dict[str, Any]:
        category, stem = self.items[index]
        folder = self._dirs[category]
        item: dict[str, Any] = {part: self._patch(folder / part, stem) for part in PATCH_PARTS}
        item["judge"] = self._judge(folder / "judge" / f"{stem}.npy")
        item["category"] = torch.tensor(category, dtype=torch.int64)
        item["name"] = f"{self.categories[category]}/{stem}"
        return item

    def __repr__(self) -> str:
        return f"TwoAFCFolder({self.root}, split={self.split!r}, {len(self)} triplets, {self.categories})"


def write_two_afc_tree(dataset: Dataset, root: str | os.PathLike, split: str) -> Path:
    """Write a 2AFC dataset (any with this module's item format and ``categories``) in the BAPPS layout.

    Patches become 8-bit PNGs, judgments ``float32`` ``.npy`` arrays of shape (1,). The split is written to a
    temporary folder next to its destination and renamed into place when complete, and an existing split is
    never overwritten.

    Returns:
        The written split folder ``<root>/2afc/<split>``.

    Raises:
        FileExistsError: ``<root>/2afc/<split>`` exists already.
    """
    base = Path(root).expanduser() / "2afc"
    target = base / split
    if target.exists():
        raise FileExistsError(f"{target} exists already; choose another output folder or split name")
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{split}.", dir=base))
    try:
        categories = list(dataset.categories)
        for i in range(len(dataset)):
            item = dataset[i]
            category, stem = item["name"].split("/", 1)
            if category != categories[int(item["category"])]:
                raise ValueError(
                    f"item {i}: name {item['name']!r} disagrees with category {item['category']}"
                )
            for part in PATCH_PARTS:
                write_image(staging / category / part / f"{stem}.png", item[part])
            (staging / category / "judge").mkdir(parents=True, exist_ok=True)
            np.save(
                staging / category / "judge" / f"{stem}.npy", np.array([float(item["judge"])], np.float32)
            )
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


class TwoAFCDataModule(LightningDataModule):
    """Batches of 2AFC triplets for :class:`invsr_pl.systems.latent_lpips.LatentLPIPSLitModule`.

    Args:
        train_dataset / val_dataset / test_dataset: 2AFC datasets (``TwoAFCFolder``, ``SyntheticTwoAFC``),
            each with a ``categories`` list; ``None`` for none. ``test_dataset`` ``None`` tests on
            ``val_dataset``.
        global_batch_size: triplets per optimiser step over all devices (50 in the LPIPS paper); each device
            loads ``global_batch_size / world_size`` (must divide).
        val_batch_size / test_batch_size: triplets per evaluation batch and device.
        num_workers / val_num_workers: DataLoader workers (``val_num_workers`` ``None`` = ``num_workers``).
        pin_memory / persistent_workers: DataLoader options (persistent only with workers).
        seed: seed of the training shuffle (per rank: ``stable_seed(seed, "two_afc", rank)``).
        drop_last: drop the last incomplete training batch.
    """

    def __init__(
        self,
        train_dataset: Dataset | None = None,
        val_dataset: Dataset | None = None,
        test_dataset: Dataset | None = None,
        global_batch_size: int = 50,
        val_batch_size: int = 50,
        test_batch_size: int = 50,
        num_workers: int = 4,
        val_num_workers: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if min(global_batch_size, val_batch_size, test_batch_size) < 1:
            raise ValueError("global_batch_size, val_batch_size and test_batch_size must be >= 1")
        if num_workers < 0 or (val_num_workers is not None and val_num_workers < 0):
            raise ValueError("num_workers / val_num_workers must be >= 0")
        for what, dataset in (("train", train_dataset), ("val", val_dataset), ("test", test_dataset)):
            if dataset is not None and not getattr(dataset, "categories", None):
                raise TypeError(f"{what}_dataset {dataset!r} must have a non-empty `categories` list")
        self.train_set = train_dataset
        self.val_set = val_dataset
        self.test_set = test_dataset if test_dataset is not None else val_dataset
        self.global_batch_size = int(global_batch_size)
        self.batch_size = derive_batch(self.global_batch_size, 1).per_device_batch_size
        self.val_batch_size = int(val_batch_size)
        self.test_batch_size = int(test_batch_size)
        self.num_workers = int(num_workers)
        self.val_num_workers = self.num_workers if val_num_workers is None else int(val_num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)

    def categories(self, stage: str) -> list[str]:
        """Category names of the set a stage scores (``"validate"``/``"fit"`` -> val, ``"test"`` -> test)."""
        dataset = self.test_set if stage == "test" else self.val_set
        return list(dataset.categories) if dataset is not None else []

    def setup(self, stage: str | None = None) -> None:
        world = self.trainer.world_size if self.trainer is not None else 1
        self.batch_size = derive_batch(self.global_batch_size, int(world)).per_device_batch_size
        keys = {"fit": "train_dataset", "validate": "val_dataset", "test": "test_dataset (or val_dataset)"}
        sets = {"fit": self.train_set, "validate": self.val_set, "test": self.test_set}
        if stage in sets and sets[stage] is None:
            raise ValueError(f"trainer stage {stage!r} needs 2AFC triplets: set data.{keys[stage]}")

    def _loader(self, dataset: Dataset, batch_size: int, workers: int, train: bool) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            generator=torch.Generator().manual_seed(stable_seed(self.seed, "two_afc", rank))
            if train
            else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, self.num_workers, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.val_batch_size, self.val_num_workers, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.test_batch_size, self.val_num_workers, train=False)
