"""Benchmark of the training data path; prints figures (no asserts).

1. `build_shards` (the shard_crops stage): composites stored per second and bytes on disk per composite,
   for the paper's setting (800 px working size) and the CPU default.
2. Fresh training samples per second from the DataLoader, cut in its workers as the trainer cuts them
   (a crop of 512 or 800 centred on a transition pixel, rotated in [-15, 15], flipped, resized to 512;
   warm-up images too), for 0, 1 and 2 workers (`--workers`), and per worker core (target: >= 100
   samples/s with 2 workers on the 2-core CPU; divide a GPU step's samples/s by the per-core figure to
   size its workers). Each crop or warm-up image is one OpenCV affine warp (`fusionnet.data.crops`).

Synthetic composites (800x600, soft-edged shapes over noise) are generated in a temp directory. The
figures are wall-clock: other jobs on the machine lower them (each line prints the load average).
Usage: python benchmarks/bench_data.py [--composites 32] [--epochs 3] [--batch-size 8] [--workers 0 1 2]
Records its figures in benchmarks/results/data.json (benchmarks/machine.py); exit 1 when the 2-worker
DataLoader misses its target (still recorded).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fusionnet.data.crops import CropParams
from fusionnet.data.shards import build_shards

LOADER_TARGET = 100.0  # fresh samples/s with 2 DataLoader workers on the 2-core CPU


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


def bench_write(composites: Path, out: Path, params: CropParams, workers: int, label: str) -> dict[str, float]:
    """Prints the shard_crops figures; returns composites/s, CPU ms and MiB on disk per composite."""
    start, cpu_start = time.perf_counter(), os.times()
    summary = build_shards(composites, out, params, seed=0, workers=workers)
    elapsed, cpu_end = time.perf_counter() - start, os.times()
    cpu = sum(cpu_end[:4]) - sum(cpu_start[:4])  # this process and its joined workers
    rows = summary["train"]["rows"]
    per = summary["train"]["bytes"] / max(1, rows)
    print(f"write  {label:<28} workers={workers}: {rows} composites in {elapsed:5.2f} s = {rows / elapsed:6.1f}/s; "
          f"{1e3 * cpu / rows:5.1f} CPU ms each; {per / 2**20:.2f} MiB per composite on disk "
          f"(paper's 43,100 composites: {per * 43_100 / 2**30:.0f} GiB); load {os.getloadavg()[0]:.1f}")
    return {"rate": rows / elapsed, "cpu_ms": 1e3 * cpu / rows, "mib": per / 2**20}


def bench_read(shards: Path, workers: int, epochs: int, batch_size: int) -> dict[str, object]:
    """Prints the DataLoader figures; returns samples/s, CPU ms per sample and the sample shape."""
    # imported here: build_shards spawns workers, which re-import this module; keep torch out of them
    from fusionnet.train import data as tdata

    dataset = tdata.training_set(shards, seed=0, warmup=True)
    n_batches = len(dataset) // batch_size
    order = lambda e: tdata.rank_indices(tdata.epoch_order(len(dataset), 0, e), 0, n_batches, batch_size, 1, 0, 1)  # noqa: E731
    for batch in tdata.epoch_loader(dataset, order(0), batch_size, workers, 0, 0):
        pass  # warm-up epoch: page cache, worker start
    samples, start, cpu_start = 0, time.perf_counter(), os.times()
    for epoch in range(1, epochs + 1):
        for batch in tdata.epoch_loader(dataset, order(epoch), batch_size, workers, 0, epoch):
            samples += batch["image"].shape[0]
    elapsed, cpu = time.perf_counter() - start, sum(os.times()[:4]) - sum(cpu_start[:4])
    shape = tuple(batch["image"].shape[1:])
    rate = samples / elapsed
    print(f"read   {shape} fresh crops + warm-up, batch {batch_size}, workers={workers}: {samples} samples in "
          f"{elapsed:5.2f} s = {rate:7.1f} samples/s ({rate / max(1, workers):6.1f} per worker); "
          f"{1e3 * cpu / samples:5.1f} CPU ms/sample; load {os.getloadavg()[0]:.1f}")
    return {"rate": rate, "cpu_ms": 1e3 * cpu / samples, "shape": shape}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--composites", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to measure")
    args = parser.parse_args()
    # imported here, not at the top: build_shards's spawned workers re-import this module, keep torch out of them
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import command, header, record

    print(header())
    table: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        composites = make_composites(tmp / "composites", args.composites, height=600, width=800)
        paper = CropParams(sizes=(512, 800), out_size=512, per_image=4, warmup_size=512,
                           rotation_deg=15, flip=True, max_side=800, shard_rows=64)
        paper_zstd = CropParams(**{**paper.__dict__, "compression": "zstd"})
        plain = bench_write(composites, tmp / "paper", paper, 2, "paper: 800 px, uncompressed")
        zstd = bench_write(composites, tmp / "paper-zstd", paper_zstd, 2, "paper: 800 px, zstd")
        table.append({"what": f"shard_crops: composites stored (800x600, 800 px working size, 2 workers, "
                              f"{args.composites} composites)", "command": command(),
                      "result": f"{plain['rate']:.1f} composites/s, {plain['cpu_ms']:.0f} CPU ms each; "
                                f"{plain['mib']:.2f} MiB per composite (zstd: {zstd['rate']:.1f}/s, {zstd['mib']:.2f} MiB)",
                      "target": ""})
        reads = {workers: bench_read(tmp / "paper", workers, args.epochs, args.batch_size) for workers in args.workers}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shape = next(iter(reads.values()))["shape"]
    table.append({"what": f"DataLoader, fresh {shape[1]}x{shape[2]} samples (512/800 crops, rotation, flip, warm-up "
                          f"images), batch {args.batch_size}", "command": "(same run)",
                  "result": "; ".join(f"{w} workers {r['rate']:.0f}/s ({r['cpu_ms']:.1f} CPU ms per sample)"
                                      for w, r in reads.items()),
                  "target": f">= {LOADER_TARGET:.0f} samples/s with 2 workers"})
    missed = 2 in reads and reads[2]["rate"] < LOADER_TARGET
    record("data", table)
    if 2 in reads:
        print(f"target >= {LOADER_TARGET:.0f} samples/s with 2 workers: {'FAIL' if missed else 'PASS'}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
