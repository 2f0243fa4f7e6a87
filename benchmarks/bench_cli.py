"""Seconds per photo: `fusionnet matte` against `fusionnet serve`, same model, photos and settings, in one run.

    .venv/bin/python benchmarks/bench_cli.py [--model FILE] [--photos 3] [--max-side 800]
        [--precision fp32] [--busy]

CLI: `fusionnet matte` (a subprocess, as a user runs it) on 1 photo and on --photos photos; the
difference over (photos - 1) is its time per photo without the model load. Server: `fusionnet serve`
(a subprocess on 127.0.0.1) gets one warm-up request, then each photo POSTed once from one client;
the mean latency is its time per photo. Photos: the first --photos of
../shared/data/alphamatting-dev/image when present, else synthetic 800x600 images. Without --model a
small random densenet121 with narrow decoders (tests/support/server.tiny_model). --busy runs a second
process spinning on one core throughout (a loaded machine: the case issue 27 measured, 18.6 s CLI vs
5.1 s server). Records benchmarks/results/cli.json (benchmarks/machine.py); exit 1 when the CLI's time
per photo is over RATIO_BOUND x the server's.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import command, header, record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.support.server import Server, png_bytes, sample_image, tiny_model  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "alphamatting-dev" / "image"
RATIO_BOUND = 1.5  # the CLI may pay for its own process, not for thread settings that slow it 2-3.6x
SUMMARY = re.compile(r"matted (\d+) of (\d+) images .* in ([0-9.]+) s")


def _photos(folder: Path, count: int) -> list[Path]:
    found = sorted(PHOTOS.glob("*.png"))[:count] if PHOTOS.is_dir() else []
    if len(found) == count:
        return found
    paths = []
    for i in range(count):  # synthetic 800x600 photos
        path = folder / f"synthetic{i}.png"
        path.write_bytes(png_bytes(sample_image(i, (600, 800))))
        paths.append(path)
    return paths


def _spin(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def cli_seconds(model: Path, photos: list[Path], out: Path, options: list[str]) -> float:
    """The CLI's summary time for matting `photos` (model load included), as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "fusionnet.cli.main", "matte", *map(str, photos), "--model",
                             str(model), "--out", str(out), "--no-progress", *options],
                            capture_output=True, text=True, timeout=1800)
    match = SUMMARY.search(result.stdout)
    if result.returncode != 0 or not match:
        raise RuntimeError(f"fusionnet matte failed ({result.returncode}): {result.stderr[-2000:]}")
    return float(match.group(3))


def server_seconds(model: Path, photos: list[Path], log: Path, options: list[str]) -> list[float]:
    """Latency of each photo POSTed once, after one warm-up request."""
    server = Server(model, *options, log=log).wait_ready()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=1800)
        latencies = []
        warm_up = png_bytes(sample_image(99, (600, 800)))  # not one of the photos: the result cache would answer it
        for i, body in enumerate([warm_up, *(photo.read_bytes() for photo in photos)]):
            started = time.perf_counter()
            connection.request("POST", "/matte?output=alpha", body=body,
                               headers={"Content-Type": "image/png"})
            response = connection.getresponse()
            payload = response.read()
            if response.status != 200:
                raise RuntimeError(f"server answered {response.status}: {payload[:300]!r}")
            if i:  # the first is the warm-up
                latencies.append(time.perf_counter() - started)
        return latencies
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model file (default: a small random densenet121)")
    parser.add_argument("--photos", type=int, default=3)
    parser.add_argument("--max-side", type=int, default=800)
    parser.add_argument("--precision", default="fp32", help="both ends (fp32: no auto-precision probe)")
    parser.add_argument("--busy", action="store_true", help="a second process keeps one core busy throughout")
    args = parser.parse_args()
    if args.photos < 2:
        parser.error("--photos must be >= 2 (the CLI's per-photo time is a difference)")
    print(header())
    options = ["--max-side", str(args.max_side), "--precision", args.precision, "--device", "cpu"]
    stop = multiprocessing.Event()
    busy = multiprocessing.Process(target=_spin, args=(stop,), daemon=True) if args.busy else None
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        tmp_path = Path(tmp)
        model = args.model or tiny_model(tmp_path / "tiny.safetensors")
        photos = _photos(tmp_path, args.photos)
        if busy is not None:
            busy.start()
        try:
            one = cli_seconds(model, photos[:1], tmp_path / "one", options)
            many = cli_seconds(model, photos, tmp_path / "many", options)
            served = server_seconds(model, photos, tmp_path / "serve.log", options)
        finally:
            stop.set()
            if busy is not None:
                busy.join(5)
    cli_per_photo = (many - one) / (len(photos) - 1)
    server_per_photo = statistics.fmean(served)
    cpu_flags = subprocess.run("grep -o 'amx[a-z_0-9]*\\|avx512_bf16' /proc/cpuinfo | sort -u", shell=True,
                               capture_output=True, text=True).stdout.split()
    load = "one core kept busy by a second process" if args.busy else "no added load"
    what = (f"{len(photos)} photos ({photos[0].parent.name}), max_side {args.max_side}, {args.precision}, "
            f"{'trained checkpoint ' + str(args.model) if args.model else 'small random densenet121'}; {load}; "
            f"CPU flags: {' '.join(cpu_flags) or '(no amx/avx512_bf16)'}; {os.cpu_count()} cores")
    print(what)
    print(f"fusionnet matte: {cli_per_photo:.2f} s per photo ({one:.1f} s for 1, {many:.1f} s for {len(photos)})")
    print(f"fusionnet serve: {server_per_photo:.2f} s per photo ({', '.join(f'{s:.2f}' for s in served)})")
    ratio = cli_per_photo / server_per_photo
    passed = ratio <= RATIO_BOUND
    record("cli", [{"what": f"seconds per photo, `fusionnet matte` vs `fusionnet serve`: {what}",
                    "command": command(),
                    "result": f"CLI {cli_per_photo:.2f} s, server {server_per_photo:.2f} s per photo ({ratio:.2f}x)",
                    "target": f"CLI <= {RATIO_BOUND}x the server's time per photo"}])
    print(f"target: CLI <= {RATIO_BOUND}x the server ({ratio:.2f}x): {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
