"""2AFC data: the synthetic set (deterministic, human-like judgments), the BAPPS-layout reader, its errors on
a wrong tree, the writer round trip, and the data module's batches."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.samples import load_sample
from datamodules.two_afc import TwoAFCDataModule, TwoAFCFolder, TwoAFCLayoutError, write_two_afc_tree
from datamodules.two_afc_synthetic import (
    BENIGN,
    STRUCTURAL,
    SYNTHETIC_CATEGORIES,
    SyntheticTwoAFC,
    distort,
    main,
    reference_distance,
)

PARTS = ("ref", "p0", "p1")


def _small(**kwargs) -> SyntheticTwoAFC:
    defaults = {"names": ["camera", "coffee"], "num_triplets": 8, "seed": 3}
    return SyntheticTwoAFC(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticTwoAFC]:
    root = tmp_path_factory.mktemp("bapps")
    dataset = _small()
    write_two_afc_tree(dataset, root, "val")
    return root, dataset


def test_synthetic_items_are_deterministic_and_well_formed() -> None:
    a, b = _small(cache=False), _small(cache=False)
    for i in range(len(a)):
        x, y = a[i], b[i]
        for part in PARTS:
            assert x[part].shape == (3, 64, 64) and x[part].dtype == torch.float32
            assert x[part].min() >= 0 and x[part].max() <= 1
            assert torch.equal(x[part], (x[part] * 255).round() / 255)  # on the 8-bit grid, as stored PNGs
            assert torch.equal(x[part], y[part])
        assert x["judge"].shape == () and torch.equal(x["judge"], y["judge"])
        assert float(x["judge"] * 5) == round(float(x["judge"] * 5))  # multiples of 1 / num_raters
        assert int(x["category"]) == i % len(SYNTHETIC_CATEGORIES)
        assert x["name"] == f"{SYNTHETIC_CATEGORIES[i % len(SYNTHETIC_CATEGORIES)]}/{i:06d}"
    assert not torch.equal(a[0]["p0"], a[0]["p1"])


def test_cache_returns_the_synthesised_values() -> None:
    cached = _small(num_triplets=3)
    first = [cached[i] for i in range(3)]
    again = [cached[i] for i in range(3)]  # read from the cache
    fresh = [_small(num_triplets=3, cache=False)[i] for i in range(3)]
    for x, y, z in zip(first, again, fresh, strict=True):
        for key in (*PARTS, "judge"):
            assert torch.equal(x[key], y[key]) and torch.equal(x[key], z[key])


def test_other_seed_or_photos_give_other_triplets() -> None:
    base = _small()[0]["ref"]
    assert not torch.equal(base, _small(seed=4)[0]["ref"])
    assert not torch.equal(base, _small(names=["astronaut"])[0]["ref"])


@pytest.mark.parametrize("family", [*BENIGN, *STRUCTURAL])
def test_distortions_grow_with_strength(family: str) -> None:
    patch = load_sample("astronaut")[None, :, 200:264, 200:264]
    d = [
        float(reference_distance(patch, distort(patch, family, s, torch.Generator().manual_seed(0))))
        for s in (0.0, 0.5, 1.0)
    ]
    assert 0 < d[0] < d[1] < d[2]


@pytest.mark.parametrize("family", [*BENIGN, *STRUCTURAL])
def test_reference_forgives_tone_and_colour_not_structure(family: str) -> None:
    """Per unit of pixel change (RMS), the reference charges benign changes a fraction of what it charges
    noise, blur or JPEG; a pixel distance charges them all alike."""
    patch = load_sample("astronaut")[None, :, 200:264, 200:264]
    for strength in (0.3, 1.0):
        out = distort(patch, family, strength, torch.Generator().manual_seed(0))
        ratio = float(reference_distance(patch, out)) / float((out - patch).square().mean().sqrt())
        assert ratio < 0.3 if family in BENIGN else ratio > 0.9, (strength, ratio)


def test_triplets_pair_different_structural_kinds_and_one_benign_change() -> None:
    dataset = _small(num_triplets=30)
    for i in range(len(dataset)):
        category = SYNTHETIC_CATEGORIES[i % len(SYNTHETIC_CATEGORIES)]
        kinds = dataset.families(i)
        structural = [k[-1] for k in kinds]
        assert all(s in STRUCTURAL for s in structural) and structural[0] != structural[1]
        benign = [k[0] for k in kinds if len(k) == 2]
        assert benign == ([] if category == "mix" else [category])
    # p1 carries the benign change about as often as p0
    sides = [len(dataset.families(i)[1]) == 2 for i in range(len(dataset)) if i % 3 != 2]
    assert 0 < sum(sides) < len(sides)


def test_judgment_prefers_the_milder_distortion() -> None:
    dataset = _small(num_triplets=24)
    judges = []
    for i in range(len(dataset)):
        item = dataset[i]
        d = reference_distance(item["ref"].expand(2, -1, -1, -1), torch.stack([item["p0"], item["p1"]]))
        judges.append(float(item["judge"]))
        # 4 temperatures apart: each simulated rater agrees with probability 0.98
        if float(d[0] - d[1]) > 0.04:  # p1 clearly closer under the reference distance
            assert float(item["judge"]) > 0.5
        if float(d[1] - d[0]) > 0.04:
            assert float(item["judge"]) < 0.5
    assert any(0 < j < 1 for j in judges)  # soft: a panel, not one decision


def test_synthetic_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="sample photos"):
        SyntheticTwoAFC(names=["nope"])
    with pytest.raises(ValueError, match="categories"):
        SyntheticTwoAFC(categories=["rotate"])
    with pytest.raises(ValueError, match="patch_size"):
        SyntheticTwoAFC(patch_size=128, photo_size=64)
    with pytest.raises(IndexError):
        _small()[8]


def test_folder_reads_back_what_was_written(tree: tuple[Path, SyntheticTwoAFC]) -> None:
    root, dataset = tree
    folder = TwoAFCFolder(root, split="val")
    assert len(folder) == len(dataset)
    assert folder.categories == sorted(SYNTHETIC_CATEGORIES)
    by_name = {dataset[i]["name"]: dataset[i] for i in range(len(dataset))}
    for i in range(len(folder)):
        item = folder[i]
        original = by_name[item["name"]]
        for part in PARTS:
            assert torch.equal(item[part], original[part])
        assert torch.equal(item["judge"], original["judge"])
        assert folder.categories[int(item["category"])] == item["name"].split("/")[0]
    # the 2afc folder itself works as root; a category subset keeps the requested order
    subset = TwoAFCFolder(root / "2afc", split="val", categories=["mix", "tone"])
    assert subset.categories == ["mix", "tone"] and len(subset) == 5  # items 2, 5 and 0, 3, 6 of 8
    assert int(subset[0]["category"]) == 0 and subset[0]["name"].startswith("mix/")


def test_folder_resizes_other_patch_sizes(tree: tuple[Path, SyntheticTwoAFC]) -> None:
    item = TwoAFCFolder(tree[0], split="val", patch_size=32)[0]
    assert all(item[p].shape == (3, 32, 32) for p in PARTS)


def _copy(tree: tuple[Path, SyntheticTwoAFC], tmp_path: Path) -> Path:
    shutil.copytree(tree[0], tmp_path / "bapps")
    return tmp_path / "bapps"


def test_wrong_trees_are_named(tree: tuple[Path, SyntheticTwoAFC], tmp_path: Path) -> None:
    with pytest.raises(TwoAFCLayoutError, match="not found"):
        TwoAFCFolder(tmp_path / "absent")
    with pytest.raises(TwoAFCLayoutError, match=r"no 'train' split .*found folders: val"):
        TwoAFCFolder(tree[0], split="train")
    with pytest.raises(TwoAFCLayoutError, match=r"\['superres'\] not found; available: colour, mix"):
        TwoAFCFolder(tree[0], split="val", categories=["tone", "superres"])
    root = _copy(tree, tmp_path)
    shutil.rmtree(root / "2afc" / "val" / "mix" / "judge")
    with pytest.raises(TwoAFCLayoutError, match=r"mix: missing sub-folder\(s\) \['judge'\]"):
        TwoAFCFolder(root, split="val")
    (root / "2afc" / "val" / "colour" / "p1" / "000001.png").unlink()
    with pytest.raises(TwoAFCLayoutError, match=r"p1/ does not match ref/ .*missing in p1/: 000001"):
        TwoAFCFolder(root, split="val", categories=["colour"])


def test_bad_judgment_file_is_named(tree: tuple[Path, SyntheticTwoAFC], tmp_path: Path) -> None:
    root = _copy(tree, tmp_path)
    bad = root / "2afc" / "val" / "tone" / "judge" / "000000.npy"
    np.save(bad, np.array([1.5], np.float32))
    dataset = TwoAFCFolder(root, split="val", categories=["tone"])
    with pytest.raises(ValueError, match=r"000000.npy: a judgment must be one number in \[0, 1\]"):
        dataset[0]


def test_writer_never_overwrites(tree: tuple[Path, SyntheticTwoAFC]) -> None:
    before = sorted(p.name for p in (tree[0] / "2afc" / "val" / "tone" / "ref").iterdir())
    with pytest.raises(FileExistsError, match="exists already"):
        write_two_afc_tree(_small(seed=9), tree[0], "val")
    assert sorted(p.name for p in (tree[0] / "2afc" / "val" / "tone" / "ref").iterdir()) == before
    assert [p.name for p in (tree[0] / "2afc").iterdir()] == ["val"]  # no staging folder left behind


def test_cli_writes_a_set_and_reports_setup_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["--output", str(tmp_path), "--split", "train", "--num-triplets", "4", "--names", "moon"]) == 0
    )
    assert len(TwoAFCFolder(tmp_path, split="train")) == 4
    assert main(["--output", str(tmp_path), "--split", "train", "--num-triplets", "4"]) == 2
    assert "exists already" in capsys.readouterr().err


def test_datamodule_batches_and_categories() -> None:
    train, val = _small(), _small(seed=5, num_triplets=6)
    dm = TwoAFCDataModule(train, val, global_batch_size=4, val_batch_size=5, num_workers=0, pin_memory=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["ref"].shape == (4, 3, 64, 64) and batch["judge"].shape == (4,)
    assert batch["category"].dtype == torch.int64 and len(batch["name"]) == 4
    assert [len(b["judge"]) for b in dm.val_dataloader()] == [5, 1]
    assert dm.categories("validate") == dm.categories("test") == list(SYNTHETIC_CATEGORIES)
    # the shuffle is seeded: the same order on every run
    again = TwoAFCDataModule(train, val, global_batch_size=4, num_workers=0, pin_memory=False)
    assert next(iter(again.train_dataloader()))["name"] == batch["name"]


def test_datamodule_rejects_missing_or_unlabelled_sets() -> None:
    with pytest.raises(TypeError, match="categories"):
        TwoAFCDataModule(train_dataset=torch.utils.data.TensorDataset(torch.zeros(2)))
    with pytest.raises(ValueError, match="data.train_dataset"):
        TwoAFCDataModule(val_dataset=_small()).setup("fit")
    with pytest.raises(ValueError, match=">= 1"):
        TwoAFCDataModule(global_batch_size=0)
