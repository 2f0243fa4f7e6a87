"""`fusionnet serve`: an HTTP server for a matting model (POST /matte, GET /health, GET / the page).

    fusionnet serve [MODEL] [--host 127.0.0.1] [--port 8000] [--workers 1] [--queue 8] ...

MODEL is a model file or a registry URI (default `models:/late-fusion-matting@champion`, resolved
by the installed `fusionnet.model_resolvers` plugin). It is loaded once, warmed up, and then served
by `--workers` inference threads with `--queue` more requests allowed to wait; beyond that the
answer is 503 with Retry-After. A registry model brings its registered settings (max_side,
precision, refine, guided-filter radius and eps); options given here override them.

This module imports only the standard library: `fusionnet --help` must not pay for torch.
Routes and errors: `fusionnet.server.http`; admission, cache and the matting job:
`fusionnet.server.service`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from fusionnet.cli.argtypes import int_at_least, positive_number

DEFAULT_MODEL = "models:/late-fusion-matting@champion"
DEFAULT_MAX_BYTES = 32 << 20
DEFAULT_MAX_PIXELS = 50_000_000  # a server decodes several images at once: lower than the CLI's
DEFAULT_TIMEOUT = 60.0
DEFAULT_SOCKET_TIMEOUT = 30.0
DEFAULT_CACHE_MB = 128
EXIT_OK, EXIT_USAGE = 0, 2
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


_seconds = positive_number("number of seconds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` subcommand's options."""
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"model file or registry URI (default {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; there is no authentication)")
    parser.add_argument("--port", type=int_at_least(0), default=8000, help="TCP port (default 8000; 0: any free port)")
    parser.add_argument("--workers", type=int_at_least(1), default=1,
                        help="inferences run at the same time, one per thread (default 1)")
    parser.add_argument("--queue", type=int_at_least(0), default=8,
                        help="requests that may wait for a worker; more get 503 + Retry-After (default 8)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch threads (default: OMP_NUM_THREADS if set, else CPU cores / --workers)")
    parser.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT,
                        help=f"seconds from admission to answer before 504 (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--socket-timeout", type=_seconds, default=DEFAULT_SOCKET_TIMEOUT,
                        help=f"seconds a connection may stay silent (default {DEFAULT_SOCKET_TIMEOUT:g})")
    parser.add_argument("--max-bytes", type=int_at_least(1), default=DEFAULT_MAX_BYTES,
                        help=f"largest request body; larger gets 413 (default {DEFAULT_MAX_BYTES})")
    parser.add_argument("--max-pixels", type=int_at_least(1), default=DEFAULT_MAX_PIXELS,
                        help=f"refuse images with more pixels, from the header (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--max-output-side", type=int_at_least(1), default=None,
                        help="larger images are decoded downscaled to this longer side (default: the CLI's 6144)")
    parser.add_argument("--max-side", type=int_at_least(1), default=None,
                        help="network input's longer side (default: registered setting, else 800); "
                        "a request may ask for 32..4096 with ?max_side=")
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                        help="guided-filter refinement by default (default: registered setting, else on); ?refine=")
    parser.add_argument("--radius", type=int_at_least(0), default=None,
                        help="guided filter radius (default: registered setting, else 8)")
    parser.add_argument("--eps", type=float, default=None, help="guided filter eps (default: registered, else 1e-4)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp32-cl", "bf16", "int8", "fp16"), default=None,
                        help="default: registered setting, else auto (fusionnet.inference.precision)")
    parser.add_argument("--cache-mb", type=int_at_least(0), default=DEFAULT_CACHE_MB,
                        help="memory for recent results, so alpha, cut-out and composite of one upload cost one "
                        f"inference (default {DEFAULT_CACHE_MB}; 0: off)")


def _threads_from_env() -> int | None:
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    """Listen, load the model, warm it up, serve until SIGINT/SIGTERM.

    Returns 0 after a clean stop (running inferences get up to --timeout to finish), 2 if it cannot start.
    """
    started = time.perf_counter()
    from fusionnet.server.http import Limits, MattingHTTPServer

    limits = Limits(max_bytes=args.max_bytes, timeout=args.timeout, socket_timeout=args.socket_timeout)
    try:
        httpd = MattingHTTPServer((args.host, args.port), limits)
    except OSError as exc:
        return _fail(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc})")
    try:
        service = _load_service(args, httpd)
    except _StartError as exc:
        httpd.server_close()
        return _fail(str(exc))
    host, port = httpd.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    if args.host not in _LOOPBACK:
        print(f"note: listening on {args.host}: reachable from other machines, with no authentication", file=sys.stderr)
    matter = service.matter
    print(f"serving {args.model} ({matter.device}, {matter.precision}, {args.workers} worker(s), queue {args.queue}) "
          f"on http://{shown}:{port}/ (ready in {time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)

    stopped: list[str] = []

    def stop(signum: int, _frame) -> None:
        stopped.append(signal.Signals(signum).name)
        threading.Thread(target=httpd.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        httpd.server_close()
        idle = service.close(grace=args.timeout)
    print(f"stopped ({', '.join(stopped) or 'shutdown'}); requests {service.state()['requests']}",
          file=sys.stderr, flush=True)
    if not idle:
        # A running inference cannot be interrupted; its worker thread would hold up interpreter exit.
        print(f"note: an inference was still running {args.timeout:g} s after the stop; leaving it", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(EXIT_OK)
    return EXIT_OK


class _StartError(Exception):
    pass


def _load_service(args: argparse.Namespace, httpd):
    """The model opened once (fusionnet.inference.opening), its MattingService, warmed up and attached to `httpd`."""
    import torch

    from fusionnet.inference.matter import DEFAULT_MAX_OUTPUT_SIDE
    from fusionnet.inference.opening import open_model
    from fusionnet.io.hashing import file_sha256
    from fusionnet.server.service import MattingService

    threads = args.threads or _threads_from_env() or max(1, len(os.sched_getaffinity(0)) // args.workers)
    torch.set_num_threads(threads)  # each worker's inference gets its share of the cores
    try:
        opened = open_model(args.model, device=args.device, threads=threads, max_side=args.max_side,
                            precision=args.precision, refine=args.refine, radius=args.radius, eps=args.eps)
    except ImportError as exc:
        raise _StartError(f"model {args.model}: ONNX models need onnxruntime ({exc})") from exc
    except (OSError, LookupError, ValueError, RuntimeError) as exc:
        raise _StartError(f"model {exc}" if str(args.model) in str(exc) else str(exc)) from exc
    for note in opened.notes:
        print(f"note: {note}", file=sys.stderr)
    matter, path = opened.matter, opened.path
    service = MattingService(matter, workers=args.workers, queue=args.queue, max_pixels=args.max_pixels,
                             max_output_side=args.max_output_side or DEFAULT_MAX_OUTPUT_SIDE,
                             cache_bytes=args.cache_mb << 20, threads=threads)
    warm = service.warm_up()
    httpd.service = service
    httpd.health_info = {
        "model": {"spec": str(args.model), "path": str(path), "sha256": file_sha256(path), "config": opened.config,
                  "settings_from": opened.settings_from},
        "device": str(matter.device), "engine": f"onnxruntime {matter.provider}" if opened.engine == "onnx" else "torch",
        "precision": matter.precision, "precision_reason": matter.precision_reason,
        "max_side": matter.max_side, "refine": matter.refine, "radius": matter.radius, "eps": matter.eps,
        "threads_per_worker": threads, "warm_up_s": round(warm, 2),
    }
    return service
