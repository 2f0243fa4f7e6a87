"""A step interrupted at any point resumes from state.pt and ends with the SAME weights (CPU, fixed seed).

Fast: an in-process crash (an exception out of the logger mid-epoch). Slow: a real SIGKILL of the CLI
subprocess after its first checkpoints, then a re-run, compared with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from fusionnet.train.config import StepConfig
from fusionnet.train.loop import run_step
from fusionnet.train.losslog import LOSS_LOG_FILE, LossLog
from fusionnet.train.state import STATE_FILE, load_state
from fusionnet.train.toy import write_toy_shards
from tests.support.helpers import ROOT, one_thread_env



def resume_params() -> dict:
    step = {"epochs": 2, "max_iters_per_epoch": 3, "base_lr": 5e-3, "max_lr": 2e-2, "half_cycle_epochs": 1}
    return {
        "seed": 7,
        "model": {"backbone": "densenet121", "pretrained": False, "input_norm": "imagenet"},
        "train_common": {
            "device": "cpu", "precision": "fp32", "channels_last": False, "threads": 1, "batch_size": 2,
            "num_workers": 0, "checkpoint_every": 1, "val_max_images": 1, "visual_count": 1,
            "val_every": 2, "keep": "best",  # mid-epoch validations and the best weights survive a crash too
        },
        "train_seg": {**step, "warmup_epochs": 1},  # the resumed epoch mixes crops and warm-up images
        "train_fusion": step,
        "train_joint": step,
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("toy") / "shards", n_train=8, n_val=2, size=64, seed=3)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    worst = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if wa[k].numel())
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run by {worst}"


class CrashAfter:
    """A logger that raises once iteration `n` is logged: the run dies mid-epoch."""

    def __init__(self, n: int):
        self.n = n

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        if "train/loss" in metrics and step >= self.n:
            raise KeyboardInterrupt(f"simulated crash at iteration {step}")

    def log_image(self, png_path, artifact_name):
        pass


@pytest.mark.parametrize("step", ["segmentation", pytest.param("joint", marks=pytest.mark.slow)])
def test_resume_after_crash_gives_identical_weights(shards, tmp_path, step):
    cfg = StepConfig.from_params(resume_params(), step)
    reference = run_step(step, cfg, shards, tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        run_step(step, cfg, shards, tmp_path / "crashed", logger=CrashAfter(2))
    # the crash came while logging iteration 2, before its checkpoint: the run resumes after iteration 1
    assert load_state(tmp_path / "crashed" / STATE_FILE)["iteration"] == 1
    resumed = run_step(step, cfg, shards, tmp_path / "crashed")
    assert resumed.iterations == reference.iterations == 6
    assert_same_weights(reference.model_path, resumed.model_path)
    assert [h["val_sad"] for h in resumed.history] == pytest.approx([h["val_sad"] for h in reference.history], abs=1e-9)
    kept = [json.loads((d / "history.json").read_text())["kept"] for d in (tmp_path / "reference", tmp_path / "crashed")]
    assert kept[0] == kept[1] and kept[0]["iteration"] in range(7)
    logs = [LossLog(tmp_path / d / LOSS_LOG_FILE).read() for d in ("reference", "crashed")]
    assert [row["iteration"] for row in logs[1]] == list(range(1, 7))  # the crashed run's rows after its checkpoint: dropped
    assert [row["loss"] for row in logs[1]] == pytest.approx([row["loss"] for row in logs[0]], abs=1e-9)


def _cli(params: Path, shards: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fusionnet.train", "--step", "segmentation", "--params", str(params),
            "--shards", str(shards), "--out", str(out), "--quiet"]


@pytest.mark.slow
def test_sigkill_and_rerun_gives_identical_weights(shards, tmp_path):
    params = tmp_path / "params.yaml"
    p = resume_params()
    p["train_seg"]["max_iters_per_epoch"] = 4
    params.write_text(yaml.safe_dump(p))
    env = one_thread_env()
    subprocess.run(_cli(params, shards, tmp_path / "reference"), check=True, env=env, cwd=ROOT, timeout=300)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(params, shards, out), env=env, cwd=ROOT)
    killed_at = None
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / STATE_FILE).is_file():
                state = load_state(out / STATE_FILE)
                if state["iteration"] >= 3:  # mid-epoch 1 of 2 (4 iterations each)
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = state["iteration"]
                    break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "model.safetensors").exists()
    assert not load_state(out / STATE_FILE)["finished"]
    subprocess.run(_cli(params, shards, out), check=True, env=env, cwd=ROOT, timeout=300)
    assert_same_weights(tmp_path / "reference" / "model.safetensors", out / "model.safetensors")
    assert load_state(out / STATE_FILE)["iteration"] == 8


NARROW = {"fpn_width": 16, "fusion_widths": [32, 16, 16, 8, 32], "decoder_max_width": 32}  # fast, not the paper's


def test_fusion_step_resumes_from_its_init_model_with_identical_weights(shards, tmp_path):
    """The fusion step starts from the segmentation step's model (--init): a crash mid-epoch resumes
    from state.pt, keeps the init's frozen branches, and ends where an uninterrupted run ends."""
    import torch

    from fusionnet import model as fmodel
    from fusionnet.io.hashing import file_sha256

    p = resume_params()
    p["model"].update(NARROW)
    cfg = StepConfig.from_params(p, "fusion")
    torch.manual_seed(11)
    init = tmp_path / "segmentation" / "model.safetensors"
    fmodel.save(fmodel.LateFusionNet("densenet121", pretrained=False, **NARROW), init)
    reference = run_step("fusion", cfg, shards, tmp_path / "reference", init_checkpoint=init)
    with pytest.raises(KeyboardInterrupt):
        run_step("fusion", cfg, shards, tmp_path / "crashed", init_checkpoint=init, logger=CrashAfter(2))
    crashed = load_state(tmp_path / "crashed" / STATE_FILE)
    assert crashed["iteration"] == 1 and crashed["config"]["init_sha256"] == file_sha256(init)
    resumed = run_step("fusion", cfg, shards, tmp_path / "crashed", init_checkpoint=init)
    assert resumed.iterations == reference.iterations == 6
    assert_same_weights(reference.model_path, resumed.model_path)
    # only the fusion network trained: the encoder and decoders are still the init's
    start, end = load_file(str(init)), load_file(str(resumed.model_path))
    branches = [k for k in start if not k.startswith("fusion.")]
    assert branches and all(torch.equal(start[k], end[k]) for k in branches)
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("fusion."))


def shipped_profile_params() -> dict:
    """params.yaml's model and train_common (channels-last, its default precision, Adam, deterministic)
    with only the sizes cut down: 2 epochs x 3 iterations of batch 2, one thread, one val image."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["train_common"].update(threads=1, batch_size=2, num_workers=0, checkpoint_every=1, val_max_images=1,
                             visual_count=1, val_every=2, log_every=1)  # log_every: CrashAfter sees each iteration
    p["train_seg"].update(epochs=2, max_iters_per_epoch=3)
    return p


def test_shipped_profile_resumes_with_identical_weights(shards, tmp_path):
    p = shipped_profile_params()
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())["train_common"]
    assert shipped["channels_last"] is True and p["train_common"]["precision"] == shipped["precision"]
    cfg = StepConfig.from_params(p, "segmentation")
    reference = run_step("segmentation", cfg, shards, tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        run_step("segmentation", cfg, shards, tmp_path / "crashed", logger=CrashAfter(4))  # in epoch 2 of 2
    assert load_state(tmp_path / "crashed" / STATE_FILE)["iteration"] == 3
    resumed = run_step("segmentation", cfg, shards, tmp_path / "crashed")
    assert resumed.iterations == reference.iterations == 6
    assert_same_weights(reference.model_path, resumed.model_path)
    used = [load_state(d / STATE_FILE)["config"]["precision_used"] for d in (tmp_path / "reference", tmp_path / "crashed")]
    assert used[0] == used[1]
