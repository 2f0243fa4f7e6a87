"""Training and validation data for a step: shards/train, shards/warmup, shards/val (data-contract).

Resume-exact data order: the order of an epoch is a function of (seed, epoch) only
(DistributedSampler's permutation, split across ranks), and a resumed epoch skips the batches already
consumed. The read-time flip is drawn from (seed, epoch, batch, rank), not from a running generator.

Warm-up set (paper Sec. 4: "we also resize all the training images to 512x512 to warm-up the
network"): in the first `warmup_epochs` epochs of a step the epoch draws from the crops AND the
resized whole images together (one shuffled pool); later epochs use the crops alone. The defaults use
it in the first segmentation epoch only, where the network first learns the whole-object layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as nnf
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from fusionnet.data.dataset import ShardDataset

SPLITS = ("train", "warmup", "val")


def open_split(shards_dir: Path, split: str) -> ShardDataset:
    """The ShardDataset of one split, with an error naming the missing directory."""
    folder = Path(shards_dir) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing shard directory (run the shard_crops stage; expected {'/'.join(SPLITS)})")
    return ShardDataset(folder)


class ResizedDataset(Dataset):
    """Samples of `base` resized to `size` x `size` (bilinear, antialiased) so they batch with the crops."""

    def __init__(self, base: Dataset, size: int):
        self.base, self.size = base, size

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        if tuple(sample["image"].shape[-2:]) == (self.size, self.size):
            return sample
        out = {}
        for key in ("image", "alpha"):
            x = nnf.interpolate(sample[key][None], size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            out[key] = x[0].clamp(0.0, 1.0)
        return out


def sample_size(dataset: ShardDataset) -> tuple[int, int]:
    """(height, width) of the first stored sample (crops all share out_size)."""
    image, _ = dataset.read_arrays(0)
    return int(image.shape[0]), int(image.shape[1])


def epoch_dataset(train: ShardDataset, warmup: Dataset | None, use_warmup: bool) -> Dataset:
    if not use_warmup or warmup is None:
        return train
    height, _ = sample_size(train)
    return ConcatDataset([train, ResizedDataset(warmup, height)])


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's sample order for `epoch`: a function of (seed, epoch) (DistributedSampler, drop_last)."""
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)  # type: ignore[arg-type]
    sampler.set_epoch(epoch)
    return list(sampler)


def batches_in_epoch(n_indices: int, batch_size: int, max_iters: int | None) -> int:
    full = n_indices // batch_size  # drop_last: every batch has batch_size samples (BN, DDP)
    return full if max_iters is None else min(full, max_iters)


def epoch_loader(
    dataset: Dataset, indices: list[int], batch_size: int, first_batch: int, n_batches: int,
    num_workers: int, seed: int, epoch: int, pin_memory: bool = False,
) -> DataLoader:
    """Loader over batches first_batch..n_batches-1 of the epoch order (skipping consumed ones)."""
    chosen = indices[first_batch * batch_size : n_batches * batch_size]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=chosen,  # a fixed list: the order was decided by (seed, epoch)
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed * 100_003 + epoch),
        persistent_workers=False,
    )


def flip_batch(image: torch.Tensor, alpha: torch.Tensor, seed: int, epoch: int, batch: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right flip each sample with p = 0.5, drawn from (seed, epoch, batch, rank): resume-exact.

    image `(N,3,H,W)`, alpha `(N,1,H,W)`; returns new tensors.
    """
    g = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + batch) * 131 + rank)
    flip = (torch.rand(image.shape[0], generator=g) < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, image.flip(-1), image), torch.where(flip, alpha.flip(-1), alpha)


def val_loader(val: ShardDataset, batch_size: int, max_images: int | None) -> DataLoader:
    """The first `max_images` val crops (all when None), in stored order."""
    n = len(val) if max_images is None else min(len(val), max_images)
    return DataLoader(val, batch_size=batch_size, sampler=list(range(n)), num_workers=0)
