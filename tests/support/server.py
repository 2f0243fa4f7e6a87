"""`fusionnet serve` as a subprocess, a load generator and sample requests, for tests and
benchmarks/bench_server.py (one definition for both)."""

from __future__ import annotations

import http.client
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

READY = re.compile(r"serving .* on http://\[?([0-9a-fA-F.:]+)\]?:(\d+)/")
OFFLINE_ENV = {"DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}


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


OUTPUTS = ("alpha", "rgba", "composite", "trimap")
RSS_BOUND_MIB = 50.0  # README: memory stays flat under load; tests/test_server.py's bound


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
