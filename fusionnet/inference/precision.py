"""`precision: auto` at inference: the measurably fastest of fp32-cl, bf16 and int8 on this machine.

The default of `fusionnet matte`, the server and the evaluation. It times the actual prepared network
(`fusionnet.inference.network.PreparedNetwork`) at a small size (`probe_inference`, interleaved
rounds), cached per machine (`fusionnet.hardware`): bf16 only with a bf16 CPU flag (else emulated),
int8 only with a cached calibration of this model whose accuracy check passed
(`fusionnet.inference.int8`). A lower precision is taken only when it is at least `margin` faster
than the more accurate choice. On CUDA: bf16 where supported, else fp32-cl.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from fusionnet.hardware import BF16_FLAGS, cached_timing, cpu_flags, machine_key
from fusionnet.inference import int8
from fusionnet.inference.network import PreparedNetwork

__all__ = ["choose", "inference_candidates", "probe_inference", "resolve_inference_precision"]


INFERENCE_ORDER = ("fp32-cl", "bf16", "int8")  # most accurate first
PROBE_SIDE = 160  # px: the real network at a size that takes ~1 s per variant on 2 cores


def probe_inference(model: nn.Module, candidates: Sequence[str], side: int = PROBE_SIDE, repeats: int = 3) -> dict[str, float]:
    """Best seconds per `run_network` of a (1,3,side,side) image for each precision in `candidates`.

    Each precision's network is prepared once and warmed up; rounds interleave the candidates so load
    from other processes hits them alike.
    """
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    matters = {name: PreparedNetwork(model, device="cpu", precision=name) for name in candidates}
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
    return _candidates(flags, int8.calibration_info(model))


def _candidates(flags: set[str], info: dict | None) -> tuple[list[str], list[str]]:
    """`inference_candidates` given the model's int8 calibration info (None: not calibrated)."""
    candidates, left_out = ["fp32-cl"], []
    if any(f in flags for f in BF16_FLAGS):
        candidates.append("bf16")
    else:
        left_out.append("bf16: no avx512_bf16/amx_bf16 (emulated, slower)")
    if info is None:
        left_out.append("int8: no calibration of this model (python -m fusionnet.inference.int8)")
    elif info.get("mean_abs_diff") is None or info["mean_abs_diff"] > info.get("bound", int8.INT8_MEAN_DIFF_BOUND):
        left_out.append(f"int8: accuracy check failed (mean |d alpha| {info.get('mean_abs_diff')} > "
                        f"{info.get('bound', int8.INT8_MEAN_DIFF_BOUND)})")
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
    flags = cpu_flags()
    info = int8.calibration_info(model)  # hashes the weights and reads the cache file: once
    candidates, left_out = _candidates(flags, info)
    skipped = f"; not tried: {'; '.join(left_out)}" if left_out else ""
    if len(candidates) == 1:
        return "fp32-cl", f"auto: fp32-cl, the only candidate{skipped}"
    have = sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512_vnni", "avx_vnni"))
    int8_digest = info["digest"] if "int8" in candidates else "none"
    key = f"infer|{machine_key(have)}|model={getattr(model, 'config', {})}|int8={int8_digest}"
    timing = cached_timing(key, set(candidates), lambda: probe_inference(model, candidates))
    choice = choose(timing, candidates, margin)
    speed = ", ".join(f"{name} {timing['fp32-cl'] / timing[name]:.2f}x" for name in candidates if name != "fp32-cl")
    return choice, f"auto: {choice}; vs fp32-cl on this CPU ({'+'.join(have) or 'no amx/avx512 extras'}): {speed} (probe at {PROBE_SIDE} px){skipped}"
