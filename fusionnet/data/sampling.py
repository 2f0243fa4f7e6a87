"""Training samples drawn afresh every epoch from whole composites (paper Sec. 4.1).

Each time a composite is drawn the paper cuts a new crop: a size from `crops.sizes`, centred on a
random transition pixel, rotated in [-15, 15] degrees (authors' code), flipped at random, resized to
`out_size`. The warm-up set is the same composites resized whole to `warmup_size`, also rotated and
flipped (paper: augmentation is "applied to all the cropped and resized training data").

What is drawn is a pure function of (seed, epoch, index): items are `(epoch, index)` pairs, and each
gets its own generator `SeedSequence(seed, spawn_key=(epoch, index))`. So a resumed step, any number of
DataLoader workers and DDP ranks (which take disjoint indices) all see exactly the same samples, and
every epoch sees new ones. The cutting runs wherever `__getitem__` runs: in the DataLoader workers.

Index space of an epoch: 0..n-1 are crops of the n training composites; with `warmup=True`,
n..2n-1 are their warm-up images. A shard row of kind "crop" (a fixed crop, e.g. for an overfit
test) is returned as stored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from fusionnet.data.crops import CropSource, draw_crop_spec, resize, warmup_image
from fusionnet.data.dataset import ShardDataset

__all__ = ["Sampling", "SampledCrops", "read_summary"]

_COLUMNS = ["image", "alpha", "height", "width", "kind", "transition"]


@dataclass(frozen=True)
class Sampling:
    """How crops are drawn (the `crops` params that the shard_crops stage records in summary.json)."""

    sizes: tuple[int, ...] = (512, 800)
    out_size: int = 512
    warmup_size: int = 512
    rotation_deg: float = 15.0
    flip: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "Sampling":
        return cls(tuple(int(s) for s in d["sizes"]), int(d["out_size"]), int(d["warmup_size"]),
                   float(d["rotation_deg"]), bool(d["flip"]))


def read_summary(shards_dir: str | Path) -> dict:
    """shards_dir/summary.json, with an error naming the file when it is missing or incomplete."""
    path = Path(shards_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run the shard_crops stage)")
    summary = json.loads(path.read_text())
    missing = [k for k in ("sampling", "data_version") if k not in summary]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} (written by an older shard_crops; re-run it)")
    return summary


class SampledCrops(Dataset):
    """{"image": (3,S,S) float32 in [0,1], "alpha": (1,S,S) float32 in [0,1]}, S = out_size, for an
    item `(epoch, index)` (a plain int means epoch 0). See the module doc for the index space."""

    def __init__(self, rows: ShardDataset, sampling: Sampling, seed: int, warmup: bool = False) -> None:
        self.rows, self.sampling, self.seed, self.warmup = rows, sampling, int(seed), bool(warmup)
        self.n = len(rows)

    def __len__(self) -> int:
        return 2 * self.n if self.warmup else self.n

    def with_warmup(self) -> "SampledCrops":
        """The same rows and draws, with the warm-up images added to the index space."""
        return SampledCrops(self.rows, self.sampling, self.seed, warmup=True)

    def rng(self, epoch: int, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(int(epoch), int(index))))

    def arrays(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The drawn sample as uint8 arrays: ((S,S,3), (S,S))."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        row = self.rows.read_row(index % self.n, _COLUMNS)
        h, w = int(row["height"]), int(row["width"])
        image = np.frombuffer(row["image"], dtype=np.uint8).reshape(h, w, 3)
        alpha = np.frombuffer(row["alpha"], dtype=np.uint8).reshape(h, w)
        if row["kind"] != "composite":
            return image, alpha
        s, rng = self.sampling, self.rng(epoch, index)
        if index >= self.n:  # warm-up: the whole composite, resized, rotated, flipped
            angle = float(rng.uniform(-s.rotation_deg, s.rotation_deg)) if s.rotation_deg > 0 else 0.0
            flipped = bool(rng.random() < 0.5) and s.flip
            image, alpha = warmup_image(image, alpha, s.warmup_size, flipped, angle)
            return resize(image, s.out_size, s.out_size), resize(alpha, s.out_size, s.out_size)
        candidates = np.frombuffer(row["transition"], dtype=np.uint32)
        if candidates.size == 0:
            candidates = np.arange(h * w, dtype=np.uint32)
        spec = draw_crop_spec(candidates, w, s.sizes, s.rotation_deg, s.flip, rng)
        # one warp straight from the whole composite (it mirrors at the border itself): no window copy
        return CropSource(image, alpha).crop(spec, s.out_size)

    def __getitem__(self, item) -> dict:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        image_u8, alpha_u8 = self.arrays(int(epoch), int(index))
        return {"image": _to_unit(image_u8), "alpha": _to_unit(alpha_u8[..., None])}


def _to_unit(array: np.ndarray) -> torch.Tensor:
    """(H,W,C) uint8 -> contiguous (C,H,W) float32 in [0,1]. x / 255 in float32 equals the shard reader's
    table (fusionnet.data.dataset._TO_UNIT) bit for bit, at half np.take's cost; numpy, not torch, so
    it never waits on torch's intra-op threads when it runs in the training process (0 workers)."""
    out = np.empty((array.shape[2],) + array.shape[:2], dtype=np.float32)
    np.divide(array.transpose(2, 0, 1), np.float32(255), out=out, dtype=np.float32)
    return torch.from_numpy(out)
