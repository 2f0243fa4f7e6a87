"""Tiny synthetic shards (soft-edged ellipses composited on textured backgrounds) for tests and benchmarks.

Written with `fusionnet.data.shards.write_shards` in the layout of the data contract
(train/ composites or fixed crops, val/ crops, summary.json), so the trainer reads them exactly as it
reads the real `shard_crops` output.
"""

from __future__ import annotations

from pathlib import Path

import json

import numpy as np

from fusionnet.data.crops import transition_pixels
from fusionnet.data.shards import shards_digest, write_shards


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
    transition = transition_pixels(alpha).astype(np.uint32).tobytes() if kind == "composite" else b""
    return {
        "image": image.tobytes(), "alpha": alpha.tobytes(), "height": h, "width": w,
        "cid": f"toy{i:05d}", "fg_id": f"fg{i:05d}", "bg_name": f"bg{i:05d}",
        "crop_y": 0, "crop_x": 0, "crop_size": 0 if kind == "composite" else h, "angle": 0.0, "flipped": False,
        "kind": kind, "src_height": h, "src_width": w, "src_scale": 1.0, "transition": transition,
    }


def write_toy_shards(
    out_dir: str | Path, n_train: int = 16, n_val: int = 4, size: int = 64, composite_size: int | None = None,
    fixed: bool = False, seed: int = 0, shard_rows: int = 8, rotation_deg: float = 15.0,
    whole_val: bool = False,
) -> Path:
    """Write out_dir/{train,val}/shard-*.parquet and summary.json of toy samples; returns out_dir.

    train: `n_train` composites of `composite_size` (default 1.5 x size) from which the trainer cuts
    fresh size x size crops, or with `fixed` `n_train` fixed size x size crops used as stored.
    val: `n_val` size x size crops, or with `whole_val` `n_val` whole (size + 8) x (size + 24) composites
    (not multiples of the network stride: validation pads them, as crops.val_whole shards need).
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    side = size if fixed else (composite_size or size + size // 2)
    train = [_row(*toy_sample(rng, side), i, "crop" if fixed else "composite") for i in range(n_train)]
    if whole_val:
        cut = lambda im, al: (np.ascontiguousarray(im[: size + 8]), np.ascontiguousarray(al[: size + 8]))  # noqa: E731
        val = [_row(*cut(*toy_sample(rng, size + 24)), i, "composite") for i in range(n_val)]
    else:
        val = [_row(*toy_sample(rng, size), i, "crop") for i in range(n_val)]
    write_shards(train, out_dir / "train", shard_rows=shard_rows)
    write_shards(val, out_dir / "val", shard_rows=shard_rows)
    summary = {"train": {"rows": n_train}, "val": {"rows": n_val},
               "sampling": {"sizes": [size], "out_size": size, "warmup_size": size,
                            "rotation_deg": rotation_deg, "flip": True},
               "working_max_side": side}
    summary["data_version"] = shards_digest(out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir
