"""Training and validation data for a step: shards/train (composites), shards/val (crops), summary.json.

Fresh samples every epoch (`fusionnet.data.sampling`): an epoch is one pass over the training
composites, each drawn once as a new crop (and, in the first `warmup_epochs` epochs of a step, once
more as its resized whole image, paper Sec. 4: "we also resize all the training images to 512x512 to
warm-up the network"), so the paper's epoch counts and LR half-cycles mean what the paper means.

Resume-exact data: the order of an epoch is a function of (seed, epoch) only (DistributedSampler's
permutation), cut into global batches that are split disjointly over ranks and accumulation steps
(`rank_indices`); a resumed epoch skips the steps already taken, and each sample is a function of
(seed, epoch, index).

Validation: the stored val crops (or, with crops.val_whole, the whole val composites); a capped subset is taken round-robin over the val foregrounds
(`val_indices`), so at the paper profile it is not the first foreground's crops only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from fusionnet.data.dataset import ShardDataset
from fusionnet.data.sampling import SampledCrops, Sampling, read_summary

SPLITS = ("train", "val")


def open_split(shards_dir: Path, split: str, return_index: bool = False) -> ShardDataset:
    """The ShardDataset of one split, with an error naming the missing directory."""
    folder = Path(shards_dir) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing shard directory (run the shard_crops stage; expected {'/'.join(SPLITS)})")
    return ShardDataset(folder, return_index=return_index)


def val_band_radii(val: ShardDataset, band_radius: int) -> list[int]:
    """Per val row, the "-25" band radius in its own pixels: a whole composite, shrunk to working size
    by src_scale, gets band_radius * src_scale (the band the test draws at full size); a crop keeps
    band_radius."""
    kinds, scales = val.column("kind"), val.column("src_scale")
    return [max(1, round(band_radius * float(sc))) if k == "composite" else band_radius for k, sc in zip(kinds, scales)]


def training_set(shards_dir: Path, seed: int, warmup: bool) -> SampledCrops:
    """Fresh crops (and warm-up images when `warmup`) of shards_dir/train, drawn as summary.json says."""
    rows = open_split(shards_dir, "train")
    sampling = Sampling.from_dict(read_summary(shards_dir)["sampling"])
    return SampledCrops(rows, sampling, seed, warmup=warmup)


def data_version(shards_dir: Path) -> str:
    """The shards' data version (summary.json `data_version`, a sha256 over the shard files)."""
    return read_summary(shards_dir)["data_version"]


def serving_settings(shards_dir: Path) -> dict[str, int]:
    """The serving settings a model trained on these shards carries in its file (fusionnet.model.save
    serving=...): max_side = the working scale its composites were shrunk to (crops.max_side), so a
    model trained at 96 px is matted at 96 px by default, not at 800. {} for shards that do not say."""
    working = read_summary(shards_dir).get("working_max_side")
    return {"max_side": int(working)} if working else {}


def sample_size(dataset: SampledCrops) -> tuple[int, int]:
    """(height, width) of the samples the trainer will batch."""
    image = dataset[(0, 0)]["image"]
    return int(image.shape[1]), int(image.shape[2])


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's sample order, a function of (seed, epoch) only: the permutation DistributedSampler
    draws (randperm seeded with seed + epoch), before any split over ranks."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


def steps_in_epoch(n: int, global_batch: int, max_iters: int | None) -> int:
    """Optimizer steps in an epoch of n samples: whole global batches only (drop_last: BN, DDP), capped."""
    full = n // global_batch
    return full if max_iters is None else min(full, max_iters)


def rank_indices(order: Sequence[int], first_step: int, n_steps: int, batch_size: int, accumulation: int,
                 rank: int, world_size: int) -> list[int]:
    """This rank's samples for optimizer steps first_step..n_steps-1, micro-batch after micro-batch.

    Step s takes the global batch order[s*G : (s+1)*G], G = batch_size x accumulation x world_size;
    its micro-batch m on rank r is the slice (m * world_size + r) * batch_size. So a step sees the same
    samples however they are split into processes and accumulation (1 process x 2 accumulations =
    2 processes x 1), and a step resumed on fewer processes continues the same sequence.
    """
    global_batch = batch_size * accumulation * world_size
    out: list[int] = []
    for step in range(first_step, n_steps):
        for micro in range(accumulation):
            start = step * global_batch + (micro * world_size + rank) * batch_size
            out.extend(order[start : start + batch_size])
    return out


def epoch_loader(dataset: SampledCrops, indices: list[int], batch_size: int, num_workers: int, seed: int,
                 epoch: int, pin_memory: bool = False) -> DataLoader:
    """Loader over `indices` (`rank_indices`: what is left of this rank's epoch), batch_size at a time.

    Items are (epoch, index) pairs, so workers cut exactly the crops an uninterrupted run cuts.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=[(epoch, i) for i in indices],  # a fixed list: the order was decided by (seed, epoch)
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed * 100_003 + epoch),
        persistent_workers=False,
    )


def val_indices(fg_ids: list[str], max_images: int | None) -> list[int]:
    """Up to `max_images` val crops spread over the foregrounds: round-robin over fg_id groups
    (each group in stored order), so every foreground is represented before any gets a second crop."""
    n = len(fg_ids) if max_images is None else min(len(fg_ids), max_images)
    groups: dict[str, list[int]] = {}
    for i, fg in enumerate(fg_ids):
        groups.setdefault(fg, []).append(i)
    order: list[int] = []
    queues = [list(reversed(g)) for g in groups.values()]
    while len(order) < n:
        for q in queues:
            if q and len(order) < n:
                order.append(q.pop())
    return sorted(order)


def val_loader(val: ShardDataset, batch_size: int, max_images: int | None, rank: int = 0, world_size: int = 1,
               num_workers: int = 0) -> DataLoader:
    """This rank's share (every world_size-th) of the val rows `val_indices` chooses (all when
    max_images is None), in stored order. Whole composites (kind "composite", sizes differ) go one per batch."""
    chosen = val_indices(val.column("fg_id"), max_images)[rank::world_size]
    whole = "composite" in set(val.column("kind"))
    return DataLoader(val, batch_size=1 if whole else batch_size, sampler=chosen, num_workers=num_workers)
