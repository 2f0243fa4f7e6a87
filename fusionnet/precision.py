"""`precision: auto`: bf16 only where this machine runs it measurably faster than fp32.

Hosts of one machine kind differ: with AMX, bf16 convolutions run several times faster than fp32;
with avx512_bf16 but no AMX they can run slower (matmul 50 vs 133 GFLOP/s on one thread), and
without either the bf16 kernels are emulated (about 10x slower). So on CPU:
- no avx512_bf16 / amx_bf16 flag: fp32, no probe needed;
- otherwise a short probe (forward + backward of convolutions shaped like the network's, in both
  precisions, best of a few runs) picks bf16 when it is at least `margin` faster, cached per CPU
  model, flags, thread count and torch version in ~/.cache/fusionnet/precision.json.
On CUDA: bf16 where the GPU supports it, else fp32.
Used by training (`train_common.precision: auto`).

Inference (`resolve_inference_precision`, the default of `fusionnet matte`, the server and the
evaluation) chooses among fp32-cl (BatchNorm folded, channels-last), bf16 and int8 by timing the
actual prepared network at a small size (`probe_inference`, interleaved rounds), under the same
cache and machine key: bf16 only with a bf16 CPU flag (else emulated), int8 only with a cached
calibration of this model whose accuracy check passed (`fusionnet.quantize`). A lower precision is
taken only when it is at least `margin` faster than the more accurate choice.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["cpu_flags", "cpu_model", "probe_cpu", "probe_inference", "resolve_inference_precision", "resolve_precision"]

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


def _machine_key(flags: Sequence[str]) -> str:
    return f"{cpu_model()}|{','.join(flags)}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def _cached_timing(key: str, needed: set[str], probe: Callable[[], dict[str, float]]) -> dict[str, float]:
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: probe again next time
    return timing


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
    timing = _cached_timing(_machine_key(have), {"fp32", "bf16"}, lambda: probe_cpu())
    ratio = timing["fp32"] / timing["bf16"]
    flags_txt = "+".join(have)
    if ratio >= margin:
        return "bf16", f"auto: bf16 {ratio:.2f}x faster than fp32 on this CPU ({flags_txt}, probe)"
    return "fp32", f"auto: bf16 only {ratio:.2f}x fp32 on this CPU ({flags_txt}, probe); fp32"


INFERENCE_ORDER = ("fp32-cl", "bf16", "int8")  # most accurate first
PROBE_SIDE = 160  # px: the real network at a size that takes ~1 s per variant on 2 cores


def probe_inference(model: nn.Module, candidates: Sequence[str], side: int = PROBE_SIDE, repeats: int = 3) -> dict[str, float]:
    """Best seconds per `run_network` of a (1,3,side,side) image for each precision in `candidates`.

    Each precision's Matter is prepared once and warmed up; rounds interleave the candidates so load
    from other processes hits them alike.
    """
    from fusionnet.infer import Matter

    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    matters = {name: Matter(model, device="cpu", precision=name, refine=False) for name in candidates}
    for matter in matters.values():
        matter.run_network(x)  # picks kernels, prepacks weights
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, matter in matters.items():
            t0 = time.perf_counter()
            matter.run_network(x)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def inference_candidates(model: nn.Module, flags: set[str]) -> tuple[list[str], list[str]]:
    """(precisions auto may choose on this CPU for `model`, why each other one is left out)."""
    from fusionnet import quantize

    return _candidates(flags, quantize.calibration_info(model))


def _candidates(flags: set[str], info: dict | None) -> tuple[list[str], list[str]]:
    """`inference_candidates` given the model's int8 calibration info (None: not calibrated)."""
    from fusionnet import quantize

    candidates, left_out = ["fp32-cl"], []
    if any(f in flags for f in _BF16_FLAGS):
        candidates.append("bf16")
    else:
        left_out.append("bf16: no avx512_bf16/amx_bf16 (emulated, slower)")
    if info is None:
        left_out.append("int8: no calibration of this model (python -m fusionnet.quantize)")
    elif info.get("mean_abs_diff") is None or info["mean_abs_diff"] > info.get("bound", quantize.INT8_MEAN_DIFF_BOUND):
        left_out.append(f"int8: accuracy check failed (mean |d alpha| {info.get('mean_abs_diff')} > "
                        f"{info.get('bound', quantize.INT8_MEAN_DIFF_BOUND)})")
    else:
        candidates.append("int8")
    return candidates, left_out


def choose(timing: dict[str, float], candidates: Sequence[str], margin: float) -> str:
    """The least accurate candidate that is at least `margin` faster than every more accurate choice."""
    ordered = [name for name in INFERENCE_ORDER if name in candidates]
    choice = ordered[0]
    for name in ordered[1:]:
        if timing[choice] / timing[name] >= margin:
            choice = name
    return choice


def resolve_inference_precision(model: nn.Module, device: torch.device, margin: float = 1.1) -> tuple[str, str]:
    """(precision, why) that `precision: auto` runs `model` at on `device` (see the module docstring)."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
        return "fp32-cl", "auto: this GPU has no bf16"
    from fusionnet import quantize

    flags = cpu_flags()
    info = quantize.calibration_info(model)  # hashes the weights and reads the cache file: once
    candidates, left_out = _candidates(flags, info)
    skipped = f"; not tried: {'; '.join(left_out)}" if left_out else ""
    if len(candidates) == 1:
        return "fp32-cl", f"auto: fp32-cl, the only candidate{skipped}"
    have = sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_vnni", "avx_vnni"))
    int8 = info["digest"] if "int8" in candidates else "none"
    key = f"infer|{_machine_key(have)}|model={getattr(model, 'config', {})}|int8={int8}"
    timing = _cached_timing(key, set(candidates), lambda: probe_inference(model, candidates))
    choice = choose(timing, candidates, margin)
    speed = ", ".join(f"{name} {timing['fp32-cl'] / timing[name]:.2f}x" for name in candidates if name != "fp32-cl")
    return choice, f"auto: {choice}; vs fp32-cl on this CPU ({'+'.join(have) or 'no amx/avx512 extras'}): {speed} (probe at {PROBE_SIDE} px){skipped}"
