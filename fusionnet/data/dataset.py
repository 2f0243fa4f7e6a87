"""torch Dataset over Parquet crop shards, and a shuffled multi-worker DataLoader for training.

`ShardDataset` indexes every (shard, row) pair once at construction (reading only Parquet footers).
Shards are opened lazily, memory-mapped, in the process that reads them: a DataLoader worker started by
fork (or spawn) opens its own handles on first use, never sharing the parent's. Each shard row is its
own Parquet row group (see `fusionnet.data.shards`), so a random row costs one small read, and
`make_loader` shuffles over all rows of all shards at once.

Read-time augmentation (`augment=True`), cheap and label-preserving:
- left-right flip of image and alpha with probability 0.5;
- optional colour jitter (`color_jitter=j > 0`): brightness and contrast factors uniform in
  [1 - j, 1 + j] applied to the image only. These are affine maps of colour, so I = alpha F + (1 - alpha) B
  still holds for the jittered F and B (up to clipping at 0 and 1); off by default.
Augmentation draws come from one generator per process, seeded from (seed, DataLoader worker seed):
reproducible for a loader seed, and different in every epoch (the generator runs on, and the
DataLoader draws new worker seeds each epoch).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from fusionnet.data.shards import list_shards

__all__ = ["ShardDataset", "make_loader", "set_epoch"]

_READ_COLUMNS = ["image", "alpha", "height", "width"]
_TO_UNIT = (np.arange(256) / 255.0).astype(np.float32)  # uint8 value -> float32 in [0, 1]


class ShardDataset(Dataset):
    """Samples {"image": (3,H,W) float32 in [0,1], "alpha": (1,H,W) float32 in [0,1]} from shards.

    paths_or_dir: a shard directory, a .parquet shard, or a list of either; hidden/temp files ignored.
    augment: read-time flip (and colour jitter when color_jitter > 0), see module doc.
    return_index: also return "index" (int), the sample's position in this dataset.
    max_open: shards kept open per process (least recently used are closed).
    """

    def __init__(
        self,
        paths_or_dir: str | Path | Sequence[str | Path],
        augment: bool = False,
        seed: int = 0,
        color_jitter: float = 0.0,
        return_index: bool = False,
        max_open: int = 64,
    ) -> None:
        self.shards = list_shards(paths_or_dir)
        if not self.shards:
            raise FileNotFoundError(f"no .parquet shards found in {paths_or_dir}")
        if not 0.0 <= color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
        self.augment, self.seed, self.color_jitter = augment, seed, color_jitter
        self.return_index, self.max_open = return_index, max_open
        shard_of, group_of, row_in_group = [], [], []
        for i, path in enumerate(self.shards):
            try:
                meta = pq.read_metadata(path)  # footer only; the file is closed again
            except Exception as err:  # a truncated or foreign file: name it
                raise ValueError(f"{path}: not a readable Parquet shard ({err})") from err
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                shard_of += [i] * n
                group_of += [g] * n
                row_in_group += range(n)
        # numpy arrays, not lists of ints, so forked workers do not copy them by touching refcounts
        self._shard = np.asarray(shard_of, dtype=np.int32)
        self._group = np.asarray(group_of, dtype=np.int32)
        self._row = np.asarray(row_in_group, dtype=np.int32)
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._aug_rng: np.random.Generator | None = None
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._shard.size)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = OrderedDict()  # open files do not cross process boundaries
        state["_aug_rng"] = None
        return state

    def _own_process(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's handles and generator are not ours
            self._files, self._aug_rng, self._pid = OrderedDict(), None, os.getpid()

    def _file(self, shard: int) -> pq.ParquetFile:
        self._own_process()
        pf = self._files.get(shard)
        if pf is None:
            pf = pq.ParquetFile(self.shards[shard], memory_map=True)
            self._files[shard] = pf
            if len(self._files) > self.max_open:
                self._files.popitem(last=False)
        else:
            self._files.move_to_end(shard)
        return pf

    def read_arrays(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Stored sample without augmentation: (image (H,W,3) uint8, alpha (H,W) uint8)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        table = self._file(int(self._shard[index])).read_row_group(int(self._group[index]), columns=_READ_COLUMNS)
        k = int(self._row[index])
        h, w = table.column("height")[k].as_py(), table.column("width")[k].as_py()
        image = np.frombuffer(table.column("image")[k].as_py(), dtype=np.uint8).reshape(h, w, 3)
        alpha = np.frombuffer(table.column("alpha")[k].as_py(), dtype=np.uint8).reshape(h, w)
        return image, alpha

    def read_row(self, index: int, columns: Sequence[str]) -> dict:
        """The stored values of `columns` for sample `index` (Python objects, bytes for binary columns)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        table = self._file(int(self._shard[index])).read_row_group(int(self._group[index]), columns=list(columns))
        k = int(self._row[index])
        return {c: table.column(c)[k].as_py() for c in columns}

    def column(self, name: str) -> list:
        """One (small) column for every sample, in dataset order, e.g. "fg_id" or "kind"."""
        values: list = []
        for path in self.shards:
            values += pq.read_table(path, columns=[name], memory_map=True).column(name).to_pylist()
        return values

    def _rng(self) -> np.random.Generator:
        self._own_process()
        if self._aug_rng is None:
            info = get_worker_info()
            worker_seed = 0 if info is None else info.seed  # the DataLoader draws new worker seeds per epoch
            self._aug_rng = np.random.default_rng([self.seed, worker_seed])
        return self._aug_rng

    def __getitem__(self, index: int) -> dict:
        image_u8, alpha_u8 = self.read_arrays(index)
        image_lut = _TO_UNIT
        if self.augment:
            rng = self._rng()
            if rng.random() < 0.5:
                image_u8, alpha_u8 = image_u8[:, ::-1], alpha_u8[:, ::-1]
            if self.color_jitter > 0:
                brightness, contrast = rng.uniform(1 - self.color_jitter, 1 + self.color_jitter, size=2)
                mean = float(image_u8[::4, ::4].mean()) / 255.0  # contrast pivot; a subsample is enough
                image_lut = np.clip(((_TO_UNIT - mean) * contrast + mean) * brightness, 0.0, 1.0).astype(np.float32)
        # one pass per array: 8-bit -> float32 in [0,1] (jitter folded into the table) and HWC -> CHW
        image = torch.from_numpy(np.take(image_lut, image_u8.transpose(2, 0, 1)))
        alpha = torch.from_numpy(np.take(_TO_UNIT, alpha_u8[None]))
        sample = {"image": image, "alpha": alpha}
        if self.return_index:
            sample["index"] = index
        return sample


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """DataLoader over `dataset`, shuffled across all shards.

    Single process: a new permutation every epoch, drawn from a generator seeded with `seed` (so the
    epoch sequence is reproducible). DDP (`world_size` given): a DistributedSampler for `rank`; call
    `set_epoch(loader, epoch)` before each epoch so the order changes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if world_size is not None:
        if rank is None or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}) when world_size is given, got {rank}")
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a DistributedSampler which epoch starts (a new shuffle per epoch); no-op otherwise."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
