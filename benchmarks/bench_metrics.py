"""Time the four matting metrics on a realistic 800x800 soft matte pair.

Prints the median time per metric (whole image, "-full", and the 25-pixel transition band, "-25"),
their total, and PASS/FAIL against the target: all four metrics together under 0.5 s per image.
Run: .venv/bin/python benchmarks/bench_metrics.py [--size 800] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from fusionnet.metrics import connectivity_error, gradient_error, mse, sad, transition_band

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import header, record  # noqa: E402

TARGET_S = 0.5  # all four metrics on one 800x800 image


def realistic_pair(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A portrait-like GT matte (soft wobbly edge plus hair strands, 8-bit grid) and a plausible prediction.

    Returns (pred, gt): (size,size) float64 in [0,1].
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.arctan2(yy - 0.55, xx - 0.5)
    radius = 0.3 + 0.04 * np.sin(5 * angle) + 0.02 * np.sin(13 * angle + 1.0)
    inside_px = (radius - np.hypot(yy - 0.55, xx - 0.5)) * size  # signed distance, > 0 inside
    gt = np.clip(0.5 + inside_px / 6.0, 0.0, 1.0)  # ~6 px soft boundary
    strands = ndimage.gaussian_filter(rng.random((size, size)), (6.0, 0.8))  # thin vertical hair
    strands = np.clip((strands - strands.mean()) * 40.0, 0.0, 1.0)
    hair_zone = (inside_px > -40) & (inside_px < 0)
    hair = strands * np.clip(1.0 + inside_px / 40.0, 0.0, 1.0)  # fading out away from the head
    gt = np.where(hair_zone, np.maximum(gt, hair), gt)
    gt = np.round(gt * 255.0) / 255.0
    # a network-like prediction: smoother, slightly off in low frequencies, a little noisy
    drift = ndimage.gaussian_filter(rng.normal(size=(size, size)), 40.0)
    drift *= 0.08 / (np.abs(drift).max() + 1e-12)
    pred = ndimage.gaussian_filter(gt, 1.5) + drift + rng.normal(0.0, 0.01, gt.shape)
    return np.clip(pred, 0.0, 1.0), gt


def cpu_flags() -> str:
    """The CPU line every figure is reported with: model and its amx* / avx512_bf16 flags (none on AVX2 hosts)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = sorted(set(re.findall(r"\b(amx[a-z_0-9]*|avx512_bf16)\b", text)))
    model = re.search(r"model name\s*:\s*(.*)", text)
    return f"{model.group(1) if model else 'unknown CPU'}; amx/avx512_bf16 flags: {' '.join(flags) or 'none'}"


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=800, help="image side in pixels (default 800)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure; the median is printed")
    args = parser.parse_args()

    print(header())
    pred, gt = realistic_pair(args.size)
    band_s = median_time(lambda: transition_band(gt, 25), args.repeats)
    band = transition_band(gt, 25)
    metrics = {"sad": sad, "mse": mse, "gradient": gradient_error, "connectivity": connectivity_error}
    print(f"CPU: {cpu_flags()}")
    print(f"matte pair: {args.size}x{args.size}, transition pixels {int(((gt > 0) & (gt < 1)).sum())}, "
          f"-25 band {int(band.sum())} px ({band.mean():.1%}); cores {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f}; median of {args.repeats} runs")
    print(f"transition_band(gt, 25): {band_s * 1000:7.1f} ms (mask construction, not part of the target)")

    all_pass, totals = True, {}
    for region, mask in (("full", None), ("-25", band)):
        print(f"\nregion {region}:")
        total = 0.0
        for name, metric in metrics.items():
            value = metric(pred, gt, mask)
            seconds = median_time(lambda metric=metric: metric(pred, gt, mask), args.repeats)
            total += seconds
            print(f"  {name:<13} {seconds * 1000:7.1f} ms   value {value:.4f}")
        verdict = "PASS" if total < TARGET_S else "FAIL"
        totals[region] = total
        all_pass &= total < TARGET_S
        print(f"  {'total':<13} {total * 1000:7.1f} ms   target < {TARGET_S * 1000:.0f} ms: {verdict}")
    record("metrics", [{"what": f"SAD + MSE + Gradient + Connectivity, {args.size}x{args.size}",
                        "command": "`python benchmarks/bench_metrics.py`",
                        "result": " / ".join(f"{s:.2f} s ({r})" for r, s in totals.items()),
                        "target": f"< {TARGET_S:g} s"}])
    print(f"\noverall: {'PASS' if all_pass else 'FAIL'}")


if __name__ == "__main__":
    main()
