"""`fusionnet serve` under load: requests/s, latency p50/p95 and the server's RSS before and after.

    .venv/bin/python benchmarks/bench_server.py [--model FILE] [--requests 300] [--clients 8]
        [--size 64] [--workers 2] [--queue 6] [--warm-up 40] [--threads 1] [--cache-mb 4]

Starts the real server (`python -m fusionnet.cli.main serve`, a subprocess on 127.0.0.1; without --model a
small random densenet121 with narrow decoders, pretrained=False), sends --warm-up requests, reads the
server's RSS (VmRSS of /proc/<pid>/status), then --requests POST /matte from --clients threads, each
over its own keep-alive connection (http.client). Every request carries a different image (so the
result cache never answers; it still fills up to its budget) and the outputs cycle through alpha,
rgba, composite and trimap. A 503 (every place taken) is counted, not retried. Figures: requests/s
of the 200s over the run's wall time, latency percentiles of the 200s, RSS after the warm-up and
at the end. tests/test_server.py runs the same soak with bounds on the statuses and on RSS growth.
Records the figures in benchmarks/results/server.json (benchmarks/machine.py); exit 1 when RSS grew
more than RSS_BOUND_MIB, a request failed (other than 503) or the server did not exit cleanly (still recorded).
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import command, header, record  # noqa: E402

OUTPUTS = ("alpha", "rgba", "composite", "trimap")
RSS_BOUND_MIB = 50.0  # README: memory stays flat under load; tests/test_server.py's bound
READY = re.compile(r"serving .* on http://\[?([0-9a-fA-F.:]+)\]?:(\d+)/")
OFFLINE_ENV = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}


def tiny_model(path: Path, seed: int = 0) -> Path:
    """A random densenet121 LateFusionNet with narrow decoders (fast on CPU), saved to `path`."""
    import torch

    from fusionnet.model import LateFusionNet, save

    torch.manual_seed(seed)
    model = LateFusionNet("densenet121", pretrained=False, fpn_width=32, fusion_widths=(32, 16, 16, 16, 32),
                          decoder_max_width=32)
    return save(model, path)


def sample_image(seed: int, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """`(H,W,3)` uint8: a disc on a colour gradient, its place and colours varying with `seed`."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3) * (x / max(1, w - 1))[..., None] + rng.uniform(0, 255, 3) * (y / max(1, h - 1))[..., None]
    cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.3) * min(h, w)
    disc = ((y - cy) ** 2 + (x - cx) ** 2 < r * r)[..., None]
    image = np.where(disc, rng.uniform(0, 255, 3), base / 2)
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (VmRSS in /proc/<pid>/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Server:
    """`fusionnet serve MODEL ARGS...` as a subprocess on 127.0.0.1 (a free port); stderr goes to `log`."""

    def __init__(self, model: str | os.PathLike, *args: str, log: Path, env: dict[str, str] | None = None):
        self.log = Path(log)
        self._log_file = open(self.log, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", **OFFLINE_ENV, **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fusionnet.cli.main", "serve", str(model), "--port", "0", *args],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
        )
        self.pid = self.process.pid
        self.port: int | None = None

    def wait_ready(self, timeout: float = 240.0) -> "Server":
        deadline = time.monotonic() + timeout
        while self.port is None:
            match = READY.search(self.log.read_text())
            if match:
                self.port = int(match.group(2))
            elif self.process.poll() is not None:
                raise RuntimeError(f"fusionnet serve exited ({self.process.returncode}):\n{self.log_text()}")
            elif time.monotonic() > deadline:
                raise RuntimeError(f"fusionnet serve not ready within {timeout:.0f} s:\n{self.log_text()}")
            else:
                time.sleep(0.1)
        return self

    def log_text(self) -> str:
        return self.log.read_text()[-6000:]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; SIGKILL if it does not stop. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode


@dataclass
class LoadResult:
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, 200s only
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses[200]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def run_load(port: int, requests: int, clients: int, size: tuple[int, int] = (64, 64), seed: int = 0,
             timeout: float = 120.0) -> LoadResult:
    """`requests` POST /matte from `clients` threads (keep-alive, one connection each), images all different."""
    bodies = [png_bytes(sample_image(seed + i, size)) for i in range(requests)]
    result, lock = LoadResult(), threading.Lock()
    next_index = iter(range(requests))

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            started = time.perf_counter()
            try:
                connection.request("POST", f"/matte?output={OUTPUTS[i % len(OUTPUTS)]}", body=bodies[i],
                                   headers={"Content-Type": "image/png"})
                response = connection.getresponse()
                payload = response.read()
                status = response.status
                if status == 200 and not payload.startswith(b"\x89PNG"):
                    status = -1
            except (OSError, http.client.HTTPException) as exc:
                status, payload = -2, repr(exc).encode()
                connection.close()
            elapsed = time.perf_counter() - started
            with lock:
                result.statuses[status] += 1
                if status == 200:
                    result.latencies.append(elapsed)
                elif status not in (503,):
                    result.errors.append(f"request {i}: {status} {payload[:200]!r}")
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall_s = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model file (default: a small random densenet121)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="square test images of this side")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--warm-up", type=int, default=40)
    parser.add_argument("--cache-mb", type=int, default=4,
                        help="the server's result cache (small: it is full after the warm-up, so RSS growth is not it)")
    args = parser.parse_args()
    print(header())
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        model = args.model or tiny_model(Path(tmp) / "tiny.safetensors")
        server = Server(model, "--workers", str(args.workers), "--queue", str(args.queue), "--threads",
                        str(args.threads), "--max-side", str(args.size), "--cache-mb", str(args.cache_mb),
                        log=Path(tmp) / "serve.log").wait_ready()
        try:
            warm = run_load(server.port, args.warm_up, args.clients, (args.size, args.size), seed=10**6)
            rss_before = rss_bytes(server.pid)
            load = run_load(server.port, args.requests, args.clients, (args.size, args.size))
            rss_after = rss_bytes(server.pid)
        finally:
            code = server.stop()
    cpu_flags = subprocess.run("grep -o 'amx[a-z_0-9]*\\|avx512_bf16' /proc/cpuinfo | sort -u", shell=True,
                               capture_output=True, text=True).stdout.split()
    print(f"fusionnet serve: {args.requests} requests, {args.clients} clients, {args.size}x{args.size} PNGs, "
          f"{args.workers} workers x {args.threads} thread(s), queue {args.queue}; CPU flags: "
          f"{' '.join(cpu_flags) or '(no amx/avx512_bf16)'}; {os.cpu_count()} cores")
    print(f"warm-up {args.warm_up}: statuses {dict(warm.statuses)}")
    print(f"statuses {dict(sorted(load.statuses.items()))}; {load.ok / load.wall_s:.1f} requests/s (200s) "
          f"over {load.wall_s:.1f} s")
    if load.latencies:
        print(f"latency p50 {load.percentile(50) * 1000:.0f} ms, p95 {load.percentile(95) * 1000:.0f} ms, "
              f"mean {statistics.fmean(load.latencies) * 1000:.0f} ms")
    print(f"server RSS after warm-up {rss_before / 2**20:.1f} MiB, after the run {rss_after / 2**20:.1f} MiB "
          f"(growth {(rss_after - rss_before) / 2**20:+.1f} MiB); server exit status {code}")
    for line in load.errors[:5]:
        print(f"error: {line}")
    growth = (rss_after - rss_before) / 2**20
    model_text = f"trained checkpoint {args.model}" if args.model else "small random densenet121 (NO trained model)"
    result = (f"{load.ok}/{args.requests} answered 200 ({dict(sorted(load.statuses.items()))}), "
              f"{load.ok / load.wall_s:.1f} req/s")
    if load.latencies:
        result += f", p50 {load.percentile(50):.2f} s, p95 {load.percentile(95):.2f} s"
    result += f"; RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB ({growth:+.1f} MiB); exit status {code}"
    record("server", [{"what": f"`fusionnet serve`: {args.requests} requests from {args.clients} clients, {args.workers} "
                               f"workers x {args.threads} thread(s), {args.size} px images; model: {model_text}",
                       "command": command(), "result": result,
                       "target": f"RSS flat (growth <= +{RSS_BOUND_MIB:.0f} MiB), no failed request"}])
    passed = growth <= RSS_BOUND_MIB and not load.errors and code == 0
    print(f"target: RSS growth <= +{RSS_BOUND_MIB:.0f} MiB, no failed request, clean exit: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
