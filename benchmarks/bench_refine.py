"""Time fusionnet.refine at 800x800 (the paper's inference size): guided filter and foreground estimation.

Usage: python benchmarks/bench_refine.py [--size 800] [--repeats 15]

Prints the median and minimum wall time over `repeats` runs after one warm-up call (which compiles
the numba kernels, or loads them from numba's on-disk cache), the median process CPU time (close to
the uncontended time when other processes share the cores), and PASS/FAIL against the 50 ms target
for the guided filter. Timings do not depend on image content, so the inputs are seeded random.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import numpy as np

from fusionnet.refine import estimate_foreground, guided_filter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import header, record  # noqa: E402

GUIDED_FILTER_TARGET_MS = 50.0
GUIDED_FILTER_SETTINGS = [(8, 1e-4), (2, 1e-4), (8, 1e-2), (16, 1e-4), (32, 1e-6)]  # (radius, eps); first is headline


def time_calls(fn: Callable[[], object], repeats: int) -> tuple[float, float, float]:
    """(median wall ms, min wall ms, median CPU ms) over `repeats` calls."""
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return 1e3 * float(np.median(wall)), 1e3 * float(np.min(wall)), 1e3 * float(np.median(cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=800, help="image height and width in pixels")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per setting")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    image = rng.random((args.size, args.size, 3), dtype=np.float32)
    alpha = rng.random((args.size, args.size), dtype=np.float32)
    print(header())
    rows = []

    start = time.perf_counter()
    guided_filter(image, alpha, 8, 1e-4)
    print(f"guided_filter first call (numba compile or cache load): {time.perf_counter() - start:.2f} s")
    for index, (radius, eps) in enumerate(GUIDED_FILTER_SETTINGS):
        median, fastest, cpu = time_calls(lambda: guided_filter(image, alpha, radius, eps), args.repeats)
        verdict = "PASS" if median < GUIDED_FILTER_TARGET_MS else "FAIL"
        label = "  <- headline" if index == 0 else ""
        if index == 0:
            rows.append({"what": f"guided filter, {args.size}x{args.size}, r={radius}, eps={eps:.0e}",
                         "command": "`python benchmarks/bench_refine.py`",
                         "result": f"{median:.1f} ms median ({cpu:.1f} ms CPU)", "target": f"< {GUIDED_FILTER_TARGET_MS:.0f} ms"})
        print(
            f"guided_filter {args.size}x{args.size} r={radius:<2d} eps={eps:.0e}: median {median:6.1f} ms, "
            f"min {fastest:6.1f} ms, cpu {cpu:6.1f} ms, target {GUIDED_FILTER_TARGET_MS:.0f} ms: {verdict}{label}"
        )

    start = time.perf_counter()
    estimate_foreground(image[:64, :64], alpha[:64, :64])
    print(f"estimate_foreground first call (pymatting compile or cache load): {time.perf_counter() - start:.2f} s")
    median, fastest, cpu = time_calls(lambda: estimate_foreground(image, alpha), max(3, args.repeats // 5))
    print(
        f"estimate_foreground {args.size}x{args.size}: median {median:6.1f} ms, min {fastest:6.1f} ms, "
        f"cpu {cpu:6.1f} ms (pymatting's kernels may use both cores)"
    )
    rows.append({"what": f"foreground estimation, {args.size}x{args.size}", "command": "(same run)",
                 "result": f"{median:.0f} ms median", "target": ""})
    record("refine", rows)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
