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
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import command, header, record  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.support.server import (  # noqa: E402  (one definition, shared with the tests)
    RSS_BOUND_MIB,
    Server,
    rss_bytes,
    run_load,
    tiny_model,
)


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
