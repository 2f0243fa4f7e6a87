"""Multi-process training: 2 CPU processes under torchrun with gloo, DistributedDataParallel.

Each rank runs the trainer through a small driver script (written to tmp_path) that then saves every
rank's final weights so the test can check that the ranks stayed in sync, that only rank 0 logged and wrote,
and that the training set was split across ranks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fusionnet.train.toy import write_toy_shards
from tests.support.helpers import ROOT, one_thread_env


DRIVER = r"""
import json, os, sys
from pathlib import Path
import torch, yaml
from fusionnet.train.config import StepConfig
from fusionnet.train.distributed import init_distributed, shutdown
from fusionnet.train.loop import _Trainer

params_path, shards, out, step = sys.argv[1:5]
cfg = StepConfig.from_params(yaml.safe_load(open(params_path)), step)
ctx = init_distributed(cfg.device)

class FileLogger:
    def __init__(self, path): self.path = path
    def _write(self, kind, payload):
        with open(self.path, "a") as f: f.write(json.dumps([kind, payload]) + "\n")
    def log_params(self, params): self._write("params", {})
    def log_metrics(self, metrics, step): self._write("metrics", step)
    def log_image(self, png_path, artifact_name): self._write("image", artifact_name)

logger = FileLogger(Path(out).parent / f"log-rank{ctx.rank}.jsonl")
trainer = _Trainer(step, cfg, Path(shards), Path(out), None, logger, True, ctx)
result = trainer.run()
torch.save({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, Path(out).parent / f"weights-rank{ctx.rank}.pt")
ddp = {"broadcast_buffers": trainer.module.broadcast_buffers, "bucket_view": trainer.module.gradient_as_bucket_view}
(Path(out).parent / f"result-rank{ctx.rank}.json").write_text(json.dumps({"iterations": result.iterations, "history": result.history, "ddp": ddp}))
shutdown(ctx)
"""


@pytest.mark.slow
@pytest.mark.parametrize("step", ["segmentation", "joint"])
def test_two_process_gloo_ddp(tmp_path, step):
    shards = write_toy_shards(tmp_path / "shards", n_train=8, n_val=2, size=64)
    section = {"epochs": 1, "max_iters_per_epoch": None, "base_lr": 5e-3, "max_lr": 2e-2, "half_cycle_epochs": 1}
    params = {
        "seed": 0,
        "model": {"backbone": "densenet121", "pretrained": False, "input_norm": "imagenet"},
        "train_common": {"device": "cpu", "precision": "fp32", "channels_last": False, "threads": 1, "batch_size": 2,
                         "num_workers": 0, "checkpoint_every": 1, "val_max_images": 2, "visual_count": 1},
        "train_seg": section, "train_fusion": section, "train_joint": section,
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / "run" / step
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "driver.py"), str(tmp_path / "params.yaml"), str(shards), str(out), step]
    env = one_thread_env()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # the ranks stayed in sync: identical parameters, equal to the model file rank 0 wrote. BatchNorm
    # running statistics are per rank after the last forward (DDP broadcasts rank 0's before each
    # forward), except in the joint step where every BN is frozen.
    w0 = torch.load(tmp_path / "run" / "weights-rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "run" / "weights-rank1.pt", weights_only=True)
    stats = ("running_mean", "running_var", "num_batches_tracked")
    compared = [k for k in w0 if step == "joint" or not k.endswith(stats)]
    assert len(compared) > 300
    assert all(torch.equal(w0[k], w1[k]) for k in compared)
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], w0[k]) for k in saved)

    # 8 crops split over 2 ranks, batch 2 per rank: 2 iterations, 8 samples in all
    r0 = json.loads((tmp_path / "run" / "result-rank0.json").read_text())
    r1 = json.loads((tmp_path / "run" / "result-rank1.json").read_text())
    assert r0["iterations"] == r1["iterations"] == 2
    assert r0["history"] == r1["history"] and len(r0["history"]) == 1  # rank 0's history broadcast
    assert r0["history"][0]["val_images"] == 2  # one val image scored on each rank, the sums all-reduced
    # BatchNorms train in the segmentation step (rank 0's statistics broadcast), none in the joint step
    assert r0["ddp"] == {"broadcast_buffers": step == "segmentation", "bucket_view": True}
    history = json.loads((out / "history.json").read_text())
    assert history["world_size"] == 2 and history["finished"]

    # only rank 0 logged
    assert (tmp_path / "run" / "log-rank0.jsonl").stat().st_size > 0
    assert not (tmp_path / "run" / "log-rank1.jsonl").exists()


RESUME_DRIVER = r"""
import os, sys
from pathlib import Path
import yaml
from fusionnet.train import loop
from fusionnet.train.config import StepConfig
from fusionnet.train.loop import run_step

params_path, shards, out, crash_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if crash_at:
    checkpoint = loop._Trainer._checkpoint

    def checkpoint_then_die(self):
        checkpoint(self)
        if self.state["iteration"] == crash_at:
            os._exit(3)  # like a kill, on every rank, right after the state.pt of that iteration

    loop._Trainer._checkpoint = checkpoint_then_die
cfg = StepConfig.from_params(yaml.safe_load(open(params_path)), "segmentation")
run_step("segmentation", cfg, Path(shards), Path(out))
"""


@pytest.mark.slow
def test_two_process_resume_after_a_crash_and_the_global_batch_on_one_process(tmp_path):
    """Both ranks die mid-epoch after a checkpoint; the rerun (both ranks reading rank 0's state.pt)
    ends with the weights of an uninterrupted 2-process run. With global_batch_size 4, one process
    accumulating 2 micro-batches trains the same weights as 2 processes x 1, from the start and when
    it resumes the 2-process state (a job resumed on fewer GPUs)."""
    from fusionnet.train.state import load_state

    shards = write_toy_shards(tmp_path / "shards", n_train=8, n_val=2, size=64)  # (8 crops + 8 whole) / 4: 4 iterations
    section = {"epochs": 1, "max_iters_per_epoch": None, "base_lr": 5e-3, "max_lr": 2e-2, "half_cycle_epochs": 1,
               "warmup_epochs": 1}
    params = {
        "seed": 0,
        "model": {"backbone": "densenet121", "pretrained": False, "input_norm": "imagenet", "fpn_width": 16,
                  "fusion_widths": [32, 16, 16, 8, 32], "decoder_max_width": 32},
        "train_common": {"device": "cpu", "precision": "fp32", "channels_last": False, "threads": 1, "batch_size": 2,
                         "global_batch_size": 4, "num_workers": 0, "checkpoint_every": 1, "val_max_images": 1,
                         "visual_count": 0, "grad_clip": 1.0e9},  # no clipping: it would hide a gradient twice too large
        "train_seg": section, "train_fusion": section, "train_joint": section,
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "driver.py").write_text(RESUME_DRIVER)
    env = one_thread_env(FUSIONNET_PROGRESS="off")

    def run(out: Path, crash_at: int, processes: int = 2) -> subprocess.CompletedProcess:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if processes == 2 else []
        cmd = [sys.executable, *launcher, str(tmp_path / "driver.py"), str(tmp_path / "params.yaml"), str(shards),
               str(out), str(crash_at)]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)

    def worst_difference(a: Path, b: Path, parameters_only: bool = False) -> float:
        # BatchNorm running statistics differ by design between 2 processes (rank 0's micro-batch) and
        # one process accumulating (both micro-batches, one after the other); the weights do not
        stats = ("running_mean", "running_var", "num_batches_tracked") if parameters_only else ()
        x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert x.keys() == y.keys()
        return max((x[k].double() - y[k].double()).abs().max().item() for k in x if x[k].numel() and not k.endswith(stats))

    done = run(tmp_path / "reference", 0)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "global batch 4 = 2 process(es) x 1 micro-batch(es) of 2" in done.stdout
    done = run(tmp_path / "crashed", 2)
    assert done.returncode != 0
    state = load_state(tmp_path / "crashed" / "state.pt")
    assert (state["iteration"], state["config"]["global_batch"], state["finished"]) == (2, 4, False)
    assert not (tmp_path / "crashed" / "model.safetensors").exists()
    shutil.copytree(tmp_path / "crashed", tmp_path / "fewer")
    done = run(tmp_path / "crashed", 0)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert load_state(tmp_path / "crashed" / "state.pt")["iteration"] == 4
    worst = worst_difference(tmp_path / "reference", tmp_path / "crashed")
    assert worst <= 1e-6, f"resumed 2-process weights differ from the uninterrupted run by {worst}"

    for out in ("accumulated", "fewer"):  # from scratch, and resuming the 2-process state at iteration 2
        done = run(tmp_path / out, 0, processes=1)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "global batch 4 = 1 process(es) x 2 micro-batch(es) of 2" in done.stdout
        assert "starting the segmentation step afresh" not in done.stdout + done.stderr
        assert load_state(tmp_path / out / "state.pt")["iteration"] == 4
        worst = worst_difference(tmp_path / "reference", tmp_path / out, parameters_only=True)
        assert worst <= 1e-5, f"1 process x 2 accumulated ({out}) differs from 2 processes x 1 by {worst}"
