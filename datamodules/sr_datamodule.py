"""SRDataModule: GT crops for training, degraded on the device; paired sets for validation and testing.

Training batches leave the DataLoader as ``{"gt": (B, 3, H, W)}``. After the transfer to the device,
``on_after_batch_transfer`` (training only) synthesises the LQ with the degradation module and a per-rank
``torch.Generator``, passes the pair through the training pair pool, and the LightningModule receives
``{"lq": (B, 3, H/s, W/s), "gt": (B, 3, H, W)}`` float32 in [0, 1] (docs/training.md, docs/data.md).
Validation / test batches are ``{"lq", "gt", "name": list[str]}`` or ``{"lq", "name"}`` (no-reference sets).

Randomness (docs/data.md): every stream derives from ``seed`` with :func:`stable_seed` —
the DataLoader's shuffle/worker-seed generator from (seed, rank), each worker's crop/flip generator from
(seed, rank, worker, PyTorch's per-epoch worker seed), and the degradation generator from (seed, rank). The
degradation generator state and the pair pool of every rank are saved in checkpoints through
``state_dict``/``load_state_dict``, so a resumed run degrades the next batch exactly as the uninterrupted one.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

from datamodules.datasets import SeededDataset
from datamodules.degradation.pair_pool import TrainingPairPool
from invsr_pl.utils.batching import BatchPlan, derive_batch
from invsr_pl.utils.seeding import stable_seed

__all__ = ["SRDataModule", "check_data_folders", "seed_worker"]

DatasetSpec = Dataset | Callable[[], Dataset] | Mapping | None


def _reseed_tree(dataset: Any, seed: int) -> None:
    """Reseed ``dataset`` and any datasets it wraps (``Subset.dataset``, ``ConcatDataset.datasets``)."""
    if isinstance(dataset, SeededDataset):
        dataset.reseed(seed)
    inner = getattr(dataset, "dataset", None)
    if inner is not None:
        _reseed_tree(inner, stable_seed(seed, "inner"))
    for i, child in enumerate(getattr(dataset, "datasets", ()) or ()):
        _reseed_tree(child, stable_seed(seed, "child", i))


def seed_worker(worker_id: int, seed: int, rank: int) -> None:
    """DataLoader ``worker_init_fn``: seed this worker's streams from (seed, rank, worker, epoch).

    ``torch.initial_seed()`` in a worker is PyTorch's ``base_seed + worker_id``, where ``base_seed`` is drawn
    from the DataLoader's generator at every epoch; mixing it in gives new crops each epoch without repeating
    across workers or ranks. Python's ``random`` and NumPy are seeded too, for any library code a dataset
    calls.
    """
    s = stable_seed(seed, "worker", rank, worker_id, torch.initial_seed())
    info = get_worker_info()
    if info is not None:
        _reseed_tree(info.dataset, s)
    random.seed(s)
    np.random.seed(s % 2**32)


def _pack(tree: Any) -> Any:
    """CPU copy of a state tree; float tensors that lie exactly on the 8-bit grid are stored as uint8.

    Pool entries are 8-bit data (LQ is quantised by the degradation, GT comes from 8-bit files), so this makes
    the checkpointed pool 4x smaller without changing a value; anything else is kept as is.
    """
    if isinstance(tree, Tensor):
        t = tree.detach()
        if t.dtype == torch.float32 and t.numel() > 0:
            codes = torch.round(t * 255.0)
            if torch.equal(codes / 255.0, t):
                return {"__uint8_grid__": codes.to(torch.uint8).cpu()}
        return t.cpu()
    if isinstance(tree, dict):
        return {k: _pack(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_pack(v) for v in tree)
    return tree


def _unpack(tree: Any, device: torch.device | str) -> Any:
    """Inverse of :func:`_pack`, onto ``device``."""
    if isinstance(tree, Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        if set(tree) == {"__uint8_grid__"}:
            return tree["__uint8_grid__"].to(device).to(torch.float32) / 255.0
        return {k: _unpack(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_unpack(v, device) for v in tree)
    return tree


class _TrainLoader(DataLoader):
    """A DataLoader that asks its DataModule to seed each epoch and, after a resume, to skip consumed batches.

    Every epoch's shuffle order and (without workers, or with non-persistent workers) crops are then a
    function of (seed, rank, epoch), and a run resumed mid-epoch continues with the batch the interrupted run
    would have drawn next. Skipping loads and drops those batches (no degradation, no training step).
    """

    def __init__(self, *args: Any, datamodule: SRDataModule | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule

    def __iter__(self):  # DataLoader's own iterator type
        skip = self.datamodule._begin_train_epoch(self) if self.datamodule is not None else 0
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator, None)
        return iterator

    # Lightning's resumable-loader protocol. The position lives in the DataModule's own checkpointed state
    # (restored before the loader is iterated), so there is nothing to add here; implementing the protocol
    # tells Lightning this loader resumes mid-epoch correctly.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _build(spec: DatasetSpec, what: str) -> Dataset | None:
    """A dataset from an object, a zero-argument factory (Hydra ``_partial_``) or a Hydra config mapping."""
    if spec is None or isinstance(spec, Dataset):
        return spec
    if isinstance(spec, Mapping) and "_target_" in spec:
        from hydra.utils import instantiate  # only for configs handed over un-instantiated

        return instantiate(spec)
    if callable(spec):
        return spec()
    raise TypeError(f"{what} must be a Dataset, a factory or a Hydra config, got {type(spec).__name__}")


# Folder-valued dataset keys and what each must hold (the layout stated by check_data_folders' message).
_FOLDER_KEYS = {
    "root": "a folder of HR training images, searched recursively",
    "file_list": "a text file listing image paths, one per line",
    "lq_dir": "low-resolution validation images",
    "gt_dir": "the matching HR images: same stems, scale x the LQ size",
}


def _folder_entries(node: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(dotted config key, value) of every folder-valued key below ``node``: a plain/OmegaConf mapping or
    list, or a ``functools.partial`` dataset factory (Hydra ``_partial_``); ``"???"`` marks unset keys."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, functools.partial):
        node = node.keywords
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    if isinstance(node, Mapping):
        for k, value in node.items():
            if k in _FOLDER_KEYS and isinstance(value, (str, os.PathLike)):
                yield f"{key}.{k}", str(value)
            else:
                yield from _folder_entries(value, f"{key}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from _folder_entries(item, f"{key}.{i}")


def _check_folders(specs: Mapping[str, Any], data_dir: str | None = None) -> None:
    """One FileNotFoundError naming every missing / unset folder below ``specs`` ({config key: spec})."""
    missing = []
    for section, spec in specs.items():
        for key, value in _folder_entries(spec, section):
            if value == "???" or not os.path.exists(os.path.expanduser(value)):
                what = _FOLDER_KEYS[key.rsplit(".", 1)[-1]]
                missing.append(f"{key}={'(not set)' if value == '???' else value} ({what})")
    if missing:
        where = f" ({data_dir})" if data_dir else ""
        raise FileNotFoundError(
            f"training data not found: {'; '.join(missing)}. The paper recipe expects below paths.data_dir"
            f"{where}: LSDIR/train/images/**.png, FFHQ/images1024x1024/**.png, imagenet512/{{lq,gt}}/*.png. "
            "Point elsewhere with paths.data_dir=/your/data or the keys above (your own folders: data=paired "
            "data.train_dataset.sources.0.root=HR data.val_dataset.lq_dir=LQ data.val_dataset.gt_dir=GT; "
            "pairs from HR images: python -m datamodules.make_testset), or train on the built-in photos with "
            "experiment=quickstart"
        )


def check_data_folders(cfg: Any) -> None:
    """Start-up check of a composed config (before any model is built): every data folder in ``cfg.data``
    exists. :class:`SRDataModule` runs the same check on its dataset factories when it is constructed.

    Looks at the ``root`` / ``file_list`` / ``lq_dir`` / ``gt_dir`` keys of the train, validation and test
    datasets, so the paper recipe on a machine without its data stops in seconds, not after building
    SD-Turbo.

    Raises:
        FileNotFoundError: one line naming every missing or unset folder with its config key, what the
            folder must hold, the expected layout and how to point elsewhere (``paths.data_dir``, the keys
            themselves, or ``experiment=quickstart`` for the built-in photos).
    """
    data = cfg.get("data") if hasattr(cfg, "get") else None
    if data is None:
        return
    sections = ("train_dataset", "val_dataset", "test_datasets")
    specs = {f"data.{s}": data.get(s) for s in sections if s in data and data.get(s) is not None}
    paths = cfg.get("paths") or {}
    _check_folders(specs, str(paths.get("data_dir")) if "data_dir" in paths else None)


class SRDataModule(LightningDataModule):
    """Data for InvSR training and evaluation. Keyword arguments map one-to-one to ``conf/data/*.yaml``.

    Args:
        train_dataset: yields ``{"gt": (3, H, W)}`` (e.g. ``GTImageFolder``, ``SampleGTImages``), or
            ``{"lq", "gt"}`` pairs (then no degradation is applied).
        val_dataset: paired / LQ-only set for validation (e.g. ``PairedImageFolder``, ``SamplePairs``).
        test_datasets: ``{name: dataset}``; ``test_dataloader`` returns one loader per entry, in order, and
            :attr:`test_names` gives the names. ``None`` tests on ``val_dataset`` (named ``"val"``).
        degradation: ``RealESRGANDegradation`` (or any module with its ``forward(gt, generator)``) applied on
            the device to training batches. ``None`` needs a train set that yields LQ itself.
        global_batch_size: training images per iteration over all devices (the paper: 64, docs/training.md).
            Each device loads ``global_batch_size / world_size`` (``invsr_pl.utils.batching.derive_batch``,
            applied at ``setup`` from the trainer's world size; 1 without a trainer); see :attr:`batch_plan`.
        val_batch_size, test_batch_size: 1 by default, because full-size sets mix image sizes.
        num_workers: training DataLoader workers.
        val_num_workers: workers for validation/test loaders; ``None`` = ``num_workers``.
        pin_memory: pin host memory for faster copies to the GPU.
        persistent_workers: keep workers between epochs (only when there are workers).
        pair_pool_size: size of the training pair pool (docs/training.md); ``None`` = 10 x the per-device
            batch as in the paper, 0 = no pool.
        seed: base of every data random stream (see the module docstring).
        drop_last: drop the last incomplete training batch (the paper does).
    """

    def __init__(
        self,
        train_dataset: DatasetSpec = None,
        val_dataset: DatasetSpec = None,
        test_datasets: Mapping[str, DatasetSpec] | None = None,
        degradation: nn.Module | None = None,
        global_batch_size: int = 8,
        val_batch_size: int = 1,
        test_batch_size: int = 1,
        num_workers: int = 4,
        val_num_workers: int | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        pair_pool_size: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["train_dataset", "val_dataset", "test_datasets", "degradation"])
        for name, value in (("global_batch_size", global_batch_size), ("val_batch_size", val_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if test_batch_size < 1:
            raise ValueError(f"test_batch_size must be >= 1, got {test_batch_size}")
        if num_workers < 0 or (val_num_workers is not None and val_num_workers < 0):
            raise ValueError("num_workers / val_num_workers must be >= 0")
        self._train_spec = train_dataset
        self._val_spec = val_dataset
        self._test_specs = dict(test_datasets.items()) if test_datasets is not None else None
        # datasets given as factories (Hydra _partial_) are built lazily: check their folders now, so a run
        # without its data stops here, before the model is built (same message as check_data_folders)
        lazy = {"data.train_dataset": train_dataset, "data.val_dataset": val_dataset}
        lazy.update({f"data.test_datasets.{k}": v for k, v in (self._test_specs or {}).items()})
        _check_folders({k: v for k, v in lazy.items() if isinstance(v, (functools.partial, Mapping))})
        self._train_set: Dataset | None = None
        self._val_set: Dataset | None = None
        self._test_sets: dict[str, Dataset] | None = None
        self.degradation = degradation
        self.global_batch_size = int(global_batch_size)
        self.val_batch_size = int(val_batch_size)
        self.test_batch_size = int(test_batch_size)
        self.num_workers = int(num_workers)
        self.val_num_workers = self.num_workers if val_num_workers is None else int(val_num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self._pair_pool_setting = pair_pool_size
        self.pair_pool: TrainingPairPool | None = None
        self._plan_batch(1)  # one process until setup() knows the trainer's world size
        self._generator: torch.Generator | None = None
        self._degradation_device: torch.device | None = None
        self._pending_generator: dict[str, Any] | None = None
        self._pending_pool: dict[str, Any] | None = None
        self._epoch = -1  # training epoch being drawn (-1: none yet), and batches of it that reached training
        self._consumed = 0
        self._resume_position: tuple[int, int] | None = None

    def _plan_batch(self, world_size: int) -> None:
        """Derive the per-device batch (and the pair pool that depends on it) for ``world_size`` processes."""
        micro = None
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is not None:
            micro = getattr(module, "hparams", {}).get("micro_batch_size")
        self.batch_plan: BatchPlan = derive_batch(self.global_batch_size, int(world_size), micro)
        self.batch_size = self.batch_plan.per_device_batch_size  # the training DataLoader's batch
        # docs/training.md: the queue holds 10 x the per-GPU batch unless configured.
        setting = self._pair_pool_setting
        self.pair_pool_size = 10 * self.batch_size if setting is None else int(setting)
        if self.pair_pool is None or self.pair_pool.size != self.pair_pool_size:
            self.pair_pool = TrainingPairPool(size=self.pair_pool_size) if self.pair_pool_size > 0 else None

    # ---------------------------------------------------------------------------------------- datasets
    @property
    def train_set(self) -> Dataset | None:
        if self._train_set is None:
            self._train_set = _build(self._train_spec, "train_dataset")
        return self._train_set

    @property
    def val_set(self) -> Dataset | None:
        if self._val_set is None:
            self._val_set = _build(self._val_spec, "val_dataset")
        return self._val_set

    @property
    def test_sets(self) -> dict[str, Dataset]:
        if self._test_sets is None:
            if self._test_specs is None:
                self._test_sets = {"val": self.val_set} if self.val_set is not None else {}
            else:
                built = {str(k): _build(v, f"test_datasets.{k}") for k, v in self._test_specs.items()}
                self._test_sets = {k: v for k, v in built.items() if v is not None}  # null entries = disabled
        return self._test_sets

    @property
    def test_names(self) -> list[str]:
        """Names of the test sets; ``test_dataloader()[i]`` (dataloader_idx ``i``) is ``test_names[i]``."""
        return list(self.test_sets)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            if self.train_set is None:
                raise ValueError("SRDataModule needs a train_dataset to fit")
            self._plan_batch(self.trainer.world_size if self.trainer is not None else 1)
            rank_zero_info(f"Batch: {self.batch_plan.describe()}")
        if stage in (None, "fit", "validate"):
            _ = self.val_set
        if stage in (None, "test", "predict"):
            _ = self.test_sets

    # ---------------------------------------------------------------------------------------- loaders
    @property
    def _rank(self) -> int:
        trainer = self.trainer
        return int(trainer.global_rank) if trainer is not None else 0

    def _loader(self, dataset: Dataset, batch_size: int, workers: int, train: bool) -> DataLoader:
        rank = self._rank
        extra: dict[str, Any] = {"datamodule": self} if train else {}
        return (_TrainLoader if train else DataLoader)(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and self.drop_last,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            worker_init_fn=functools.partial(seed_worker, seed=self.seed, rank=rank),
            generator=torch.Generator().manual_seed(stable_seed(self.seed, "loader", rank)),
            **extra,
        )

    def _begin_train_epoch(self, loader: DataLoader) -> int:
        """Seed a new training epoch from (seed, rank, epoch); returns how many batches to skip (resume).

        The data epoch is counted here, not taken from ``trainer.current_epoch``, whose value after a resume
        from an end-of-epoch checkpoint skips a number: a new epoch starts when the previous one delivered at
        least one batch to training (so a repeated ``iter()`` redraws the same epoch).
        """
        if self._resume_position is not None:
            epoch, skip = self._resume_position
            epoch = max(epoch, 0)  # saved before the first epoch started
            self._resume_position = None
            if skip >= len(loader):  # the checkpoint was written after the epoch's last batch
                epoch, skip = epoch + 1, 0
        elif self._epoch < 0:
            epoch, skip = 0, 0
        elif self._consumed > 0 or self.trainer is None:  # without a Trainer nothing counts consumption
            epoch, skip = self._epoch + 1, 0
        else:
            epoch, skip = self._epoch, 0
        rank = self._rank
        loader.generator.manual_seed(stable_seed(self.seed, "loader", rank, epoch))
        if loader.num_workers == 0:
            # No worker_init_fn runs in the main process: seed its crop/flip stream here.
            _reseed_tree(loader.dataset, stable_seed(self.seed, "main", rank, epoch))
        self._epoch, self._consumed = epoch, skip
        return skip

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise ValueError("SRDataModule has no train_dataset")
        return self._loader(self.train_set, self.batch_size, self.num_workers, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []  # Lightning then skips validation
        return self._loader(self.val_set, self.val_batch_size, self.val_num_workers, train=False)

    def test_dataloader(self) -> list[DataLoader]:
        return [
            self._loader(ds, self.test_batch_size, self.val_num_workers, train=False)
            for ds in self.test_sets.values()
        ]

    # ---------------------------------------------------------------------------------------- degradation
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self._consumed += 1
            return self.degrade_batch(batch)
        return batch

    def degradation_generator(self, device: torch.device | str) -> torch.Generator:
        """This rank's degradation generator on ``device``; created on first use from (seed, global rank), or
        from a checkpointed state (:meth:`load_state_dict`)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self._generator is not None and self._generator.device == device:
            return self._generator
        gen = torch.Generator(device=device)
        pending = self._pending_generator
        if pending is not None and pending["device_type"] == device.type:
            gen.set_state(pending["state"])
        else:
            if pending is not None:
                rank_zero_warn(
                    f"checkpointed degradation generator was on {pending['device_type']}, the batch is on "
                    f"{device.type}; the degradation stream restarts from the seed"
                )
            gen.manual_seed(stable_seed(self.seed, "degradation", self._rank))
        self._pending_generator = None
        self._generator = gen
        return gen

    @torch.no_grad()
    def degrade_batch(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Training batch on its device -> ``{"lq", "gt"}``: degrade (unless the batch has LQ), then pool.

        Args:
            batch: ``{"gt": (B, 3, H, W)}`` float in [0, 1] (or ``{"lq", "gt"}``), already on the device.

        Returns:
            ``{"lq": (B, 3, H/scale, W/scale), "gt": (B, 3, H, W)}`` float32 in [0, 1], contiguous.
        """
        gt = batch["gt"]
        gen = self.degradation_generator(gt.device)
        if "lq" in batch:
            lq = batch["lq"]
        elif self.degradation is None:
            raise ValueError("the training batch has no 'lq' and SRDataModule has no degradation to make one")
        else:
            if self._degradation_device != gt.device:
                self.degradation.to(gt.device)
                self._degradation_device = gt.device
            lq = self.degradation(gt, generator=gen)  # (B, 3, H/s, W/s), docs/data.md GPU degradation
        if self.pair_pool is not None:
            if self._pending_pool is not None:
                self.pair_pool.load_state_dict(_unpack(self._pending_pool, gt.device))
                self._pending_pool = None
            pooled = self.pair_pool({"lq": lq, "gt": gt}, generator=gen)  # docs/training.md
            lq, gt = pooled["lq"], pooled["gt"]
        return {"lq": lq.contiguous(), "gt": gt.contiguous()}

    # ---------------------------------------------------------------------------------------- checkpointing
    def _local_state(self) -> dict[str, Any]:
        if self._generator is not None:
            gen_state = {"device_type": self._generator.device.type, "state": self._generator.get_state()}
        else:
            gen_state = self._pending_generator
        if self._pending_pool is not None:
            pool_state = self._pending_pool
        elif self.pair_pool is not None:
            pool_state = _pack(self.pair_pool.state_dict())
        else:
            pool_state = None
        return {"generator": gen_state, "pair_pool": pool_state}

    def state_dict(self) -> dict[str, Any]:
        """Degradation generator state and pair pool of every rank, gathered (called on every rank).

        Returns:
            ``{"seed": int, "epoch": int, "consumed": int, "ranks": [{"generator": {"device_type", "state"} |
            None, "pair_pool": dict | None}, ...]}`` with CPU tensors, one rank entry per global rank;
            ``consumed`` counts the batches of training epoch ``epoch`` that reached the model.
        """
        local = self._local_state()
        ranks = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                ranks = [None] * world
                torch.distributed.all_gather_object(ranks, local)
        return {"seed": self.seed, "epoch": self._epoch, "consumed": self._consumed, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore this rank's entry of :meth:`state_dict`; applied lazily at the next training batch."""
        ranks = state_dict.get("ranks", [])
        rank = self._rank
        if state_dict.get("seed", self.seed) != self.seed:
            rank_zero_warn(f"checkpoint data seed {state_dict.get('seed')} differs from seed {self.seed}")
        if rank >= len(ranks):
            rank_zero_warn(
                f"checkpoint holds data state for {len(ranks)} rank(s); rank {rank} starts from its seed"
            )
            local: dict[str, Any] = {"generator": None, "pair_pool": None}
        else:
            local = ranks[rank]
        if "epoch" in state_dict:
            self._resume_position = (int(state_dict["epoch"]), int(state_dict["consumed"]))
        self._generator = None
        self._pending_generator = local.get("generator")
        self._pending_pool = local.get("pair_pool") if self.pair_pool_size > 0 else None
