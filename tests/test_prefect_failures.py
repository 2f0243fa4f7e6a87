"""The `train` flow's failure paths: a step whose retry also fails, a step that exits 0 without a
result, a later-steps run with and without its init model (tests/support/prefect_scenarios.py, one
temporary Prefect server for all four), and a deployment run that fails on a real process worker."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pipeline  # noqa: F401  (offline switches first)
from fusionnet.train.toy import write_toy_shards
from tests.support.helpers import ROOT
from tests.support.prefect_servers import BIN, base_env, deploy, flow_runs, prefect_api, start_worker, stop, task_runs  # noqa: F401
from tests.test_prefect_deployment import tiny_params

SCENARIOS = ("retry-fails", "no-result", "missing-init", "fusion-joint")


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict:
    """What each scenario's flow run did (see tests/support/prefect_scenarios.py), from one driver process."""
    work = tmp_path_factory.mktemp("scenarios")
    write_toy_shards(work / "shards", n_train=2, n_val=2, size=32)
    tiny_params(work / "params.yaml", iters=1)
    # no PREFECT_API_URL / MLFLOW_* of the caller's: Prefect's temporary server, the scenario's own store
    env = {**base_env(work), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "tests.support.prefect_scenarios", str(work), *SCENARIOS], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    lines = [line for line in run.stdout.splitlines() if line.startswith("SCENARIOS-JSON ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("SCENARIOS-JSON "))
    report["_log"] = run.stdout + run.stderr
    return report


def _parent_and_steps(runs: list[dict]) -> tuple[dict, dict[str, dict]]:
    """The scenario's one parent run and its step runs by name (each checked to be the parent's child)."""
    (parent,) = [r for r in runs if r["tags"].get("fusionnet.kind") == "pipeline"]
    steps = {r["name"]: r for r in runs if r is not parent}
    assert all(r["tags"]["mlflow.parentRunId"] == parent["id"] for r in steps.values())
    return parent, steps


@pytest.mark.slow
def test_a_step_whose_retry_also_fails_fails_its_child_run_the_parent_run_and_the_flow(scenarios):
    s = scenarios["retry-fails"]
    assert s["state"] == "FAILED" and "StepCrashed: step 'segmentation'" in s["message"], s
    assert "exited with code 3" in s["message"]
    assert [c["step"] for c in s["calls"]] == ["segmentation", "segmentation"]  # tried, retried once, given up
    assert s["task_runs"] == [{"name": "train-segmentation", "state": "FAILED", "run_count": 2}]
    parent, steps = _parent_and_steps(s["mlflow_runs"])
    assert list(steps) == ["segmentation"]  # one child run for both attempts
    assert steps["segmentation"]["status"] == "FAILED" and parent["status"] == "FAILED"
    assert s["files"] == ["segmentation/init.sha256"]  # no model, no result.json


@pytest.mark.slow
def test_a_step_that_exits_0_without_a_result_fails_clearly_and_leaves_no_result(scenarios):
    s = scenarios["no-result"]
    assert s["state"] == "FAILED" and "step 'segmentation': exited 0 but wrote no result" in s["message"], s
    assert len(s["calls"]) == 2
    assert s["task_runs"] == [{"name": "train-segmentation", "state": "FAILED", "run_count": 2}]
    parent, steps = _parent_and_steps(s["mlflow_runs"])
    assert steps["segmentation"]["status"] == "FAILED" and parent["status"] == "FAILED"
    assert s["files"] == ["segmentation/init.sha256"]


@pytest.mark.slow
def test_fusion_and_joint_without_a_segmentation_model_fail_before_any_step_or_run(scenarios):
    s = scenarios["missing-init"]
    assert s["state"] == "FAILED", s
    assert "missing-init/models/segmentation/model.safetensors: step 'fusion' starts from the previous step's model; " \
        "train it first" in s["message"]
    assert s["calls"] == [] and s["task_runs"] == [] and s["mlflow_runs"] == []  # nothing started, nothing to clean
    assert s["files"] == []


@pytest.mark.slow
def test_fusion_then_joint_each_start_from_the_previous_steps_model(scenarios):
    s = scenarios["fusion-joint"]
    assert s["state"] == "COMPLETED", s
    assert s["result"].endswith("fusion-joint/models/joint/model.safetensors")
    assert [(c["step"], Path(c["init"]).relative_to(Path(c["out"]).parent).as_posix()) for c in s["calls"]] == \
        [("fusion", "segmentation/model.safetensors"), ("joint", "fusion/model.safetensors")]
    assert s["task_runs"] == [{"name": "train-fusion", "state": "COMPLETED", "run_count": 1},
                              {"name": "train-joint", "state": "COMPLETED", "run_count": 1}]
    parent, steps = _parent_and_steps(s["mlflow_runs"])
    assert list(steps) == ["fusion", "joint"] and parent["status"] == "FINISHED"
    assert all(r["status"] == "FINISHED" for r in steps.values())
    # the stand-in names each model after its init's bytes: joint's holds fusion's, which holds segmentation's
    joint_bytes = b"joint<-fusion<-segmentation weights"
    assert steps["joint"]["tags"]["fusionnet.trained_model_sha256"] == hashlib.sha256(joint_bytes).hexdigest()
    assert s["files"] == ["fusion/init.sha256", "fusion/model.safetensors", "fusion/result.json",
                          "joint/init.sha256", "joint/model.safetensors", "joint/result.json",
                          "segmentation/model.safetensors"]


# ---------------------------------------------------------------------------------- a real worker
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_deployment_run_whose_step_keeps_failing_ends_failed_for_the_worker_and_its_caller(prefect_api, tmp_path):
    """A real process worker runs the deployed flow; the step's params are wrong, so both attempts
    exit 1: the flow run ends FAILED with the step's error, `prefect deployment run --watch` exits
    non-zero saying so, and the MLflow child and parent runs are FAILED."""
    from mlflow import MlflowClient

    api, env = prefect_api
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**env, "MLFLOW_TRACKING_URI": uri, "FUSIONNET_MLFLOW_EXPERIMENT": "failing"}
    project = tmp_path / "project"
    shutil.copytree(ROOT / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shards = write_toy_shards(project / "shards", n_train=2, n_val=2, size=32)
    params = yaml.safe_load(tiny_params(project / "params.yaml", iters=1).read_text())
    params["train_seg"]["learning_rat"] = 0.1  # a typo the step rejects
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    MlflowClient(uri).search_experiments()  # the SQLite schema now, before the flow process
    deploy(env, project, "failing", "--no-downstream", "--nproc", "1")
    worker = start_worker(env, project, "failing", "w1", tmp_path / "worker.log")
    try:
        run = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "fusionnet-train/failing", "--watch", "--watch-timeout", "300",
             "--param", f"params_path={project / 'params.yaml'}", "--param", f"shards_dir={shards}",
             "--param", f"models_dir={project / 'models'}", "--param", 'steps=["segmentation"]'],
            env=env, cwd=project, capture_output=True, text=True, timeout=330)
    finally:
        stop(worker)
    worker_log = (tmp_path / "worker.log").read_text()
    (flow,) = flow_runs(api, "fusionnet-train/failing")
    assert flow["state"]["type"] == "FAILED", run.stdout[-2000:] + worker_log[-4000:]
    assert "StepCrashed: step 'segmentation'" in flow["state"]["message"] and "exited with code 1" in \
        flow["state"]["message"]
    assert run.returncode == 1 and "Flow run finished in state 'Failed'" in run.stdout + run.stderr, run.stdout[-2000:]
    assert "unknown key(s) ['learning_rat']" in worker_log  # the step's own error, where the worker logs
    assert [(t["name"], t["state"]["type"], t["run_count"]) for t in task_runs(api, flow["id"])] == \
        [("train-segmentation", "FAILED", 2)]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert sorted((r.data.tags["fusionnet.kind"], r.info.status) for r in runs) == [("pipeline", "FAILED"),
                                                                                  ("step", "FAILED")]
    assert not (project / "models" / "segmentation" / "model.safetensors").exists()
