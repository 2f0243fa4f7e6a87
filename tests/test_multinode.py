"""Multi-node DDP through torch's elastic launcher: argv, rendezvous env, and 2 "nodes" on 127.0.0.1.

The slow test trains the segmentation step for 2 iterations at a global batch of 4 twice: one node
with 2 processes (--standalone), and two launchers with 1 process each meeting at a c10d rendezvous
(built by pipeline.training.launch.step_command), every launcher with its own --out as if on its own machine.
The weights must be bitwise equal: global ranks see the same data (split by global rank), DDP
averages the same two gradients, and rank 0's BatchNorm statistics are saved in both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fusionnet.train.toy import write_toy_shards
from pipeline.training.launch import Rendezvous, StepJob, processes_per_node, step_command
from tests.support.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ---------------------------------------------------------------------------------- fast checks


def test_rendezvous_from_env_single_node_by_default():
    assert Rendezvous.from_env({}) == Rendezvous()
    assert not Rendezvous.from_env({"FUSIONNET_NNODES": "1"}).multi_node


def test_rendezvous_from_env_multi_node():
    env = {"FUSIONNET_NNODES": "2", "FUSIONNET_RDZV_ENDPOINT": "node0:29400", "FUSIONNET_RDZV_ID": "job-7",
           "FUSIONNET_RDZV_CONF": "join_timeout=900"}
    rdzv = Rendezvous.from_env(env)
    assert rdzv == Rendezvous(2, "node0:29400", "job-7", "c10d", "join_timeout=900") and rdzv.multi_node


@pytest.mark.parametrize("env, message", [
    ({"FUSIONNET_NNODES": "2", "FUSIONNET_RDZV_ID": "job"}, "FUSIONNET_RDZV_ENDPOINT=HOST:PORT"),
    ({"FUSIONNET_NNODES": "2", "FUSIONNET_RDZV_ENDPOINT": "node0", "FUSIONNET_RDZV_ID": "job"}, "expected HOST:PORT"),
    ({"FUSIONNET_NNODES": "2", "FUSIONNET_RDZV_ENDPOINT": "node0:29400"}, "FUSIONNET_RDZV_ID"),
    ({"FUSIONNET_NNODES": "1:2"}, "min:max"),
    ({"FUSIONNET_NNODES": "0"}, ">= 1"),
])
def test_rendezvous_errors(env, message):
    with pytest.raises(ValueError, match=message):
        Rendezvous.from_env(env)


def test_processes_per_node(monkeypatch):
    monkeypatch.delenv("FUSIONNET_NPROC_PER_NODE", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert processes_per_node() == 3 and processes_per_node(4) == 4
    monkeypatch.setenv("FUSIONNET_NPROC_PER_NODE", "2")
    assert processes_per_node() == 2


def test_step_command_single_and_multi_node(tmp_path):
    paths = dict(params_path=tmp_path / "p.yaml", shards_dir=tmp_path / "s", out_dir=tmp_path / "o")
    job = StepJob("fusion", **paths)
    args = dict(mlflow_run_id="run1", result_path=tmp_path / "o" / "result.json")
    tail = ["-m", "pipeline.training.step_main", "--step", "fusion", "--params", str(tmp_path / "p.yaml"),
            "--shards", str(tmp_path / "s"), "--out", str(tmp_path / "o"),
            "--result", str(tmp_path / "o" / "result.json"), "--mlflow-run-id", "run1"]
    assert step_command(job, **args) == [PY] + tail
    assert step_command(job, rendezvous=Rendezvous(), **args) == [PY] + tail
    standalone = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert step_command(StepJob("fusion", **paths, nproc=2), **args) == standalone + tail
    rdzv = Rendezvous(2, "10.0.0.1:29400", "job-7")
    multi = [PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
             "--rdzv_endpoint=10.0.0.1:29400", "--rdzv_id=job-7-fusion"]
    assert step_command(job, rendezvous=rdzv, **args) == multi + tail  # torchrun even for 1 process
    positional = step_command(StepJob("fusion", *paths.values(), tmp_path / "i", 4), None, args["result_path"], rdzv)
    assert "--nproc_per_node=4" in positional and positional[-2:] == ["--init", str(tmp_path / "i")]


def test_deploy_job_variables_rendezvous(tmp_path):
    pytest.importorskip("prefect")
    from pipeline.deploy import job_variables

    plain = job_variables("0,1", 2, tmp_path)  # the old positional signature still works
    assert plain["env"]["FUSIONNET_NPROC_PER_NODE"] == "2" and "FUSIONNET_NNODES" not in plain["env"]
    env = job_variables(nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="job-7", project_dir=tmp_path)["env"]
    assert (env["FUSIONNET_NNODES"], env["FUSIONNET_RDZV_ENDPOINT"], env["FUSIONNET_RDZV_ID"]) == ("2", "node0:29400", "job-7")
    assert Rendezvous.from_env(env) == Rendezvous(2, "node0:29400", "job-7")
    with pytest.raises(ValueError, match="FUSIONNET_RDZV_ENDPOINT"):
        job_variables(nnodes=2, rdzv_id="job-7")


MIRROR_DRIVER = r"""
import json, os, sys
from pathlib import Path
import torch
from fusionnet.train.distributed import init_distributed, shutdown
from pipeline.training.step_main import NodeLeaders, NodePlace, _before_training

base = Path(sys.argv[1])
place = NodePlace.from_env()
ctx = init_distributed("cpu")
leaders = NodeLeaders(place)
report = {}
for case in ("resume", "moved", "init"):
    out, init = base / case / f"node{place.rank}", base / case / f"init{place.rank}.bin"
    try:
        _before_training(ctx, place, leaders, out, init if init.exists() else None)
        report[case] = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    except ValueError as exc:
        report[case] = str(exc)
leaders.mirror([base / "resume" / f"node{place.rank}" / "history.json"])  # after training: rank 0's outputs
(base / f"report{place.rank}.json").write_text(json.dumps(report))
shutdown(ctx)
"""


def _fake_state(path: Path, iteration: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "fusionnet.train_state.v1", "finished": False, "iteration": iteration}, path)
    return path.read_bytes()


def test_node_leaders_mirror_the_most_advanced_state(tmp_path):
    """Two node leaders (gloo over TCP, torchrun's env by hand): the resume files of the node whose
    state.pt got furthest land on both, wherever rank 0 is; a differing --init stops both ranks."""
    resume, moved, init = tmp_path / "resume", tmp_path / "moved", tmp_path / "init"
    ahead = _fake_state(resume / "node0" / "state.pt", 3)  # rank 0 ahead; rank 1 holds an older copy
    (resume / "node0" / "model.safetensors").write_bytes(b"model of rank 0")
    (resume / "node0" / "history.json").write_text("{}")
    _fake_state(resume / "node1" / "state.pt", 1)
    moved_state = _fake_state(moved / "node1" / "state.pt", 5)  # after a retry rank 0 sits on the node without one
    (moved / "node0").mkdir()
    (moved / "node0" / "model.safetensors").write_bytes(b"stale")
    init.mkdir()
    (init / "init0.bin").write_bytes(b"a")
    (init / "init1.bin").write_bytes(b"b")
    (tmp_path / "driver.py").write_text(MIRROR_DRIVER)
    port, procs = free_port(), []
    for rank in (0, 1):
        env = {**_env(tmp_path), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "GROUP_RANK": str(rank), "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(_launch([PY, str(tmp_path / "driver.py"), str(tmp_path)], env, tmp_path / f"rank{rank}.log"))
    _finish(procs, [tmp_path / "rank0.log", tmp_path / "rank1.log"], 60)
    reports = [json.loads((tmp_path / f"report{rank}.json").read_text()) for rank in (0, 1)]

    assert reports[1]["resume"] == ["model.safetensors", "state.pt"]  # history.json: rank 0's output, mirrored after
    assert (resume / "node1" / "state.pt").read_bytes() == ahead
    assert (resume / "node1" / "model.safetensors").read_bytes() == b"model of rank 0"
    assert (resume / "node1" / "history.json").read_text() == "{}"
    assert reports[0]["moved"] == reports[1]["moved"] == ["state.pt"]  # rank 0's stale model went too
    assert (moved / "node0" / "state.pt").read_bytes() == moved_state
    assert reports[0]["init"] == reports[1]["init"] and "ranks [1]" in reports[0]["init"]


# ---------------------------------------------------------------------------------- 2 nodes on 127.0.0.1


def _env(tmp_path: Path) -> dict[str, str]:
    """The caller's env minus Prefect/MLflow/FUSIONNET settings; one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FUSIONNET_"))}
    env.update(OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               PREFECT_HOME=str(tmp_path / "prefect-home"))
    return env


def _params(path: Path, iters: int, batch_size: int = 2, seed: int = 0) -> Path:
    """densenet121 at 64x64 on CPU, fp32, `iters` iterations of `batch_size` per process, no visuals."""
    step = {"epochs": 1, "max_iters_per_epoch": iters}
    params = {
        "seed": seed,
        "model": {"backbone": "densenet121", "pretrained": False, "input_norm": "imagenet"},
        "train_common": {"device": "cpu", "precision": "fp32", "channels_last": False, "batch_size": batch_size,
                         "num_workers": 0, "checkpoint_every": 100, "val_max_images": 1, "visual_count": 0,
                         "threads": 1},
        "train_seg": dict(step), "train_fusion": dict(step), "train_joint": dict(step),
    }
    path.write_text(yaml.safe_dump(params))
    return path


def _launch(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _finish(procs: list[subprocess.Popen], logs: list[Path], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()  # torchrun passes SIGTERM on to its workers
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{log}:\n{log.read_text()[-4000:]}"


def _train_two_ways(tmp_path: Path) -> dict:
    """(a) 1 node x 2 processes, (b) 2 nodes x 1 process started together; returns outs and results."""
    shards = write_toy_shards(tmp_path / "shards", n_train=8, n_val=1, size=64)
    params = _params(tmp_path / "params.yaml", iters=2)
    env = _env(tmp_path)
    t0 = time.monotonic()
    single = tmp_path / "single"
    cmd = step_command(StepJob("segmentation", params, shards, single, None, 2), None, single / "result.json")
    _finish([_launch(cmd, env, tmp_path / "single.log")], [tmp_path / "single.log"], 200)
    t1 = time.monotonic()
    rdzv = Rendezvous(2, f"127.0.0.1:{free_port()}", f"test-{uuid.uuid4().hex[:8]}", conf="join_timeout=120")
    nodes = [tmp_path / "node-a", tmp_path / "node-b"]
    procs, logs = [], []
    for out in nodes:
        cmd = step_command(StepJob("segmentation", params, shards, out), None, out / "result.json", rdzv)
        logs.append(tmp_path / f"{out.name}.log")
        procs.append(_launch(cmd, env, logs[-1]))
    _finish(procs, logs, 200)
    t2 = time.monotonic()
    print(f"1 node x 2: {t1 - t0:.1f} s; 2 nodes x 1: {t2 - t1:.1f} s")
    results = {out.name: json.loads((out / "result.json").read_text()) for out in nodes}
    return {"single": single, "nodes": nodes, "results": results}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys() and len(wa) > 300
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_two_nodes_train_like_one_node_with_two_processes(tmp_path):
    run = _train_two_ways(tmp_path)
    single, results = run["single"], run["results"]
    roles = sorted(r["node_role"] for r in results.values())
    assert roles == ["follower", "leader"], results
    leader = next(out for out in run["nodes"] if results[out.name]["node_role"] == "leader")
    follower = next(out for out in run["nodes"] if results[out.name]["node_role"] == "follower")
    lead, follow = results[leader.name], results[follower.name]
    assert (lead["rank"], follow["rank"], lead["world_size"], follow["world_size"]) == (0, 1, 2, 2)
    assert lead["nnodes"] == follow["nnodes"] == 2 and lead["local_world_size"] == 1
    assert lead["iterations"] == follow["iterations"] == 2 and lead["history"] == follow["history"]
    assert Path(follow["model_path"]) == follower / "model.safetensors"  # the follower's own copy
    assert lead["model_sha256"] == follow["model_sha256"]
    assert not (follower / "plots").exists() and not (follower / "state.pt").exists()  # rank 0's node only

    # the weights moved, and the two layouts trained to the same bits
    single_result = json.loads((single / "result.json").read_text())
    assert single_result["node_role"] == "leader" and single_result["nnodes"] == 1
    assert single_result["model_sha256"] == lead["model_sha256"]  # model files are byte-reproducible
    _assert_same_weights(single / "model.safetensors", leader / "model.safetensors")
    _assert_same_weights(leader / "model.safetensors", follower / "model.safetensors")
    history = json.loads((single / "history.json").read_text())
    assert history["world_size"] == 2 and history["iterations"] == 2
    assert json.loads((follower / "history.json").read_text()) == json.loads((leader / "history.json").read_text())
    trained, initial = load_file(str(single / "model.safetensors")), _initial_weights(tmp_path / "params.yaml")
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


def _initial_weights(params: Path) -> dict[str, torch.Tensor]:
    """The untrained network the step starts from (the trainer seeds torch, then builds it)."""
    from fusionnet.model import LateFusionNet
    from fusionnet.train.config import StepConfig

    cfg = StepConfig.from_params(yaml.safe_load(params.read_text()), "segmentation")
    torch.manual_seed(cfg.seed)
    model = LateFusionNet(cfg.backbone, pretrained=False, input_norm=cfg.input_norm, fpn_width=cfg.fpn_width,
                          fusion_widths=cfg.fusion_widths, decoder_max_width=cfg.decoder_max_width)
    return {k: v.detach() for k, v in model.state_dict().items()}
