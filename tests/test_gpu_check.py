"""benchmarks/gpu_check.sh, the script prepared for a lent GPU machine, dry-run on the CPU (--device cpu
--tiny): every section of its JSON is there with figures in it, so the script cannot rot unnoticed
before a GPU is at hand. ~40 s on a 2-core host (most of it densenet201's training steps at 64 px)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("segmentation", "fusion", "joint")
BACKBONES = ("densenet201", "efficientnet_lite0")

@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("gpu_check") / "x.json"
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "FUSIONNET_PROGRESS": "plain"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--no-install", "--device", "cpu", "--tiny",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads(out.read_text()), run.stdout, out


def _ok(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if r["status"] == "ok" and all(r[k] == v for k, v in match.items())]


@pytest.mark.slow
def test_the_script_says_where_the_json_is_and_records_the_machine(dry_run):
    doc, stdout, out = dry_run
    assert f"JSON written to {out}" in stdout
    m = doc["machine"]
    assert m["cpus"] >= 1 and isinstance(m["flags"], list) and m["torch"] and "torch_cuda" in m and m["gpu"] is None
    assert doc["run"]["device"] == "cpu" and doc["run"]["tiny"] is True and doc["run"]["elapsed_s"] > 0
    assert doc["pytest_cuda"]["status"] == "not run"  # the dry run skips pytest -m cuda (every test would skip)
    assert set(doc["sections"]) == {"train_speed", "inference", "training_run"}
    for name, section in doc["sections"].items():
        assert section["status"] == "done" and section["seconds"] > 0, (name, section.get("status"))


@pytest.mark.slow
def test_training_samples_per_second_for_every_step_and_backbone(dry_run):
    rows = dry_run[0]["sections"]["train_speed"]["results"]
    for backbone in BACKBONES:
        for step in STEPS:
            ok = _ok(rows, backbone=backbone, step=step)
            assert {r["channels_last"] for r in ok} == {True, False}, (backbone, step)
            assert all(r["samples_per_s"] > 0 and r["timed_iters"] >= 1 and r["loss_finite"] for r in ok)
    # fp16 autocast and peak memory need CUDA: listed, not measured
    fp16 = [r for r in rows if r["precision"] == "fp16"]
    assert fp16 and all(r["status"] == "n/a on cpu" for r in fp16)
    assert all(r["peak_mem_mib"] == "n/a on cpu" for r in rows)


@pytest.mark.slow
def test_inference_ms_per_image_and_d_alpha_for_every_precision(dry_run):
    section = dry_run[0]["sections"]["inference"]
    rows, batches = section["results"], section["settings"]["batches"]
    for variant in ("fp32", "fp32-cl", "bf16", "bf16+compile"):
        ok = _ok(rows, variant=variant)
        assert {r["batch"] for r in ok} == set(batches), variant
        assert all(r["ms_per_image"] > 0 and 0 <= r["mean_abs_d_alpha_vs_fp32"] < 0.05 for r in ok), ok
    assert all(r["mean_abs_d_alpha_vs_fp32"] == 0 for r in _ok(rows, variant="fp32"))  # fp32 against itself
    assert all(r["status"] == "n/a on cpu" for r in rows if r["variant"] == "fp16")


@pytest.mark.slow
def test_three_step_training_run_records_validation_before_and_after(dry_run):
    run = dry_run[0]["sections"]["training_run"]
    steps = run["steps"]
    assert [s["step"] for s in steps] == list(STEPS) and all(s["status"] == "ok" for s in steps)
    for s in steps:
        assert s["iterations"] >= 1 and s["samples_per_s"] > 0
        for key in ("val_sad_before", "val_sad_after", "val_mse_before", "val_mse_after"):
            assert isinstance(s[key], float) and math.isfinite(s[key]) and s[key] >= 0, (s["step"], key)
        assert s["val_sad_after"] <= s["val_sad_before"]  # keep: best hands on no worse than the init
    # each step starts from the one before: its "before" is the previous step's "after"
    for prev, nxt in zip(steps, steps[1:]):
        assert nxt["val_sad_before"] == pytest.approx(prev["val_sad_after"], rel=1e-5)
    assert run["val_sad_untrained"] == steps[0]["val_sad_before"] and "val_sad_falls" in run
    assert run["probe"]["s_per_iter"] > 0 and run["data"]["seconds"] >= 0


@pytest.mark.slow
def test_the_json_is_a_result_the_speed_table_reads(dry_run, tmp_path):
    """Written into benchmarks/results (the default), it must not break scripts/speed_table.py (make bench)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import speed_table

    (tmp_path / "gpu_check.json").write_text(dry_run[2].read_text())
    data = speed_table.load_results(tmp_path)["gpu_check"]
    assert data["rows"] and all(set(r) == {"what", "command", "result", "target"} for r in data["rows"])
    table = speed_table.render({"gpu_check": data})
    assert "three-step training run" in table and "inference 64x64, efficientnet_lite0" in table


def test_the_training_run_is_planned_to_fit_the_time_left():
    """The photo profile's schedule (864 + 160 + 100 iterations) runs whole when it fits; else the
    validations between epoch ends go first, then iterations per epoch shrink; under 5% it is skipped."""
    import yaml

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check
    from fusionnet.train.config import StepConfig

    params = yaml.safe_load((ROOT / "params-photos.yaml").read_text())
    cfgs = {s: StepConfig.from_params(params, s) for s in STEPS}
    nominal = {s: gpu_check.nominal_iterations(c, 288) for s, c in cfgs.items()}
    assert nominal == {"segmentation": 432, "fusion": 160, "joint": 100}
    plan = lambda left: gpu_check.plan_schedule(cfgs, nominal, 0.05, 0.02, 8.0, left)  # noqa: E731
    whole, info = plan(1000.0)
    assert info["scale"] == 1.0 and info["val_every_kept"] and whole == cfgs
    short, info = plan(60.0)
    assert not info["val_every_kept"] and 0.05 < info["scale"] < 1 and info["estimated_s"] <= 60.0
    assert all(c.val_every is None and c.epochs == cfgs[s].epochs for s, c in short.items())
    planned = {s: sum(min(c.max_iters_per_epoch, 10**9) for _ in range(c.epochs)) for s, c in short.items()}
    assert all(0 < planned[s] <= nominal[s] for s in STEPS)
    assert plan(20.0)[0] is None  # epoch-end validations and the steps' start-up alone take ~30 s
