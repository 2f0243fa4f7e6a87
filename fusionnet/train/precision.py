"""`train_common.precision: auto`: bf16 only where this machine trains measurably faster in it than fp32.

Hosts of one machine kind differ: with AMX, bf16 convolutions run several times faster than fp32;
with avx512_bf16 but no AMX they can run slower (matmul 50 vs 133 GFLOP/s on one thread), and
without either the bf16 kernels are emulated (about 10x slower). So on CPU:
- no avx512_bf16 / amx_bf16 flag: fp32, no probe needed;
- otherwise a short probe (forward + backward of convolutions shaped like the network's, in both
  precisions, best of a few runs) picks bf16 when it is at least `margin` faster, cached per machine
  (`fusionnet.hardware`).
On CUDA: bf16 where the GPU supports it, else fp32.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from fusionnet.hardware import BF16_FLAGS, cached_timing, cpu_flags, machine_key


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
    have = sorted(f for f in BF16_FLAGS if f in flags)
    if not have:
        return "fp32", "auto: CPU has no avx512_bf16/amx_bf16 (bf16 would be emulated, slower)"
    timing = cached_timing(machine_key(have), {"fp32", "bf16"}, lambda: probe_cpu())
    ratio = timing["fp32"] / timing["bf16"]
    flags_txt = "+".join(have)
    if ratio >= margin:
        return "bf16", f"auto: bf16 {ratio:.2f}x faster than fp32 on this CPU ({flags_txt}, probe)"
    return "fp32", f"auto: bf16 only {ratio:.2f}x fp32 on this CPU ({flags_txt}, probe); fp32"
