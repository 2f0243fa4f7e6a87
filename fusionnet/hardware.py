"""What this machine is: its device (`resolve_device`), and for choosing a precision by measurement its
CPU flags, model name and a timing cache. `exact_fp32()`: true float32 on a GPU (TF32 off) for references.

Hosts of one machine kind differ (AMX; avx512_bf16 without AMX, where bf16 can run slower than fp32;
avx2 only), so timings are cached per CPU model, flags, thread count and torch version in
~/.cache/fusionnet/precision.json (or $FUSIONNET_CACHE). Training (`fusionnet.train.precision`) and
inference (`fusionnet.inference.precision`) probe and choose on their own; both use this.
"""

from __future__ import annotations

import json
import os
import platform
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from fusionnet.io.atomic import write_text_atomic

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")  # without one of these, CPU bf16 kernels are emulated


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cache_path() -> Path:
    return Path(os.environ.get("FUSIONNET_CACHE", Path.home() / ".cache" / "fusionnet")) / "precision.json"


def machine_key(flags: Sequence[str]) -> str:
    return f"{cpu_model()}|{','.join(flags)}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def cached_timing(key: str, needed: set[str], probe: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The timings cached under `key` in precision.json when they cover `needed`, else `probe()` (then cached)."""
    path = _cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    timing = cache.get(key)
    if isinstance(timing, dict) and needed <= set(timing):
        return timing
    timing = probe()
    cache[key] = timing
    try:
        write_text_atomic(path, json.dumps(cache, indent=2))
    except OSError:
        pass  # a read-only home: probe again next time
    return timing


def resolve_device(spec: str | torch.device = "auto", local_rank: int | None = None, *,
                   name: str = "device") -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU is a clear error naming `name`
    (e.g. "params train_common.device"). local_rank: under DDP, "cuda"/"auto" mean this process's GPU."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{name} {spec!r} requested but no CUDA GPU is available; use cpu or auto")
        if spec == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank)
    return torch.device(spec)


_exact_lock = threading.Lock()
_exact_depth = 0  # how many exact_fp32 blocks are open, in any thread
_tf32_saved: tuple[bool, bool] = (False, False)


@contextmanager
def exact_fp32() -> Iterator[None]:
    """Inside: float32 matmuls and convolutions in true float32 (TF32 off); the previous flags after.

    On Ampere and newer GPUs cuDNN runs "float32" convolutions in TF32 by default
    (`torch.backends.cudnn.allow_tf32`, 10-bit mantissa), so an fp32 reference would not match the CPU.
    Sets `torch.backends.cuda.matmul.allow_tf32` and `torch.backends.cudnn.allow_tf32` to False (both
    exist on CPU-only builds, where they change nothing). The flags are process-wide, so blocks open in
    several threads (server workers) share one save/restore: the last block to close restores them.
    """
    global _exact_depth, _tf32_saved
    with _exact_lock:
        if _exact_depth == 0:
            _tf32_saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        _exact_depth += 1
    try:
        yield
    finally:
        with _exact_lock:
            _exact_depth -= 1
            if _exact_depth == 0:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _tf32_saved
