"""The entry points users run, and their failure paths.

- `python -m fusionnet.train`: --device, --precision and --no-resume each change what happens; bad
  params files (missing, not YAML, a missing section, an unknown key) are one line naming the file.
  All cases run in ONE child process (runpy, as `python -m` does), so torch is imported once.
- The NaN-loss guard: training stops with an error naming the iteration, and nothing is half-written.
- `load_params` and the evaluate section's unknown keys: errors naming the file / the key.
- `stages/evaluate.py --no-mlflow`: the files are written, nothing is tracked (no MLflow store, no Prefect).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from fusionnet.train.toy import write_toy_shards
from tests.support.helpers import ROOT, one_thread_env, tiny_train_params

pytestmark = pytest.mark.usefixtures("one_thread")

# Runs each ["train", argv] as `python -m fusionnet.train ARGV` would (runpy), and each
# ["sentinel", out_dir] between them: keeps the model file and puts junk bytes in its place.
CLI_DRIVER = r"""
import contextlib, io, json, runpy, shutil, sys
from pathlib import Path

plan, results_path, results = Path(sys.argv[1]), Path(sys.argv[2]), []
for action, arg in json.loads(plan.read_text()):
    if action == "sentinel":
        shutil.copy(Path(arg) / "model.safetensors", Path(arg) / "first.safetensors")
        (Path(arg) / "model.safetensors").write_bytes(b"sentinel: a resumed finished step leaves this alone")
        continue
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = ["python -m fusionnet.train", *arg]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("fusionnet.train", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:  # what would reach the user as a traceback
            code, _ = "raised", err.write(f"{type(exc).__name__}: {exc}")
    results.append({"argv": arg, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
results_path.write_text(json.dumps(results))
"""


def _narrow(params: dict) -> dict:
    params["model"].update(fpn_width=16, fusion_widths=[32, 16, 16, 8, 32], decoder_max_width=32)
    return params


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """One child process: the flag cases and the bad-params cases; returns (tmp, {case: result})."""
    tmp = tmp_path_factory.mktemp("cli")
    shards = write_toy_shards(tmp / "shards", n_train=4, n_val=1, size=64)
    params = _narrow(tiny_train_params(epochs=1, iters=1))
    # params that cannot run here as written: the flags must be what makes the runs work
    params["train_common"].update(device="cuda", precision="fp16")
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp / "bad.yaml").write_text("train_common: {device: cpu\nseed: [1, 2\n")
    no_section = {k: v for k, v in params.items() if k != "train_fusion"}
    (tmp / "no-section.yaml").write_text(yaml.safe_dump(no_section))
    typo = yaml.safe_load(yaml.safe_dump(params))
    typo["train_common"]["bach_size"] = 2
    (tmp / "typo.yaml").write_text(yaml.safe_dump(typo))

    out = str(tmp / "out")
    common = ["--step", "segmentation", "--shards", str(shards), "--quiet"]
    flags = ["--device", "cpu", "--precision", "fp32"]
    cases = {
        "as_written": ["--params", str(tmp / "params.yaml"), "--out", str(tmp / "as-written"), *common],
        "flags": ["--params", str(tmp / "params.yaml"), "--out", out, *common, *flags],
        "resumed": ["--params", str(tmp / "params.yaml"), "--out", out, *common, *flags],
        "no_resume": ["--params", str(tmp / "params.yaml"), "--out", out, *common, *flags, "--no-resume"],
        "missing": ["--params", str(tmp / "absent.yaml"), "--out", str(tmp / "e1"), *common, *flags],
        "bad_yaml": ["--params", str(tmp / "bad.yaml"), "--out", str(tmp / "e2"), *common, *flags],
        "no_section": ["--params", str(tmp / "no-section.yaml"), "--out", str(tmp / "e3"),
                       "--step", "fusion", "--shards", str(shards), "--quiet", *flags],
        "typo": ["--params", str(tmp / "typo.yaml"), "--out", str(tmp / "e4"), *common, *flags],
    }
    plan = []
    for name, argv in cases.items():
        if name == "resumed":
            plan.append(["sentinel", out])
        plan.append(["train", argv])
    (tmp / "plan.json").write_text(json.dumps(plan))
    (tmp / "driver.py").write_text(CLI_DRIVER)
    done = subprocess.run([sys.executable, str(tmp / "driver.py"), str(tmp / "plan.json"), str(tmp / "results.json")],
                          cwd=ROOT, env=one_thread_env(FUSIONNET_PROGRESS="off"), capture_output=True, text=True,
                          timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp / "results.json").read_text())
    return tmp, dict(zip(cases, results))


def test_train_cli_device_and_precision_flags_override_params(cli_runs):
    tmp, runs = cli_runs
    if not torch.cuda.is_available():  # as written (cuda, fp16) the params cannot run on this machine
        assert runs["as_written"]["code"] == "raised" and "no CUDA GPU" in runs["as_written"]["stderr"]
    assert runs["flags"]["code"] == 0, runs["flags"]["stderr"]
    assert "precision fp32" in runs["flags"]["stdout"]
    history = json.loads((tmp / "out" / "history.json").read_text())
    assert (history["config"]["device"], history["config"]["precision"]) == ("cpu", "fp32")
    assert history["finished"] and history["iterations"] == 1


def test_train_cli_resumes_a_finished_step_unless_no_resume(cli_runs):
    tmp, runs = cli_runs
    assert runs["resumed"]["code"] == 0 and runs["no_resume"]["code"] == 0, runs["no_resume"]["stderr"]
    # the resumed run found the step finished and trained nothing (it would have rewritten the junk
    # model file); --no-resume trained it again, to the same weights (CPU, fixed seed)
    assert "segmentation: " in runs["resumed"]["stdout"]
    first = load_file(str(tmp / "out" / "first.safetensors"))
    again = load_file(str(tmp / "out" / "model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert runs["resumed"]["stdout"].count("precision fp32") == 1 and "precision fp32" in runs["no_resume"]["stdout"]


@pytest.mark.parametrize("case, words", [
    ("missing", ["absent.yaml", "no such params file"]),
    ("bad_yaml", ["bad.yaml", "YAML"]),
    ("no_section", ["no-section.yaml", "train_fusion"]),
    ("typo", ["typo.yaml", "bach_size"]),
])
def test_train_cli_bad_params_files_are_one_clear_error(cli_runs, case, words):
    tmp, runs = cli_runs
    run = runs[case]
    assert run["code"] == 2, run  # argparse's usage error, not a traceback
    message = run["stderr"].strip().splitlines()[-1]
    assert all(w in message for w in words), message
    out = {"missing": "e1", "bad_yaml": "e2", "no_section": "e3", "typo": "e4"}[case]
    assert not (tmp / out).exists()  # nothing written


# ----------------------------------------------------------------------------- the NaN-loss guard


@pytest.mark.parametrize("log_every, checkpoint_every, stopped_after, last_state, span", [
    (1, 1, 2, 1, "iteration 2"),  # checked every iteration: stops at the NaN
    (3, 4, 3, 0, "iterations 1-3"),  # checked every 3 (no host sync per iteration): stops within 3
])
def test_nan_loss_stops_training_and_leaves_only_the_last_good_state(tmp_path, monkeypatch, log_every,
                                                                      checkpoint_every, stopped_after, last_state, span):
    from fusionnet.train import forward
    from fusionnet.train.config import StepConfig
    from fusionnet.train.loop import run_step
    from fusionnet.train.losslog import LOSS_LOG_FILE, LossLog
    from fusionnet.train.state import load_state

    shards = write_toy_shards(tmp_path / "shards", n_train=12, n_val=1, size=64)
    params = _narrow(tiny_train_params(epochs=1, iters=6, log_every=log_every, checkpoint_every=checkpoint_every))
    cfg = StepConfig.from_params(params, "segmentation")
    calls = []
    real_loss = forward.step_loss

    def nan_at_second_iteration(step, output, alpha, cfg):
        loss, terms = real_loss(step, output, alpha, cfg)
        calls.append(1)
        if len(calls) == 2:  # a diverged loss, as too high a learning rate gives
            loss = loss * float("nan")
            terms = {**terms, "loss": loss}
        return loss, terms

    monkeypatch.setattr(forward, "step_loss", nan_at_second_iteration)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=rf"segmentation step: loss.* not finite \(nan\) in {span}; lower the train lr"):
        run_step("segmentation", cfg, shards, out)
    assert len(calls) == stopped_after  # stopped within log_every iterations
    state = load_state(out / "state.pt")
    assert state["iteration"] == last_state and not state["finished"]
    assert [row["iteration"] for row in LossLog(out / LOSS_LOG_FILE).read()] == list(range(1, last_state + 1))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (out / "model.safetensors").exists() and not (out / "history.json").exists()
    assert not [p.name for p in out.rglob("*") if "tmp" in p.name]  # no temp file left behind


# ----------------------------------------------------------------------------- params errors


def test_load_params_errors_name_the_file(tmp_path):
    from fusionnet.io.params import load_params

    with pytest.raises(FileNotFoundError, match=r"absent\.yaml: params file not found"):
        load_params(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"list\.yaml: expected a mapping of sections, got list"):
        load_params(tmp_path / "list.yaml")
    (tmp_path / "good.yaml").write_text("seed: 3\nevaluate: {max_side: 64}\n")
    assert load_params(tmp_path / "good.yaml") == {"seed": 3, "evaluate": {"max_side": 64}}


def test_load_params_names_a_file_that_is_not_yaml(tmp_path):
    from fusionnet.io.params import load_params

    (tmp_path / "bad.yaml").write_text("evaluate: {rows: [raw\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: .*YAML"):
        load_params(tmp_path / "bad.yaml")


def test_unknown_evaluate_keys_are_named():
    from fusionnet.evaluation.config import EvalConfig

    assert EvalConfig.from_params({"crops": {"max_side": 64}, "evaluate": {}}).max_side == 64
    for section, key in ((({"max_sid": 64}), "evaluate.max_sid"),
                         ({"guided_filter": {"radius": [2]}}, "evaluate.guided_filter.radius"),
                         ({"photos": {"trimap": ["trimap1"]}}, "evaluate.photos.trimap")):
        with pytest.raises(ValueError, match=rf"params {key}: unknown key"):
            EvalConfig.from_params({"evaluate": section})
    with pytest.raises(ValueError, match=r"unknown row 'rwa'"):
        EvalConfig.from_params({"evaluate": {"rows": ["rwa"]}})


def test_the_working_scale_is_one_key():
    """crops.max_side is the scale the network trains at; evaluation and the registered model's
    settings read it, and a section that sets its own max_side is refused, naming the key."""
    from fusionnet.data.crops import CropParams
    from fusionnet.evaluation.config import EvalConfig
    from pipeline.registry.registration import RegisterConfig

    params = {"crops": {"max_side": 96}, "evaluate": {}, "register": {}}
    assert CropParams.from_params(params).max_side == EvalConfig.from_params(params).max_side == 96
    assert RegisterConfig.from_params(params).max_side == 96
    for section, config in (("evaluate", EvalConfig), ("register", RegisterConfig)):
        with pytest.raises(ValueError, match=rf"params {section}\.max_side: the working scale is one key, crops\.max_side"):
            config.from_params({**params, section: {"max_side": 96}})
    for name in ("params.yaml", "params-photos.yaml", "params-paper.yaml"):  # every profile parses
        profile = yaml.safe_load((ROOT / name).read_text())
        assert EvalConfig.from_params(profile).max_side == RegisterConfig.from_params(profile).max_side \
            == CropParams.from_params(profile).max_side


# ----------------------------------------------------------------------------- stages/evaluate.py


def _tiny_evaluation(tmp: Path) -> dict[str, Path]:
    """1 test + 1 val composite (a soft disc on a flat background), one narrow model for all three steps."""
    from fusionnet import model as fmodel
    from fusionnet.data.trimap import band_trimap

    yy, xx = np.mgrid[:64, :64]
    alpha = np.clip((20.0 - np.hypot(yy - 32, xx - 32)) / 4.0, 0, 1)
    alpha = np.rint(alpha * 255).astype(np.uint8)
    image = np.rint(alpha[..., None] / 255.0 * (200, 60, 40) + (1 - alpha[..., None] / 255.0) * (30, 90, 160))
    rows = []
    for cid, split, folder in (("c00", "test", "test"), ("c01", "val", "train")):
        paths = {}
        for kind, arr in (("image", image.astype(np.uint8)), ("alpha", alpha), ("trimap", band_trimap(alpha, 3))):
            paths[kind] = f"{folder}/{kind}/{cid}.png"
            (tmp / "composites" / paths[kind]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp / "composites" / paths[kind])
        rows.append(dict(cid=cid, split=split, fg_id=f"fg{cid}", bg_name="flat", width=64, height=64,
                         image_path=paths["image"], alpha_path=paths["alpha"], trimap_path=paths["trimap"]))
    pq.write_table(pa.Table.from_pylist(rows), tmp / "composites" / "manifest.parquet")
    torch.manual_seed(0)
    model = tmp / "model.safetensors"
    fmodel.save(fmodel.LateFusionNet("densenet121", pretrained=False, fpn_width=16, fusion_widths=(16,) * 5,
                                     decoder_max_width=16), model)
    return {"composites": tmp / "composites", "model": model, "alpha": alpha, "trimap": band_trimap(alpha, 3)}


@pytest.mark.slow
def test_evaluate_stage_without_mlflow_writes_the_files_and_tracks_nothing(tmp_path):
    made = _tiny_evaluation(tmp_path)
    params = {"crops": {"max_side": 64},
              "evaluate": {"rows": ["raw", "constant_half"], "precision": "fp32", "workers": 0,
                           "pictures": 0, "guided_filter": {"radii": [1], "eps": [1e-2], "max_val_images": 1},
                           "photos": {"root": "no-such-photos"}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    store = tmp_path / "mlflow.db"
    env = one_thread_env(MLFLOW_TRACKING_URI=f"sqlite:///{store}", PREFECT_API_URL="http://127.0.0.1:9/api",
                         PREFECT_HOME=str(tmp_path / "prefect"))
    models = [a for step in ("segmentation", "fusion", "joint") for a in (f"--{step}", str(made["model"]))]
    done = subprocess.run([sys.executable, "stages/evaluate.py", "--no-mlflow", "--params", str(tmp_path / "params.yaml"),
                           *models, "--composites", str(made["composites"]), "--foregrounds", str(tmp_path / "nofg"),
                           "--metrics", str(tmp_path / "metrics"), "--reports", str(tmp_path / "reports")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert list(table) == ["raw", "constant_half"]
    band = made["trimap"] == 128
    by_hand = np.abs(0.5 - made["alpha"][band] / 255.0).sum() / 1000  # SAD-25 of 0.5 in the band
    assert table["constant_half"]["band"]["sad"] == pytest.approx(by_hand, rel=1e-5)
    assert json.loads((tmp_path / "metrics" / "table" / "composites" / "raw.json").read_text())
    assert "| Method |" in (tmp_path / "reports" / "table.md").read_text()
    assert "logged MLflow run" not in done.stderr
    assert not store.exists()  # any MLflow call would have created the store


def test_evaluate_stage_bad_params_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"evaluate": {"max_sid": 64}}))
    done = subprocess.run([sys.executable, "stages/evaluate.py", "--no-mlflow", "--params", str(tmp_path / "typo.yaml"),
                           "--metrics", str(tmp_path / "metrics"), "--reports", str(tmp_path / "reports")],
                          cwd=ROOT, env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "typo.yaml" in done.stderr and "evaluate.max_sid: unknown key" in done.stderr
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "reports").exists()
