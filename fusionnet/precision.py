"""`precision: auto`: bf16 only where this machine runs it measurably faster than fp32.

Hosts of one machine kind differ: with AMX, bf16 convolutions run several times faster than fp32;
with avx512_bf16 but no AMX they can run slower (matmul 50 vs 133 GFLOP/s on one thread), and
without either the bf16 kernels are emulated (about 10x slower). So on CPU:
- no avx512_bf16 / amx_bf16 flag: fp32, no probe needed;
- otherwise a short probe (forward + backward of convolutions shaped like the network's, in both
  precisions, best of a few runs) picks bf16 when it is at least `margin` faster, cached per CPU
  model, flags, thread count and torch version in ~/.cache/fusionnet/precision.json.
On CUDA: bf16 where the GPU supports it, else fp32.
Used by training (`train_common.precision: auto`) and shared with inference.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["cpu_flags", "resolve_precision", "probe_cpu"]

_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cache_path() -> Path:
    return Path(os.environ.get("FUSIONNET_CACHE", Path.home() / ".cache" / "fusionnet")) / "precision.json"


def _probe_net(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU(),
        nn.Conv2d(4 * width, width, 1, bias=False),
    ).to(memory_format=torch.channels_last)


def probe_cpu(repeats: int = 3, size: int = 64, width: int = 64) -> dict[str, float]:
    """Seconds per forward+backward of a small conv stack on CPU: {"fp32": s, "bf16": s}."""
    torch.manual_seed(0)
    net = _probe_net(width)
    x = torch.rand(4, width, size, size).contiguous(memory_format=torch.channels_last)
    out: dict[str, float] = {}
    for name in ("fp32", "bf16"):
        best = float("inf")
        for _ in range(repeats + 1):  # the first run picks kernels
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                y = net(x)
            y.float().square().mean().backward()
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def resolve_precision(requested: str, device: torch.device, margin: float = 1.15) -> tuple[str, str]:
    """(precision, why) for `requested` in fp32 | bf16 | fp16 | auto on `device`."""
    if requested != "auto":
        return requested, "set in params"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
        return "fp32", "auto: this GPU has no bf16"
    flags = cpu_flags()
    have = sorted(f for f in _BF16_FLAGS if f in flags)
    if not have:
        return "fp32", "auto: CPU has no avx512_bf16/amx_bf16 (bf16 would be emulated, slower)"
    key = f"{_cpu_model()}|{','.join(have)}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = _cache_path()
    cache: dict = {}
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    timing = cache.get(key)
    if not isinstance(timing, dict) or not {"fp32", "bf16"} <= set(timing):
        timing = probe_cpu()
        cache[key] = timing
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(cache, indent=2))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home: probe again next time
    ratio = timing["fp32"] / timing["bf16"]
    flags_txt = "+".join(have)
    if ratio >= margin:
        return "bf16", f"auto: bf16 {ratio:.2f}x faster than fp32 on this CPU ({flags_txt}, probe)"
    return "fp32", f"auto: bf16 only {ratio:.2f}x fp32 on this CPU ({flags_txt}, probe); fp32"
