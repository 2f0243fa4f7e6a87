"""precision: auto picks bf16 only where it measures faster (fusionnet.precision)."""

from __future__ import annotations

import json

import torch

from fusionnet import precision as fprecision


def test_explicit_precision_is_kept():
    assert fprecision.resolve_precision("bf16", torch.device("cpu")) == ("bf16", "set in params")


def test_cpu_without_bf16_flags_gets_fp32_without_a_probe(monkeypatch):
    monkeypatch.setattr(fprecision, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(fprecision, "probe_cpu", lambda: (_ for _ in ()).throw(AssertionError("no probe")))
    choice, why = fprecision.resolve_precision("auto", torch.device("cpu"))
    assert choice == "fp32" and "avx512_bf16" in why


def test_cpu_with_bf16_flags_is_probed_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSIONNET_CACHE", str(tmp_path))
    monkeypatch.setattr(fprecision, "cpu_flags", lambda: {"avx512_bf16"})
    calls = []
    timings = iter([{"fp32": 1.0, "bf16": 2.5}])  # bf16 slower: the avx512_bf16-without-AMX host
    monkeypatch.setattr(fprecision, "probe_cpu", lambda: calls.append(1) or next(timings))
    assert fprecision.resolve_precision("auto", torch.device("cpu"))[0] == "fp32"
    assert fprecision.resolve_precision("auto", torch.device("cpu"))[0] == "fp32"
    assert len(calls) == 1  # the second answer came from the cache
    cache = json.loads((tmp_path / "precision.json").read_text())
    (key,) = cache
    cache[key] = {"fp32": 3.0, "bf16": 1.0}  # an AMX host: bf16 3x faster
    (tmp_path / "precision.json").write_text(json.dumps(cache))
    choice, why = fprecision.resolve_precision("auto", torch.device("cpu"))
    assert choice == "bf16" and "3.00x" in why


def test_real_probe_returns_positive_timings():
    timing = fprecision.probe_cpu(repeats=1, size=16, width=8)
    assert set(timing) == {"fp32", "bf16"} and all(t > 0 for t in timing.values())
