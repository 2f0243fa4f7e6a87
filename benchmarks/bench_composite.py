"""Composites written per second by the composite step (default-profile sizes), on 1 and 2 worker processes.

Builds a throw-away set of synthetic foregrounds in a temp folder, then times build_composites end
to end: background generation/loading, DIM fit, compositing, trimap, PNG writes, manifest, contact sheet.
Usage: python benchmarks/bench_composite.py [--foregrounds 16] [--size 320] [--bg-per-fg 4]
Records its figures in benchmarks/results/composite.json (benchmarks/machine.py); no target.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from fusionnet.data.backgrounds import builtin_backgrounds
from fusionnet.data.collect import CollectConfig, collect_foregrounds, read_manifest
from fusionnet.data.composite import CompositeConfig, build_composites
from fusionnet.data.sources import synthetic_candidates


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--foregrounds", type=int, default=16)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--bg-per-fg", type=int, default=4)
    parser.add_argument("--backgrounds", type=int, default=48)
    args = parser.parse_args()
    # imported here, not at the top: the spawned pool workers re-import this module, keep torch out of them
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import command, header, record

    print(header())
    table: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        collect_foregrounds(synthetic_candidates(args.foregrounds), tmp / "fg",
                            CollectConfig(synthetic_size=(args.size, args.size), workers=2))
        seconds = time.perf_counter() - start
        print(f"collect (synthetic, 2 workers): {args.foregrounds / seconds:.1f} foregrounds/s "
              f"({args.foregrounds} of {args.size}x{args.size} in {seconds:.2f} s)")
        table.append({"what": f"collect: synthetic {args.size}x{args.size} foregrounds, 2 workers", "command": command(),
                      "result": f"{args.foregrounds / seconds:.1f} foregrounds/s", "target": ""})
        rows = read_manifest(tmp / "fg")
        backgrounds = builtin_backgrounds(args.backgrounds, seed=0)
        for workers in (1, 2):
            config = CompositeConfig(bg_per_fg=args.bg_per_fg, bg_per_test_fg=args.bg_per_fg, workers=workers)
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            written, _ = build_composites(rows, tmp / "fg", backgrounds, None, tmp / f"comp{workers}", config)
            seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
            print(f"composite ({workers} worker{'s' if workers > 1 else ''}): {len(written) / seconds:.1f} "
                  f"composites/s ({len(written)} in {seconds:.2f} s wall, {cpu:.2f} s CPU incl. workers; "
                  f"{args.backgrounds} builtin backgrounds, band radius 25)")
            table.append({"what": f"composites written ({args.size}x{args.size} foregrounds x {args.bg_per_fg} "
                                  f"backgrounds), {workers} worker{'s' if workers > 1 else ''}", "command": "(same run)",
                          "result": f"{len(written) / seconds:.1f} composites/s ({cpu / len(written) * 1e3:.0f} CPU ms each)",
                          "target": ""})
        print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other processes share them)")
    record("composite", table)


if __name__ == "__main__":
    main()
