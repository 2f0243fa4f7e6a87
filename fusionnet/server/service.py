"""The matting service behind `fusionnet serve`: one model, bounded admission, a small result cache.

No HTTP here. A request first takes one of `workers + queue` places (`admit`, else `Busy` with a
retry hint), then `submit` runs decode -> matte -> render -> PNG on one of `workers` threads (one
inference at a time per worker). The place is given back when that job ends, not when its caller
stops waiting: a running inference cannot be interrupted, so a timed-out one keeps its place until
it finishes and the bound on concurrent work holds.

Images decode through `fusionnet.io.images.load_image_bytes` (the CLI's and the pyfunc's path: EXIF
orientation, pixel limit from the header) and outputs render through `fusionnet.inference.render`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusionnet.inference.matter import MatteResult, Matter
from fusionnet.inference.render import OUTPUT_KINDS, render_outputs
from fusionnet.io.images import LoadedImage, encode_png, load_image_bytes

PNG_LEVEL = 3  # zlib level 3: about half level 6's time, for answers sent once

_NEEDS_FOREGROUND = ("rgba", "composite")


class Busy(Exception):
    """Every place (running + waiting) is taken; `retry_after` is a hint in whole seconds."""

    def __init__(self, retry_after: int, capacity: int):
        super().__init__(f"server busy: all {capacity} places (running + queued) are taken; retry in {retry_after} s")
        self.retry_after = retry_after


class InferenceError(RuntimeError):
    """The network, the refinement or the rendering failed on a decoded image (a server-side problem)."""


@dataclass(frozen=True)
class MatteRequest:
    """What to answer for one image: `output` one of OUTPUT_KINDS; None means the server's setting."""

    output: str = "alpha"
    background: tuple[int, int, int] = (255, 255, 255)
    max_side: int | None = None
    refine: bool | None = None


@dataclass(frozen=True)
class MatteReply:
    """A PNG of the requested output; sizes are `(height, width)`."""

    png: bytes
    output: str
    size: tuple[int, int]
    original_size: tuple[int, int]
    network_size: tuple[int, int]
    cached: bool
    seconds: float


class ResultCache:
    """Recently matted images by (sha256 of the file, max_side, refine), within a byte budget.

    The page asks for alpha, cut-out and composite of one upload: one inference serves all three.
    """

    def __init__(self, limit_bytes: int):
        self.limit_bytes = max(0, int(limit_bytes))
        self._entries: OrderedDict[tuple, tuple[LoadedImage, MatteResult, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def entry_bytes(image: LoadedImage, result: MatteResult) -> int:
        arrays = {id(a): a for a in (image.rgb, result.alpha, result.raw_alpha, result.fg_prob, result.bg_prob)}
        return sum(a.nbytes for a in arrays.values())

    def get(self, key: tuple) -> tuple[LoadedImage, MatteResult] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0], entry[1]

    def put(self, key: tuple, image: LoadedImage, result: MatteResult) -> None:
        size = self.entry_bytes(image, result)
        if size > self.limit_bytes:
            return
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[2]
            self._entries[key] = (image, result, size)
            self._bytes += size
            while self._bytes > self.limit_bytes:
                self._bytes -= self._entries.popitem(last=False)[1][2]

    def state(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "limit_bytes": self.limit_bytes,
                    "hits": self.hits, "misses": self.misses}


class MattingService:
    """One prepared `Matter` behind `workers` inference threads and `queue` waiting places.

    Args:
        matter: the model at its device/precision; its max_side and refine are the defaults.
        workers: concurrent inferences (threads). queue: requests that may wait for one.
        max_pixels: refuse images with more pixels (from the header, before decoding).
        max_output_side: larger images are decoded downscaled to this longer side.
        cache_bytes: budget of the result cache (0: no cache).
        threads: torch (and numba) threads per inference; None leaves them as they are.
    """

    def __init__(self, matter: Matter, *, workers: int = 1, queue: int = 8, max_pixels: int,
                 max_output_side: int, cache_bytes: int = 0, threads: int | None = None):
        if workers < 1 or queue < 0:
            raise ValueError(f"need workers >= 1 and queue >= 0, got {workers} and {queue}")
        self.matter = matter
        self.workers, self.queue = workers, queue
        self.capacity = workers + queue
        self.max_pixels, self.max_output_side = max_pixels, max_output_side
        self.cache = ResultCache(cache_bytes)
        self.threads = threads
        self.counts: Counter[str] = Counter()
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="fusionnet-matte")
        self._lock = threading.Lock()
        self._in_flight = self._running = 0
        self._mean_seconds = 1.0  # running mean of a job's time, for Retry-After
        # Serialises pymatting's parallel numba kernels unless numba's threading layer is thread-safe
        # (its "workqueue" layer aborts the process when two threads launch kernels at once).
        self._foreground_lock: AbstractContextManager = threading.Lock()
        self._started = time.time()

    # ---------------------------------------------------------------- admission

    def admit(self) -> None:
        """Take a place or raise Busy; pair with `submit` (which gives it back) or `leave`."""
        with self._lock:
            if self._in_flight >= self.capacity:
                self.counts["busy"] += 1
                retry = math.ceil(self._mean_seconds * self._in_flight / self.workers)
                raise Busy(min(60, max(1, retry)), self.capacity)
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def submit(self, data: bytes | memoryview, name: str, request: MatteRequest) -> Future[MatteReply]:
        """Run one admitted request; from here its place is given back when the job ends or is cancelled."""
        # RuntimeError once the executor is shut down (stopping); the caller then still holds its place.
        future = self._executor.submit(self._job, data, name, request)
        # A job gives its place back itself, before its result is set (so an answered request is no
        # longer counted); a job cancelled before it started gives it back here.
        future.add_done_callback(lambda done: self.leave() if done.cancelled() else None)
        return future

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    # ---------------------------------------------------------------- the job

    def _job(self, data: bytes | memoryview, name: str, request: MatteRequest) -> MatteReply:
        started = time.perf_counter()
        with self._lock:
            self._running += 1
        try:
            self._set_threads()
            return self.matte(data, name, request)
        finally:
            seconds = time.perf_counter() - started
            with self._lock:
                self._running -= 1
                self._in_flight -= 1
                self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * seconds

    def _set_threads(self) -> None:
        # Thread counts are per calling thread, and a numba parallel kernel (pymatting) resets this
        # thread's OpenMP count to all cores, so restore ours before every job.
        if self.threads is None:
            return
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        try:
            import numba

            if numba.get_num_threads() != min(self.threads, numba.config.NUMBA_NUM_THREADS):
                numba.set_num_threads(min(self.threads, numba.config.NUMBA_NUM_THREADS))
        except (ImportError, ValueError):
            pass

    def matte(self, data: bytes | memoryview, name: str, request: MatteRequest) -> MatteReply:
        """Decode, matte (or take from the cache), render `request.output`, encode PNG.

        Raises ImageLoadError for a file that is not a usable image, InferenceError for the rest.
        """
        started = time.perf_counter()
        if request.output not in OUTPUT_KINDS:
            raise ValueError(f"unknown output {request.output!r}")
        max_side = request.max_side or self.matter.max_side
        refine = self.matter.refine if request.refine is None else request.refine
        key = (hashlib.sha256(data).digest(), max_side, refine)
        cached = self.cache.get(key) if self.cache.limit_bytes else None
        if cached is None:
            image = load_image_bytes(data, name, max_side=self.max_output_side, max_pixels=self.max_pixels)
            try:
                result = self._matter_for(max_side, refine)(image.rgb)
            except (RuntimeError, ValueError, MemoryError) as exc:
                raise InferenceError(f"inference failed ({type(exc).__name__}: {exc})") from exc
            if self.cache.limit_bytes:
                self.cache.put(key, image, result)
        else:
            image, result = cached
        lock = self._foreground_lock if request.output in _NEEDS_FOREGROUND else nullcontext()
        try:
            with lock:
                array = render_outputs(image.rgb, result, [request.output], request.background)[request.output]
            png = encode_png(array, compress_level=PNG_LEVEL)
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise InferenceError(f"cannot render {request.output} ({type(exc).__name__}: {exc})") from exc
        return MatteReply(png=png, output=request.output, size=image.size, original_size=image.original_size,
                          network_size=result.network_size, cached=cached is not None,
                          seconds=time.perf_counter() - started)

    def _matter_for(self, max_side: int, refine: bool) -> Matter:
        """The server's Matter with this request's max_side/refine; a shallow copy shares the network."""
        if (max_side, refine) == (self.matter.max_side, self.matter.refine):
            return self.matter
        variant = copy.copy(self.matter)
        variant.max_side, variant.refine = max_side, refine
        return variant

    def warm_up(self) -> float:
        """Run every output once on a small image (numba kernels load/compile now, not on a request)."""
        started = time.perf_counter()
        y, x = np.mgrid[0:48, 0:64]
        disc = ((y - 24) ** 2 + (x - 32) ** 2 < 300)[:, :, None]
        image = np.where(disc, [230, 120, 40], [30, 60, 200]).astype(np.uint8)
        data = encode_png(image, compress_level=PNG_LEVEL)
        self._set_threads()
        for output in OUTPUT_KINDS:
            self.matte(data, "warm-up image", MatteRequest(output=output))
        self.cache = ResultCache(self.cache.limit_bytes)  # start the counters at the first request
        try:
            import numba

            if numba.threading_layer() in ("omp", "tbb"):
                self._foreground_lock = nullcontext()
        except (ImportError, ValueError):  # ValueError: no parallel kernel has run; keep the lock
            pass
        return time.perf_counter() - started

    # ---------------------------------------------------------------- state

    def state(self) -> dict[str, Any]:
        """Queue and request counters for /health."""
        with self._lock:
            queue = {"workers": self.workers, "queue": self.queue, "capacity": self.capacity,
                     "in_flight": self._in_flight, "running": self._running,
                     "waiting": max(0, self._in_flight - self._running)}
            counts = {k: self.counts.get(k, 0) for k in ("ok", "busy", "timed_out", "bad_request", "failed")}
        return {"queue": queue, "requests": counts, "cache": self.cache.state(),
                "uptime_s": round(time.time() - self._started, 1)}

    def close(self, grace: float = 0.0) -> bool:
        """Stop taking jobs: queued ones are cancelled; waits up to `grace` s for running ones.

        Returns True when nothing is left running.
        """
        self._executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace
        while True:
            with self._lock:
                if self._in_flight == 0:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
