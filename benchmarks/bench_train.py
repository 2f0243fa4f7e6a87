"""Benchmark of the three training steps on this machine; prints figures (no asserts).

For each step (segmentation, fusion, joint) and each crop size (the default profile's, and the paper's
512): training samples per second, process CPU seconds per sample, and the share of the training-loop
time spent waiting for data (target: under 10%). Runs `run_step` itself with the settings of
params.yaml (backbone, batch size, precision, channels_last, workers), a few iterations per step, on
toy shards written to a temp directory at each size. The first iteration (one-off allocation and
oneDNN kernel selection) is excluded by running one warm-up iteration before the timed ones.

Usage: python benchmarks/bench_train.py [--params params.yaml] [--sizes 160 512] [--iters 6]
           [--paper-batch 2] [--backbone densenet201] [--threads N]

Records one row per crop size in benchmarks/results/train.json (benchmarks/machine.py); exit 1 when a
step's data wait is 10% or more (still recorded).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fusionnet.train.config import STEPS, StepConfig
from fusionnet.train.loop import run_step
from fusionnet.train.toy import write_toy_shards

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import command, header, record  # noqa: E402

PAPER_CROP = 512
WAIT_TARGET = 0.10  # share of the training-loop time spent waiting for data


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_step(step: str, cfg: StepConfig, shards: Path, out: Path, iters: int) -> dict[str, float]:
    # one iteration first (allocations, kernel choice), then the timed ones as a resumed epoch 2
    warm = cfg.replace(epochs=1, max_iters_per_epoch=1, val_max_images=1, visual_count=0, checkpoint_every=10_000)
    run_step(step, warm, shards, out / "warm")
    timed = warm.replace(max_iters_per_epoch=iters)
    c0 = cpu_seconds()
    result = run_step(step, timed, shards, out / "timed", init_checkpoint=out / "warm" / "model.safetensors")
    cpu = cpu_seconds() - c0
    return {"samples_per_s": result.samples_per_s, "wait": result.data_wait_fraction,
            "cpu_per_sample": cpu / max(1, result.iterations * cfg.batch_size), "samples": result.iterations * cfg.batch_size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="crop sizes (default: params crops.out_size and 512)")
    parser.add_argument("--iters", type=int, default=6, help="timed iterations per step and size")
    parser.add_argument("--paper-batch", type=int, default=2, help="batch size at the paper's 512 crops (paper: 2 per GPU)")
    parser.add_argument("--backbone", default=None, help="override model.backbone (paper: densenet201)")
    parser.add_argument("--threads", type=int, default=None, help="override train_common.threads")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    args = parser.parse_args()

    params = yaml.safe_load(args.params.read_text())
    default_size = int(params.get("crops", {}).get("out_size", 160))
    sizes = args.sizes or [default_size, PAPER_CROP]
    print(header())
    table: list[dict] = []
    worst_wait = 0.0
    print(f"bench_train: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (other processes slow every figure)")
    print(f"{'step':<13}{'crop':>6}{'batch':>6}{'precision':>10}{'samples/s':>11}{'cpu s/sample':>14}{'data wait':>11}")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for size in sizes:
            shards = write_toy_shards(Path(tmp) / f"shards{size}", n_train=64, n_val=1, size=size)
            figures = []
            for step in args.steps:
                cfg = StepConfig.from_params(params, step)
                changes = {"warmup_epochs": 0}
                if size == PAPER_CROP and size != default_size:
                    changes["batch_size"] = args.paper_batch
                if args.backbone:
                    changes["backbone"] = args.backbone
                if args.threads:
                    changes["threads"] = args.threads
                cfg = cfg.replace(**changes)
                t0 = time.perf_counter()
                r = bench_step(step, cfg, shards, Path(tmp) / f"{step}{size}", args.iters)
                print(f"{step:<13}{size:>6}{cfg.batch_size:>6}{cfg.precision:>10}{r['samples_per_s']:>11.2f}"
                      f"{r['cpu_per_sample']:>14.2f}{r['wait']:>10.1%}   ({r['samples']} samples, {time.perf_counter() - t0:.0f} s with setup)",
                      flush=True)
                figures.append(f"{step} {r['samples_per_s']:.2f}/s ({r['cpu_per_sample']:.2f} CPU s/sample, "
                               f"data wait {r['wait']:.1%})")
                worst_wait = max(worst_wait, r["wait"])
            table.append({"what": f"training samples/s, {size} px crops, batch {cfg.batch_size}, {cfg.backbone}, "
                                  f"{cfg.precision}, threads {cfg.threads or 'default'}",
                          "command": command() if not table else "(same run)", "result": "; ".join(figures),
                          "target": f"data wait < {WAIT_TARGET:.0%}"})
    print(f"backbone {cfg.backbone}, channels_last {cfg.channels_last}, num_workers {cfg.num_workers}, threads {cfg.threads or 'default'}")
    record("train", table)
    print(f"data wait target < {WAIT_TARGET:.0%}: {'PASS' if worst_wait < WAIT_TARGET else 'FAIL'} (worst {worst_wait:.1%})")
    return 0 if worst_wait < WAIT_TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
