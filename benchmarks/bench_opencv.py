"""Old (scipy / numpy FFT / PIL) against new (OpenCV) for every swap of issue 11, in ONE run.

Prints one table, old s | new s | old/new, for
1. each swapped function on realistic sizes (800x800 mattes for the metrics' building blocks, 320 px
   synthetic foregrounds for the generator's blurs);
2. the swaps measured and dropped (kernels differ: the max/mean difference is printed with the time);
3. the data stages' hot paths, in this process (workers=1, so the old code can be patched in): the
   collect stage on N synthetic foregrounds, the trimaps of N 640x480 mattes, the composite stage;
4. the four metrics on an 800x800 pair (benchmarks/bench_metrics.realistic_pair), "-full" and "-25";
then the metrics' values before and after on real alphamatting.com mattes (pred = blurred + noisy GT),
when ../shared/data is present. "old" is tests/support/scipy_reference.py, patched into the library modules.
OpenCV runs single-threaded (cv2.setNumThreads(1), the library's setting). Times are the best of
interleaved old/new runs; the machine may be shared, so compare ratios within one run.
Usage: python benchmarks/bench_opencv.py [--repeats 5] [--foregrounds 8]
Records one row per section (old/new ratios) in benchmarks/results/opencv.json (benchmarks/machine.py);
no target.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.support.scipy_reference: the replaced implementations live with the tests

from bench_metrics import cpu_flags, realistic_pair  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)

from fusionnet import metrics  # noqa: E402
from fusionnet.data import synthetic  # noqa: E402
from fusionnet.data.backgrounds import builtin_backgrounds  # noqa: E402
from fusionnet.data.collect import CollectConfig, collect_foregrounds, read_manifest  # noqa: E402
from fusionnet.data.composite import CompositeConfig, build_composites  # noqa: E402
from fusionnet.data.imagefiles import read_alpha, read_rgb, resize_float  # noqa: E402
from fusionnet.data.sources import synthetic_candidates  # noqa: E402
from fusionnet.data.trimap import band_trimap  # noqa: E402
from tests.support import scipy_reference as ref  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import command, header, record  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
METRICS = {"SAD": metrics.sad, "MSE": metrics.mse, "Grad": metrics.gradient_error, "Conn": metrics.connectivity_error}


def paired_best(old: Callable[[], object], new: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best (minimum) seconds of old() and new(), run alternately so load changes hit both alike.

    The minimum, not the median: on a machine other jobs load, the median measures their load too
    (allocation-heavy code such as a 2.5 MB label image varied 4x between runs); one warm-up each.
    """
    old(), new()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((old, times[0]), (new, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def with_old(fn: Callable[[], object]) -> Callable[[], object]:
    """fn run with the pre-OpenCV implementations patched into the library."""

    def run() -> object:
        with ref.scipy_implementations():
            return fn()

    return run


class Table:
    """Prints old s | new s | old/new per row; keeps each section's ratios for the recorded rows."""

    def __init__(self) -> None:
        print(f"{'':<58} {'old s':>9} {'new s':>9} {'old/new':>8}  note")
        self.sections: dict[str, list[str]] = {}

    def section(self, title: str) -> None:
        print(f"-- {title}")
        self.sections[title] = []

    def row(self, name: str, times: tuple[float, float], note: str = "") -> None:
        old, new = times
        print(f"{name:<58} {old:9.4f} {new:9.4f} {old / new:7.2f}x  {note}")
        self.sections[next(reversed(self.sections))].append(f"{name.split(' (')[0]} {old / new:.2f}x")

    def rows(self) -> list[dict]:
        """One {what, command, result, target} row per section: its old/new ratios."""
        return [{"what": f"OpenCV swaps (old scipy/FFT/PIL / new OpenCV, one run): {title}",
                 "command": command() if i == 0 else "(same run)", "result": "; ".join(cells), "target": ""}
                for i, (title, cells) in enumerate(self.sections.items())]


def level_diff(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> str:
    """Max and mean absolute difference of two 8-bit results, in levels (optionally over `where` only)."""
    diff = np.abs(np.rint(np.asarray(a, np.float64)) - np.rint(np.asarray(b, np.float64)))
    if where is not None:
        diff = diff[where]
    return f"max {diff.max():.0f}, mean {diff.mean():.2f} levels"


def swapped_functions(table: Table, repeats: int) -> None:
    pred, gt = realistic_pair(800)
    core = (gt > 0) & (gt < 1)
    table.section("swapped functions (kept): results equal, or equal to float rounding")
    band_new, band_old = metrics.transition_band(gt, 25), ref.transition_band(gt, 25)
    table.row("transition_band r=25, 800x800 (edt -> distanceTransform)",
              paired_best(lambda: ref.transition_band(gt, 25), lambda: metrics.transition_band(gt, 25), repeats),
              f"{int((band_new != band_old).sum())} pixels differ; {int(core.sum())} transition px")
    binary = np.minimum(pred, gt).astype(np.float32) >= 0.5
    same = np.array_equal(metrics._largest_component(binary), ref.largest_component(binary))
    table.row("largest 4-connected component, 800x800 (label -> cv2)",
              paired_best(lambda: ref.largest_component(binary), lambda: metrics._largest_component(binary),
                             repeats), f"identical: {same}")
    diff = max(np.abs(n - o).max() for n, o in zip(metrics.gaussian_gradient(gt), ref.gaussian_gradient(gt)))
    table.row("gaussian_gradient s=1.4, 800x800 (convolve1d -> sepFilter2D)",
              paired_best(lambda: ref.gaussian_gradient(gt), lambda: metrics.gaussian_gradient(gt), repeats),
              f"max |diff| {diff:.1e}")
    rng = np.random.default_rng(0)
    inside = (rng.random((40, 40)) < 0.5).astype(np.float32).repeat(8, axis=0).repeat(8, axis=1)
    diff = np.abs(synthetic._gaussian_blur(inside, 5.0) - ref.gaussian_blur(inside, 5.0)).max()
    table.row("synthetic veil blur s=5, 320x320 (gaussian_filter -> cv2)",
              paired_best(lambda: ref.gaussian_blur(inside, 5.0), lambda: synthetic._gaussian_blur(inside, 5.0),
                             repeats), f"max |diff| {diff:.1e} (float32)")
    stack = rng.random((320, 320, 4)).astype(np.float32)  # alpha + premultiplied RGB, as _blur_region blurs them
    for seed in (0, 1):  # a 7x7 and a 9x9 point-spread function (FFT sizes 326 and 328)
        psf = synthetic._blur_kernel(np.random.default_rng(seed))
        diff = np.abs(synthetic._convolve_same(stack, psf) - ref.convolve_same(stack, psf)).max()
        table.row(f"synthetic blur {psf.shape[0]}x{psf.shape[1]} psf, 320x320x4 (numpy FFT -> filter2D)",
                  paired_best(lambda psf=psf: ref.convolve_same(stack, psf),
                                 lambda psf=psf: synthetic._convolve_same(stack, psf), repeats),
                  f"max |diff| {diff:.1e} (old FFT ran in float32)")


def dropped_swaps(table: Table, repeats: int) -> None:
    table.section("measured and dropped (resampling kernels differ)")
    alpha_path = SHARED / "alphamatting-dev" / "alpha" / "GT04.png"
    if alpha_path.is_file():
        alpha, source = read_alpha(alpha_path).astype(np.float32), "real matte GT04"
    else:
        alpha, source = np.rint(realistic_pair(800)[1] * 255).astype(np.float32), "synthetic 800x800 matte"
    hw = (round(alpha.shape[0] * 0.4), round(alpha.shape[1] * 0.4))
    old, new = resize_float(alpha, hw), cv2.resize(alpha, hw[::-1], interpolation=cv2.INTER_AREA)
    soft = (np.rint(old) > 0) & (np.rint(old) < 255)
    table.row(f"alpha shrink x0.4, {source} (PIL bilinear -> INTER_AREA)",
              paired_best(lambda: resize_float(alpha, hw),
                             lambda: cv2.resize(alpha, hw[::-1], interpolation=cv2.INTER_AREA), repeats),
              f"transition px: {level_diff(old, new, soft)}")
    photo = alpha_path.parents[1] / "image" / "GT04.png"
    photo = read_rgb(photo) if photo.is_file() else np.random.default_rng(1).integers(0, 256, (600, 800, 3), np.uint8)
    image = cv2.resize(photo, (2000, 1500), interpolation=cv2.INTER_CUBIC).astype(np.float32)  # a 3 MP composite
    table.row("composite shrink 2000x1500x3 -> 640 (PIL bilinear -> INTER_AREA)",
              paired_best(lambda: resize_float(image, (480, 640)),
                             lambda: cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA), repeats),
              level_diff(resize_float(image, (480, 640)), cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA)))
    photos = sorted((SHARED / "backgrounds" / "cbsd68").glob("*.png"))
    bg = read_rgb(photos[0]) if photos else np.random.default_rng(2).integers(0, 256, (321, 481, 3), dtype=np.uint8)
    size = (math.ceil(bg.shape[1] * 2.5), math.ceil(bg.shape[0] * 2.5))
    pil_fit = lambda: np.asarray(Image.fromarray(bg).resize(size, Image.Resampling.BICUBIC))  # noqa: E731
    cv_fit = lambda: cv2.resize(bg, size, interpolation=cv2.INTER_CUBIC)  # noqa: E731
    table.row(f"background fit x2.5 {bg.shape[1]}x{bg.shape[0]} (PIL bicubic -> INTER_CUBIC)",
              paired_best(pil_fit, cv_fit, repeats), level_diff(pil_fit(), cv_fit()))
    grid = np.random.default_rng(3).random((13, 13), dtype=np.float32)
    pil_up = lambda: np.asarray(Image.fromarray(grid).resize((320, 320), Image.Resampling.BICUBIC))  # noqa: E731
    cv_up = lambda: cv2.resize(grid, (320, 320), interpolation=cv2.INTER_CUBIC)  # noqa: E731
    table.row("fractal noise octave 13x13 -> 320 (PIL bicubic -> INTER_CUBIC)", paired_best(pil_up, cv_up, repeats),
              f"max |diff| {np.abs(pil_up() - cv_up()).max():.3f} of 1")


def data_stages(table: Table, repeats: int, foregrounds: int) -> None:
    table.section(f"data stages' hot paths (in-process, workers=1; {foregrounds} foregrounds)")
    config = CollectConfig(synthetic_size=(320, 320), workers=1)
    candidates = synthetic_candidates(foregrounds)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        collect = lambda: collect_foregrounds(candidates, tmp / "fg", config)  # noqa: E731
        table.row(f"collect: {foregrounds} synthetic 320x320 foregrounds",
                  paired_best(with_old(collect), collect, max(1, repeats // 2)), "blurs are half the foregrounds")
        rows = read_manifest(tmp / "fg")
        mattes = [read_alpha(tmp / "fg" / r["alpha_path"]) for r in rows]
        mattes = [cv2.resize(a, (640, 480), interpolation=cv2.INTER_LINEAR) for a in mattes]
        trimaps = lambda: [band_trimap(a, 25) for a in mattes]  # noqa: E731
        table.row(f"trimaps: band_trimap r=25 on {len(mattes)} 640x480 mattes",
                  paired_best(with_old(trimaps), trimaps, repeats))
        backgrounds = builtin_backgrounds(48, seed=0)
        composite_config = CompositeConfig(bg_per_fg=4, bg_per_test_fg=4, workers=1)
        composite = lambda: build_composites(rows, tmp / "fg", backgrounds, None, tmp / "comp",  # noqa: E731
                                             composite_config)
        table.row(f"composite: {len(rows)} x 4 composites, 320 px (stage end to end)",
                  paired_best(with_old(composite), composite, max(1, repeats // 2)),
                  "only its 1 trimap per foreground changed")


def metric_timings(table: Table, repeats: int) -> None:
    pred, gt = realistic_pair(800)
    band = metrics.transition_band(gt, 25)
    for region, mask in (("full", None), ("-25", band)):
        table.section(f"metrics on 800x800, region {region}")
        totals = [0.0, 0.0]
        for name, metric in METRICS.items():
            times = paired_best(with_old(lambda metric=metric: metric(pred, gt, mask)),
                                   lambda metric=metric: metric(pred, gt, mask), repeats)
            totals = [totals[0] + times[0], totals[1] + times[1]]
            new_value = metric(pred, gt, mask)
            with ref.scipy_implementations():
                old_value = metric(pred, gt, mask)
            table.row(f"{name}", times, f"value {new_value:.6f}, change {relative_change(old_value, new_value):.1e}")
        table.row("all four", (totals[0], totals[1]))


def relative_change(old: float, new: float) -> float:
    return abs(new - old) / max(abs(old), 1e-300)


def real_matte_values() -> dict[str, float]:
    """Prints the metrics' values before and after on 4 real mattes; returns the largest relative change per metric."""
    folder = SHARED / "alphamatting-dev"
    if not folder.is_dir():
        print(f"\nreal mattes: skipped ({folder} absent)")
        return {}
    print("\nmetric values before -> after on real mattes (pred = GT blurred s=2.5 + noise 0.02, 8-bit; -25 band):")
    rng = np.random.default_rng(0)
    worst = dict.fromkeys(METRICS, 0.0)
    for name in ("GT02.png", "GT07.png", "GT13.png", "GT18.png"):
        gt = read_alpha(folder / "alpha" / name).astype(np.float64) / 255
        pred = np.round(np.clip(cv2.GaussianBlur(gt, (0, 0), 2.5) + rng.normal(0, 0.02, gt.shape), 0, 1) * 255) / 255
        with ref.scipy_implementations():
            band = metrics.transition_band(gt, 25)
            old = {k: f(pred, gt, band) for k, f in METRICS.items()}
        new_band = metrics.transition_band(gt, 25)
        new = {k: f(pred, gt, new_band) for k, f in METRICS.items()}
        cells = []
        for k in METRICS:
            worst[k] = max(worst[k], relative_change(old[k], new[k]))
            cells.append(f"{k} {old[k]:.6g} -> {new[k]:.6g}")
        print(f"  {name}: band {'same' if np.array_equal(band, new_band) else 'DIFFERENT'}; " + "; ".join(cells))
    print("  largest relative change: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each old/new pair (best printed)")
    parser.add_argument("--foregrounds", type=int, default=8, help="synthetic foregrounds for the data stages")
    args = parser.parse_args()
    cv2.setNumThreads(1)  # what fusionnet.metrics / data.synthetic / data.crops set on import
    print(header())
    print(f"CPU: {cpu_flags()}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start")
    print(f"OpenCV {cv2.__version__}, {cv2.getNumThreads()} thread; numpy {np.__version__}; best of "
          f"{args.repeats} interleaved runs. Shared machine: absolute seconds are noisy, ratios count.")
    table = Table()
    swapped_functions(table, args.repeats)
    dropped_swaps(table, args.repeats)
    data_stages(table, args.repeats, args.foregrounds)
    metric_timings(table, args.repeats)
    worst = real_matte_values()
    rows = table.rows()
    if worst:
        rows.append({"what": "OpenCV swaps: metric values on 4 real alphamatting.com mattes, -25 band, largest "
                             "relative change old -> new", "command": "(same run)",
                     "result": ", ".join(f"{k} {v:.1e}" for k, v in worst.items()), "target": ""})
    record("opencv", rows)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
