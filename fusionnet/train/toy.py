"""Tiny synthetic shards (soft-edged ellipses composited on textured backgrounds) for tests and benchmarks.

Written with `fusionnet.data.shards.write_shards` in the layout of the data contract
(train/, val/, warmup/), so the trainer reads them exactly as it reads the real `shard_crops` output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fusionnet.data.shards import write_shards


def toy_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image (size,size,3) uint8, alpha (size,size) uint8): I = alpha F + (1 - alpha) B, paper Eq. 1."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    ry, rx = rng.uniform(0.15, 0.35, size=2) * size
    dist = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    softness = rng.uniform(0.05, 0.25)
    alpha = np.clip((1.0 + softness - dist) / (2 * softness), 0.0, 1.0)  # soft edge = transition region
    fg = rng.uniform(0, 1, size=3).astype(np.float32) * (0.8 + 0.2 * np.sin(xx / 3.0))[..., None]
    bg_base = rng.uniform(0, 1, size=3).astype(np.float32)
    bg = np.clip(bg_base + 0.25 * rng.standard_normal((size, size, 1)).astype(np.float32), 0, 1)
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    to_u8 = lambda x: np.clip(np.round(x * 255), 0, 255).astype(np.uint8)  # noqa: E731
    return to_u8(image), to_u8(alpha)


def _row(image: np.ndarray, alpha: np.ndarray, i: int, kind: str) -> dict:
    h, w = alpha.shape
    return {
        "image": image.tobytes(), "alpha": alpha.tobytes(), "height": h, "width": w,
        "cid": f"toy{i:05d}", "fg_id": f"fg{i:05d}", "bg_name": f"bg{i:05d}",
        "crop_y": 0, "crop_x": 0, "crop_size": 0 if kind == "warmup" else h, "angle": 0.0, "flipped": False,
        "kind": kind, "src_height": h, "src_width": w, "src_scale": 1.0,
    }


def write_toy_shards(
    out_dir: str | Path, n_train: int = 16, n_val: int = 4, n_warmup: int = 4, size: int = 64,
    warmup_size: int | None = None, seed: int = 0, shard_rows: int = 8,
) -> Path:
    """Write out_dir/{train,val,warmup}/shard-*.parquet of toy samples; returns out_dir."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    counts = {"train": (n_train, size, "crop"), "val": (n_val, size, "crop"), "warmup": (n_warmup, warmup_size or size, "warmup")}
    for split, (n, side, kind) in counts.items():
        rows = [_row(*toy_sample(rng, side), i, kind) for i in range(n)]
        write_shards(rows, out_dir / split, shard_rows=shard_rows)
    return out_dir
