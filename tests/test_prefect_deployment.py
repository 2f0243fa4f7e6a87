"""Prefect: step ordering and process counts, a DVC training stage run offline that survives a killed
step, and a deployment run picked up by a real process worker from a real `prefect server`."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

import pipeline  # noqa: F401  (offline switches first)
from fusionnet import model as fmodel
from fusionnet.train.toy import write_toy_shards
from mlflow import MlflowClient
from pipeline.flows import StepJob, _check_steps, discard_state_of_other_init, processes_per_node, step_command
from pipeline.training.step_main import _progress
from tests.support.prefect_servers import base_env, prefect_api, stop, task_runs  # noqa: F401  (base_env: imported from here too)

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
OFFLINE_KEYS = ("DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED",
                "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS", "DVC_NO_ANALYTICS")

# Records every connection and name lookup of every Python process that inherits PYTHONPATH.
NETWORK_PROBE = """
import os, sys
_log = os.environ.get("FUSIONNET_TEST_NETLOG")
def _hook(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.sendto"):
        target = args[:2] if event == "socket.getaddrinfo" else args[1]
        with open(_log, "a") as handle:
            handle.write(f"{os.getpid()} {event} {target!r}\\n")
if _log:
    sys.addaudithook(_hook)
"""


def tiny_params(path: Path, iters: int = 2, checkpoint_every: int = 1) -> Path:
    """densenet121 at 64x64 on CPU, `iters` iterations per step."""
    step = {"epochs": 1, "max_iters_per_epoch": iters}
    params = {
        "seed": 0,
        "model": {"backbone": "densenet121", "pretrained": False, "input_norm": "imagenet"},
        "train_common": {"device": "cpu", "precision": "fp32", "batch_size": 2, "num_workers": 0,
                         "checkpoint_every": checkpoint_every, "log_every": 1, "val_max_images": 2,
                         "visual_count": 2, "threads": 1},
        "train_seg": dict(step), "train_fusion": dict(step), "train_joint": dict(step),  # no YAML aliases
    }
    path.write_text(yaml.safe_dump(params))
    return path


def experiment_ids(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", None}


def contacted_hosts(netlog: Path) -> set[str | None]:
    """Hosts of the INET connects/lookups NETWORK_PROBE recorded (unix sockets are local: skipped)."""
    hosts: set[str | None] = set()
    for line in netlog.read_text().splitlines():
        _, _, target = line.split(" ", 2)
        if target.startswith("("):
            host = ast.literal_eval(target)[0]
            hosts.add(host.decode() if isinstance(host, bytes) else host)
    return hosts


# ---------------------------------------------------------------------------------- fast checks
def test_steps_must_be_a_contiguous_in_order_part():
    assert _check_steps(["segmentation", "fusion", "joint"]) == ["segmentation", "fusion", "joint"]
    assert _check_steps(["fusion", "joint"]) == ["fusion", "joint"]
    for bad in (["joint", "fusion"], ["segmentation", "joint"], [], ["refine"]):
        with pytest.raises(ValueError, match="contiguous"):
            _check_steps(bad)


def test_process_count_comes_from_explicit_value_env_or_visible_gpus(monkeypatch):
    monkeypatch.delenv("FUSIONNET_NPROC_PER_NODE", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    assert processes_per_node() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert processes_per_node() == 1  # no GPU visible: one CPU process
    monkeypatch.setenv("FUSIONNET_NPROC_PER_NODE", "2")
    assert processes_per_node() == 2 and processes_per_node(4) == 4
    args = dict(mlflow_run_id="abc", result_path=Path("o/r.json"))
    single = step_command(StepJob("fusion", Path("p.yaml"), Path("s"), Path("o"), nproc=1), **args)
    multi = step_command(StepJob("fusion", Path("p.yaml"), Path("s"), Path("o"), nproc=2), **args)
    assert single[1:3] == ["-m", "pipeline.training.step_main"] and "torch.distributed.run" not in single
    assert multi[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert multi[multi.index("--mlflow-run-id") + 1] == "abc"


def test_a_state_trained_from_another_init_model_is_not_resumed(tmp_path):
    out, seg_a, seg_b = tmp_path / "fusion", tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    seg_a.write_bytes(b"weights a")
    seg_b.write_bytes(b"weights b")
    out.mkdir()
    (out / "state.pt").write_bytes(b"state")
    assert discard_state_of_other_init(out, seg_a) and not (out / "state.pt").exists()  # no record: unknown origin
    (out / "state.pt").write_bytes(b"state from a")
    assert not discard_state_of_other_init(out, seg_a) and (out / "state.pt").exists()  # same init: resume
    assert discard_state_of_other_init(out, seg_b) and not (out / "state.pt").exists()  # segmentation retrained
    (out / "state.pt").write_bytes(b"state from b")
    assert discard_state_of_other_init(out, None) and not (out / "state.pt").exists()


# ---------------------------------------------------------------------------------- local (DVC) mode
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_stage_stays_on_localhost_and_resumes_a_killed_step(tmp_path):
    """`python stages/train.py` (what `dvc repro` runs) with no PREFECT_API_URL and none of the
    offline switches set by the caller: every process only talks to 127.0.0.1; SIGKILL of the step
    process mid-training makes Prefect retry the task, which resumes from state.pt."""
    shards = write_toy_shards(tmp_path / "shards", n_train=24, n_val=2, size=64)
    params = tiny_params(tmp_path / "params.yaml", iters=10, checkpoint_every=2)
    out = tmp_path / "models" / "segmentation"
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(NETWORK_PROBE)
    netlog = tmp_path / "net.log"
    env = base_env(tmp_path)
    for key in OFFLINE_KEYS:
        env.pop(key, None)  # pipeline.env must set them itself
    env.update(PYTHONPATH=str(probe_dir), FUSIONNET_TEST_NETLOG=str(netlog))
    cmd = [sys.executable, "stages/train.py", "--step", "segmentation", "--params", str(params),
           "--shards", str(shards), "--out", str(out)]
    stage = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        killed_at_iteration, kill_ms = None, None
        deadline = time.monotonic() + 150
        while killed_at_iteration is None and time.monotonic() < deadline and stage.poll() is None:
            iteration = _progress(out / "state.pt")[1]  # mmap: not the whole state read 5 times a second
            if iteration >= 4:
                steps = [p for p in psutil.Process(stage.pid).children(recursive=True)
                         if "pipeline.training.step_main" in " ".join(p.cmdline())]
                assert len(steps) == 1, "expected one running step process"
                killed_at_iteration = iteration
                kill_ms = int(time.time() * 1000)
                steps[0].send_signal(signal.SIGKILL)
            time.sleep(0.2)
        output, _ = stage.communicate(timeout=150)
    finally:
        if stage.poll() is None:
            stage.kill()
    assert killed_at_iteration is not None, f"the step never reached iteration 4:\n{output[-3000:]}"
    assert stage.returncode == 0, output[-3000:]
    assert "Retry 1/1" in output and "resuming step segmentation" in output
    assert fmodel.load(out / "model.safetensors").config["backbone"] == "densenet121"
    assert json.loads((out / "history.json").read_text())["iterations"] == 10

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (child,) = client.search_runs(experiment_ids(client), "tags.`fusionnet.step` = 'segmentation'")
    assert child.info.status == "FINISHED"
    losses = client.get_metric_history(child.info.run_id, "train/loss")
    assert max(m.step for m in losses) == 10
    # resumed, not restarted: no iteration the killed attempt had checkpointed was trained again
    assert all(m.timestamp < kill_ms for m in losses if m.step <= killed_at_iteration)
    assert any(m.timestamp > kill_ms for m in losses)

    hosts = contacted_hosts(netlog)
    assert "127.0.0.1" in hosts  # the probe saw the temporary Prefect server
    assert hosts <= LOCAL_HOSTS, f"contacted {hosts - LOCAL_HOSTS}"


# ---------------------------------------------------------------------------------- server + worker
def _flow_run_id(text: str) -> str:
    match = re.search(r"UUID: ([0-9a-f-]{36})", text)
    assert match, text
    return match.group(1)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_deployment_run_on_a_process_worker_trains_a_step_as_its_job_variables_say(prefect_api, tmp_path):
    """Real `prefect server start`, `python -m pipeline.deploy` (local source, process pool, job
    variables: 2 torchrun processes, an MLflow experiment), `prefect worker start`,
    `prefect deployment run --watch` of one step (the steps' chaining: tests/test_prefect_failures.py)."""
    api, env = prefect_api
    shards = write_toy_shards(tmp_path / "shards", n_train=4, n_val=2, size=32)
    params = tiny_params(tmp_path / "params.yaml", iters=1)
    models = tmp_path / "models"
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    deploy = [sys.executable, "-m", "pipeline.deploy", "--pool", "test-gpu", "--name", "test", "--gpus", "",
              "--nproc", "2", "--no-downstream", "--env", "FUSIONNET_MLFLOW_EXPERIMENT=deployed-runs"]
    subprocess.run(deploy, env=env, cwd=tmp_path, check=True, timeout=120)
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "test-gpu", "--name", "w1"],
                              env=env, cwd=tmp_path, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT)
    try:
        run = subprocess.run(
            [PREFECT, "deployment", "run", "fusionnet-train/test", "--watch", "--watch-timeout", "300",
             "--param", f"params_path={params}", "--param", f"shards_dir={shards}", "--param", f"models_dir={models}",
             "--param", 'steps=["segmentation"]'],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=330)
    finally:
        stop(worker)
    flow_run_id = _flow_run_id(run.stdout)
    flow_run = httpx.get(f"{api}/flow_runs/{flow_run_id}").json()
    worker_log = (tmp_path / "worker.log").read_text()
    assert run.returncode == 0 and flow_run["state"]["type"] == "COMPLETED", run.stdout[-2000:] + worker_log[-4000:]
    assert flow_run["work_pool_name"] == "test-gpu"
    assert [(t["name"], t["state"]["type"]) for t in task_runs(api, flow_run_id)] == [("train-segmentation", "COMPLETED")]
    assert fmodel.load(models / "segmentation" / "model.safetensors").config["backbone"] == "densenet121"
    # the job variables reached the flow run: its env named the experiment, the step ran as 2 processes
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (step,) = client.search_runs([client.get_experiment_by_name("deployed-runs").experiment_id],
                                 "tags.`fusionnet.kind` = 'step'")
    assert step.data.params["world_size"] == "2" and step.info.status == "FINISHED"
