"""precision: auto picks bf16 (training) / fp32-cl, bf16 or int8 (inference) only where measured faster."""

from __future__ import annotations

import json

import pytest
import torch

from fusionnet.inference import int8 as quantize, precision as infer_precision
from fusionnet.train import precision as train_precision
from tests.support.helpers import tiny_net


def test_explicit_precision_is_kept():
    assert train_precision.resolve_precision("bf16", torch.device("cpu")) == ("bf16", "set in params")


def test_cpu_without_bf16_flags_gets_fp32_without_a_probe(monkeypatch):
    monkeypatch.setattr(train_precision, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(train_precision, "probe_cpu", lambda: (_ for _ in ()).throw(AssertionError("no probe")))
    choice, why = train_precision.resolve_precision("auto", torch.device("cpu"))
    assert choice == "fp32" and "avx512_bf16" in why


def test_cpu_with_bf16_flags_is_probed_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSIONNET_CACHE", str(tmp_path))
    monkeypatch.setattr(train_precision, "cpu_flags", lambda: {"avx512_bf16"})
    calls = []
    timings = iter([{"fp32": 1.0, "bf16": 2.5}])  # bf16 slower: the avx512_bf16-without-AMX host
    monkeypatch.setattr(train_precision, "probe_cpu", lambda: calls.append(1) or next(timings))
    assert train_precision.resolve_precision("auto", torch.device("cpu"))[0] == "fp32"
    assert train_precision.resolve_precision("auto", torch.device("cpu"))[0] == "fp32"
    assert len(calls) == 1  # the second answer came from the cache
    cache = json.loads((tmp_path / "precision.json").read_text())
    (key,) = cache
    cache[key] = {"fp32": 3.0, "bf16": 1.0}  # an AMX host: bf16 3x faster
    (tmp_path / "precision.json").write_text(json.dumps(cache))
    choice, why = train_precision.resolve_precision("auto", torch.device("cpu"))
    assert choice == "bf16" and "3.00x" in why


def test_real_probe_returns_positive_timings():
    timing = train_precision.probe_cpu(repeats=1, size=16, width=8)
    assert set(timing) == {"fp32", "bf16"} and all(t > 0 for t in timing.values())


# --- inference: resolve_inference_precision (the default of matte, serve and the evaluation) -------------

GOOD_INT8 = {"mean_abs_diff": 0.002, "bound": 0.005, "digest": "d1"}


@pytest.fixture
def forced(monkeypatch, tmp_path):
    """Set the CPU flags, the int8 calibration and the probe's timings; returns the probe's calls."""
    monkeypatch.setenv("FUSIONNET_CACHE", str(tmp_path))
    calls: list[list[str]] = []

    def force(flags, timing, int8=GOOD_INT8):
        monkeypatch.setattr(infer_precision, "cpu_flags", lambda: set(flags))
        monkeypatch.setattr(quantize, "calibration_info", lambda model, backend="x86": int8)
        monkeypatch.setattr(infer_precision, "probe_inference",
                            lambda model, names: calls.append(list(names)) or {n: timing[n] for n in names})
        return calls

    return force


MODEL = torch.nn.Conv2d(1, 1, 1)  # never run: the probe is forced


def test_auto_picks_the_fastest_measured(forced):
    calls = forced({"avx512_bf16", "amx_bf16", "avx512_vnni"}, {"fp32-cl": 3.0, "bf16": 1.0, "int8": 0.5})
    choice, why = infer_precision.resolve_inference_precision(MODEL, torch.device("cpu"))
    assert choice == "int8" and calls == [["fp32-cl", "bf16", "int8"]]
    assert "int8 6.00x" in why and "bf16 3.00x" in why
    # cached per machine: the second call does not probe
    assert infer_precision.resolve_inference_precision(MODEL, torch.device("cpu"))[0] == "int8" and len(calls) == 1


def test_auto_without_bf16_flags_never_picks_bf16(forced):
    # even a probe that would call bf16 fastest is not asked about it: emulated bf16 is never chosen
    calls = forced({"avx2", "fma", "avx512_vnni"}, {"fp32-cl": 3.0, "bf16": 0.1, "int8": 2.0})
    choice, why = infer_precision.resolve_inference_precision(MODEL, torch.device("cpu"))
    assert choice == "int8" and calls == [["fp32-cl", "int8"]] and "bf16: no avx512_bf16" in why


def test_auto_excludes_int8_whose_accuracy_check_failed(forced):
    calls = forced({"amx_bf16"}, {"fp32-cl": 3.0, "bf16": 1.0, "int8": 0.2}, int8={**GOOD_INT8, "mean_abs_diff": 0.02})
    choice, why = infer_precision.resolve_inference_precision(MODEL, torch.device("cpu"))
    assert choice == "bf16" and calls == [["fp32-cl", "bf16"]] and "accuracy check failed" in why


def test_auto_keeps_fp32_cl_when_nothing_is_clearly_faster(forced):
    # bf16 5% faster (within noise, margin 1.1), no int8 calibration, as on the avx512_bf16-without-AMX host
    forced({"avx512_bf16"}, {"fp32-cl": 1.0, "bf16": 1 / 1.05}, int8=None)
    choice, why = infer_precision.resolve_inference_precision(MODEL, torch.device("cpu"))
    assert choice == "fp32-cl" and "no calibration" in why


def test_auto_with_no_candidate_but_fp32_cl_does_not_probe(forced):
    calls = forced({"avx2"}, {}, int8=None)
    assert infer_precision.resolve_inference_precision(MODEL, torch.device("cpu"))[0] == "fp32-cl" and calls == []


def test_matter_auto_runs_the_chosen_precision(forced):
    from fusionnet.inference.matter import Matter

    forced({"amx_bf16"}, {"fp32-cl": 2.0, "bf16": 1.0}, int8=None)
    matter = Matter(tiny_net(seed=0, narrow=True), device="cpu", precision="auto", refine=False)
    assert matter.precision == "bf16" and matter.precision_reason.startswith("auto: bf16")
    assert next(matter.model.parameters()).dtype == torch.bfloat16


def test_real_inference_probe_times_the_network(one_thread):
    timing = infer_precision.probe_inference(tiny_net(seed=0, narrow=True), ["fp32-cl", "bf16"], side=32, repeats=1)
    assert set(timing) == {"fp32-cl", "bf16"} and all(0 < t < 60 for t in timing.values())
