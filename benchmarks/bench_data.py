"""Benchmark of the shard_crops data path; prints figures (no asserts).

1. Crops written per second by `build_shards` (PNG decode, crop/rotate/resize, Parquet write), with 1 and
   2 worker processes, for the paper's setting (crops of 512 and 800 resized to 512, rotation 15 degrees)
   and for the CPU default of params.yaml (160).
2. DataLoader read throughput of 512x512 training samples with augmentation (flip + colour jitter), for
   0 and 2 workers (target: >= 100 samples/s with 2 workers).

Synthetic composites (640x480, soft-edged shapes over noise) are generated in a temp directory.
Usage: python benchmarks/bench_data.py [--composites 32] [--per-image 8] [--epochs 3] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fusionnet.data.crops import CropParams
from fusionnet.data.shards import build_shards


def make_composites(root: Path, count: int, height: int = 480, width: int = 640, seed: int = 0) -> Path:
    """count train composites (contract layout) with a soft-edged ellipse matte over smooth noise."""
    rng = np.random.default_rng(seed)
    for sub in ("image", "alpha", "trimap"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width]
    records = []
    for i in range(count):
        cid = f"c{i:04d}"
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        dist = np.hypot((yy - cy) / (0.3 * height), (xx - cx) / (0.25 * width))
        alpha = np.clip((1 - dist) * 20 + 0.5, 0, 1)
        bg = np.asarray(Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8))
                        .resize((width, height), Image.BICUBIC), dtype=np.float64)
        fg = rng.uniform(0, 255, 3) * (0.6 + 0.4 * yy[..., None] / height)
        image = (alpha[..., None] * fg + (1 - alpha[..., None]) * bg).round().astype(np.uint8)
        alpha_u8 = (alpha * 255).round().astype(np.uint8)
        Image.fromarray(image).save(root / "image" / f"{cid}.png")
        Image.fromarray(alpha_u8).save(root / "alpha" / f"{cid}.png")
        Image.fromarray(np.where(alpha_u8 % 255 == 0, alpha_u8, 128).astype(np.uint8)).save(root / "trimap" / f"{cid}.png")
        records.append(dict(cid=cid, split="train", fg_id=f"fg{i}", bg_name=f"bg{i}", width=width, height=height,
                            image_path=f"image/{cid}.png", alpha_path=f"alpha/{cid}.png",
                            trimap_path=f"trimap/{cid}.png"))
    pq.write_table(pa.Table.from_pylist(records), root / "manifest.parquet")
    return root


def bench_write(composites: Path, out: Path, params: CropParams, workers: int, label: str) -> None:
    start, cpu_start = time.perf_counter(), os.times()
    summary = build_shards(composites, out, params, seed=0, workers=workers)
    elapsed, cpu_end = time.perf_counter() - start, os.times()
    # CPU seconds of this process and its (joined) workers: the figure to trust on a busy machine
    cpu = sum(cpu_end[:4]) - sum(cpu_start[:4])
    crops, warmup = summary["train"]["rows"], summary["warmup"]["rows"]
    size_mb = sum(p.stat().st_size for p in out.rglob("*.parquet")) / 1e6
    print(f"write  {label:<31} workers={workers}: {crops} crops + {warmup} warm-up in {elapsed:5.2f} s "
          f"= {crops / elapsed:6.1f} crops/s ({(crops + warmup) / elapsed:6.1f} rows/s); "
          f"{1e3 * cpu / (crops + warmup):5.1f} CPU ms/row; {size_mb:.0f} MB; load {os.getloadavg()[0]:.1f}")


def bench_read(shards: Path, workers: int, epochs: int, batch_size: int) -> None:
    # imported here: build_shards spawns workers, which re-import this module; keep torch out of them
    from fusionnet.data.dataset import ShardDataset, make_loader

    dataset = ShardDataset(shards, augment=True, seed=0, color_jitter=0.1)
    loader = make_loader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True, seed=0, drop_last=True)
    for batch in loader:  # warm-up epoch: page cache, worker start
        pass
    samples, start, cpu_start = 0, time.perf_counter(), os.times()
    for _ in range(epochs):
        for batch in loader:
            samples += batch["image"].shape[0]
    elapsed, cpu = time.perf_counter() - start, sum(os.times()[:4]) - sum(cpu_start[:4])
    shape = tuple(batch["image"].shape[1:])
    print(f"read   {shape} augment, batch {batch_size}, workers={workers}: {samples} samples in {elapsed:5.2f} s "
          f"= {samples / elapsed:7.1f} samples/s; {1e3 * cpu / samples:5.1f} CPU ms/sample; "
          f"load {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--composites", type=int, default=32)
    parser.add_argument("--per-image", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        composites = make_composites(tmp / "composites", args.composites)
        paper = CropParams(sizes=(512, 800), out_size=512, per_image=args.per_image, warmup_size=512,
                           rotation_deg=15, flip=True, max_side=800, shard_rows=64)
        cpu = CropParams(sizes=(160,), out_size=160, per_image=args.per_image, warmup_size=160,
                         rotation_deg=15, flip=True, max_side=800, shard_rows=256)
        for workers in (1, 2):
            bench_write(composites, tmp / f"paper-{workers}", paper, workers, "paper: 512/800 -> 512, rot 15")
        for workers in (1, 2):
            bench_write(composites, tmp / f"cpu-{workers}", cpu, workers, "cpu default: 160, rot 15")
        for workers in (0, 2):
            bench_read(tmp / "paper-2" / "train", workers, args.epochs, args.batch_size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
