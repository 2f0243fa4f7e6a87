"""`dvc repro` with `orchestration.dispatch: deployment`: the training stages run on a real Prefect
process worker (real `prefect server start` on 127.0.0.1), outputs come back by sha256, the data
version travels by DVC md5; a killed worker's run is resumed by another; a worker with other data
fails the stage. Plus the pieces (settings, hand-back through MLflow, data push/pull) alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import pipeline  # noqa: F401  (offline switches first)
from fusionnet.train.toy import write_toy_shards
from pipeline.training import datasync, handoff
from pipeline.training.dispatch import DispatchSettings
from pipeline.training.step_main import _progress
from tests.support.helpers import free_port
from tests.support.prefect_servers import (  # noqa: F401  (prefect_api: the module's server)
    deploy, kill_tree, prefect_api, start_worker, stop, task_runs, wait_final,
)
from tests.test_prefect_deployment import tiny_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GIT_ID = ["-c", "user.email=test@example.invalid", "-c", "user.name=test"]


# ---------------------------------------------------------------------------------- fast checks
def test_settings_default_to_local_and_reject_typos_and_bad_values():
    assert DispatchSettings.from_params({}).dispatch == "local"
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert DispatchSettings.from_params(shipped) == DispatchSettings()  # the shipped profile stays local
    for section, message in (({"dispatch": "cluster"}, "expected one of"), ({"dispatch_mode": "local"}, "unknown"),
                             ({"deployment": "gpu"}, "<flow>/<deployment>"), ({"poll_s": 0}, "poll_s"),
                             ({"heartbeat_s": 10, "stale_s": 5}, "stale_s")):
        with pytest.raises(ValueError, match=message):
            DispatchSettings.from_params({"orchestration": section}, "p.yaml")


def test_outputs_handed_back_through_mlflow_are_verified_and_found_by_content(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("handoff", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    out = tmp_path / "worker" / "segmentation"
    (out / "plots").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "plots" / "curve.png").write_bytes(b"png")
    (out / "state.pt").write_bytes(b"resume state")
    manifest = handoff.upload_outputs(client, run_id, out)
    assert set(manifest) == {"model.safetensors", "plots/curve.png"}  # not the resume state

    back = tmp_path / "driver" / "segmentation"
    assert handoff.download_outputs(client, run_id, back) == manifest
    assert (back / "plots" / "curve.png").read_bytes() == b"png" and not (back / "state.pt").exists()
    sha = handoff.file_sha256(out / "model.safetensors")
    init = tmp_path / "other-worker" / "segmentation" / "model.safetensors"
    assert handoff.ensure_init_model(init, sha, client, log=lambda _: None) == "fetched"
    assert init.read_bytes() == b"weights"
    assert handoff.ensure_init_model(init, sha, client, log=lambda _: None) == "present"
    with pytest.raises(handoff.HandoffError, match="neither on this worker"):
        handoff.ensure_init_model(init, "0" * 64, client)

    # a corrupted transfer leaves nothing that looks complete
    artifact = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "outputs" / "model.safetensors"
    artifact.write_bytes(b"tampered")
    with pytest.raises(handoff.HandoffError, match="model.safetensors"):
        handoff.download_outputs(client, run_id, tmp_path / "driver2" / "segmentation")
    assert not (tmp_path / "driver2" / "segmentation").exists()


def _dvc_project(path: Path, remote: Path | None, shards_seed: int = 0, n_train: int = 4) -> Path:
    write_toy_shards(path / "data" / "shards", n_train=n_train, n_val=2, size=32, seed=shards_seed)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    dvc = [str(BIN / "dvc")]
    subprocess.run(dvc + ["init", "-q"], cwd=path, check=True, env=env)
    if remote is not None:
        subprocess.run(dvc + ["remote", "add", "-d", "store", str(remote)], cwd=path, check=True, env=env,
                       capture_output=True)
    subprocess.run(dvc + ["add", "-q", "data/shards"], cwd=path, check=True, env=env)
    return path


def test_a_data_version_is_pushed_by_md5_and_pulled_into_a_checkout_without_it(tmp_path):
    driver = _dvc_project(tmp_path / "driver", tmp_path / "remote")
    md5 = yaml.safe_load((driver / "data" / "shards.dvc").read_text())["outs"][0]["md5"]
    assert datasync.local_md5(driver / "data" / "shards", driver) == md5  # what dvc.lock / .dvc record
    assert datasync.push_version(driver / "data" / "shards", md5, driver) > 0

    worker = _dvc_project(tmp_path / "worker", tmp_path / "remote", shards_seed=1)  # other data
    assert datasync.local_md5(worker / "data" / "shards", worker) != md5
    assert datasync.ensure_version(worker / "data" / "shards", md5, worker, log=lambda _: None) == "pulled"
    assert datasync.local_md5(worker / "data" / "shards", worker) == md5
    files = [p.relative_to(driver) for p in (driver / "data" / "shards").rglob("*") if p.is_file()]
    assert files and all((worker / f).read_bytes() == (driver / f).read_bytes() for f in files)

    lonely = _dvc_project(tmp_path / "lonely", None, shards_seed=2)  # no remote to pull from
    with pytest.raises(datasync.DataVersionError, match=f"the step needs {md5}.*no default DVC remote"):
        datasync.ensure_version(lonely / "data" / "shards", md5, lonely)


# ---------------------------------------------------------------------------------- real server + workers
def _scratch_project(path: Path, remote: Path | None, orchestration: dict, iters: int = 1,
                     checkpoint_every: int = 1) -> Path:
    """A git + DVC checkout: the real dvc.yaml training stages (code deps dropped), stages/train.py,
    pipeline/ (the deployment's entrypoint is loaded from the worker's checkout), toy shards
    (`dvc add`), tiny params with an `orchestration` section."""
    (path / "stages").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / "train.py", path / "stages" / "train.py")
    shutil.copytree(ROOT / "pipeline", path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    stages = {name: stage for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()
              if name.startswith("train_")}
    for stage in stages.values():
        stage["deps"] = [d for d in stage["deps"] if d.startswith(("data/", "models/", "stages/"))]
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    params = yaml.safe_load(tiny_params(path / "params.yaml", iters=iters, checkpoint_every=checkpoint_every).read_text())
    params["orchestration"] = orchestration
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc_project(path, remote, n_train=2 * iters + 2)  # batch 2: `iters` iterations in the one epoch
    subprocess.run(["git", "add", "-A"], cwd=path, check=True)
    subprocess.run(["git", *GIT_ID, "commit", "-qm", "scratch project"], cwd=path, check=True)
    return path


def _deploy_and_start_worker(env: dict, project_dir: Path, name: str, log_path: Path) -> subprocess.Popen:
    deploy(env, project_dir, name)
    return start_worker(env, project_dir, name, f"{name}-w1", log_path)


def _dvc(project: Path, env: dict, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _dispatch(name: str, **more) -> dict:
    return {"dispatch": "deployment", "deployment": f"fusionnet-train/{name}", "poll_s": 0.5, "heartbeat_s": 2,
            "stale_s": 30, **more}


def _step_outs(project: Path) -> dict[str, list[str]]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {stage: [o["path"] for o in lock[stage]["outs"]] for stage in lock}


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_dvc_repro_dispatches_a_step_to_a_worker_without_a_shared_filesystem(prefect_api, tmp_path):
    """The worker's checkout is a clone without the data: it pulls the shards' DVC version from the
    remote the stage pushed it to; the step's outputs come back through MLflow, verified by sha256;
    the model equals that of a local `dvc repro` of the same params. (One step: the later ones
    travel the same way; their init model by content is test_outputs_handed_back_...)"""
    api, env = prefect_api
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    driver = _scratch_project(tmp_path / "driver", tmp_path / "remote", _dispatch("nfs-less"))
    worker_dir = tmp_path / "worker-machine"
    subprocess.run(["git", "clone", "-q", str(driver), str(worker_dir)], check=True)
    assert not (worker_dir / "data" / "shards").exists()
    worker = _deploy_and_start_worker(env, worker_dir, "nfs-less", tmp_path / "worker.log")
    # the reference: a local `dvc repro` of the same params, meanwhile (its own MLflow store: one writer each)
    local = _scratch_project(tmp_path / "local", None, {"dispatch": "local"})
    local_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'local-mlflow.db'}"}
    reference = subprocess.Popen([str(BIN / "dvc"), "repro", "train_seg"], cwd=local, env=local_env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        repro = _dvc(driver, env, "repro", "train_seg")
        local_out, _ = reference.communicate(timeout=400)
    finally:
        stop(worker)
        if reference.poll() is None:
            reference.kill()
    worker_log = (tmp_path / "worker.log").read_text()
    assert repro.returncode == 0, repro.stdout[-4000:] + repro.stderr[-2000:] + worker_log[-4000:]
    out = repro.stdout
    assert "step segmentation outputs fetched from MLflow run" in out, out[-3000:]
    assert out.count(": Completed on worker nfs-less-w1") == 1, out[-3000:]
    assert "objects pushed to the DVC remote" in out
    assert "pulling from the DVC remote" in worker_log and "pulled" in worker_log
    assert (worker_dir / "data" / "shards" / "summary.json").is_file()
    assert not (driver / "models" / "segmentation" / "state.pt").exists()  # the resume state stays on the worker
    assert reference.returncode == 0, local_out[-3000:]
    assert _step_outs(driver) == _step_outs(local)
    assert handoff.file_sha256(driver / "models" / "segmentation" / "model.safetensors") == \
        handoff.file_sha256(local / "models" / "segmentation" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_worker_killed_mid_step_is_replaced_and_the_step_resumes(prefect_api, tmp_path):
    """Workers sharing the project dir: the machine running the step dies (worker, flow and step
    processes SIGKILLed); the stage sees the heartbeat stop, reschedules the flow run, a second
    worker takes it and the step resumes from its last state.pt; the stage succeeds."""
    api, env = prefect_api
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    # stale_s 15: on a loaded 2-core host the rescheduled attempt once took over 8 s from Running to its
    # first beat, and the stage gave it up as a second lost worker
    project = _scratch_project(tmp_path / "shared", None, _dispatch("shared", heartbeat_s=1, stale_s=15),
                               iters=12, checkpoint_every=2)
    first = _deploy_and_start_worker(env, project, "shared", tmp_path / "w1.log")
    second = None
    repro = subprocess.Popen([str(BIN / "dvc"), "repro", "train_seg"], cwd=project, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = project / "models" / "segmentation" / "state.pt"
    try:
        deadline, killed_at = time.monotonic() + 240, None
        while killed_at is None and time.monotonic() < deadline and repro.poll() is None:
            iteration = _progress(state)[1]  # mmap: cheap enough to read 5 times a second
            if iteration >= 4:
                killed_at = iteration
                kill_tree(first.pid)  # the whole machine: worker, flow run process, step process
            time.sleep(0.2)
        assert killed_at is not None, "the step never reached iteration 4"
        second = start_worker(env, project, "shared", "shared-w2", tmp_path / "w2.log")
        output, _ = repro.communicate(timeout=300)
    finally:
        if repro.poll() is None:
            repro.kill()
        for worker in (first, second):
            if worker is not None:
                stop(worker)
    w2_log = (tmp_path / "w2.log").read_text()
    assert repro.returncode == 0, output[-4000:] + w2_log[-3000:]
    assert "silent for over 15 s: rescheduling" in output and "Completed on worker shared-w2" in output
    assert "resuming step segmentation" in w2_log
    history = json.loads((project / "models" / "segmentation" / "history.json").read_text())
    assert history["iterations"] == 12
    assert "step segmentation outputs in place (shared project dir)" in output


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_worker_with_other_data_and_no_remote_fails_the_stage_and_trains_nothing(prefect_api, tmp_path):
    api, env = prefect_api
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    driver = _scratch_project(tmp_path / "driver", None, _dispatch("stale"))
    worker_dir = tmp_path / "worker-machine"
    subprocess.run(["git", "clone", "-q", str(driver), str(worker_dir)], check=True)
    write_toy_shards(worker_dir / "data" / "shards", n_train=4, n_val=2, size=32, seed=7)  # another version
    worker = _deploy_and_start_worker(env, worker_dir, "stale", tmp_path / "worker.log")
    try:
        repro = _dvc(driver, env, "repro", "train_seg", timeout=240)
    finally:
        stop(worker)
    md5 = yaml.safe_load((driver / "data" / "shards.dvc").read_text())["outs"][0]["md5"]
    text = repro.stdout + repro.stderr
    assert repro.returncode != 0
    assert "ended Failed" in text and f"the step needs {md5}" in text and "no default DVC remote" in text, text[-3000:]
    assert not (driver / "models" / "segmentation" / "model.safetensors").exists()
    assert not (worker_dir / "models" / "segmentation" / "state.pt").exists()  # it never started training


def _trigger(env: dict, cwd: Path, deployment: str, *params: str) -> None:
    args = [x for p in params for x in ("--param", p)]
    subprocess.run([str(BIN / "prefect"), "deployment", "run", deployment, *args], env=env, cwd=cwd, check=True,
                   capture_output=True, timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_a_deployment_run_with_steps_joint_retrains_only_joint_then_tunes_evaluates_and_registers(prefect_api, tmp_path):
    """The deployed `train` flow, run by a process worker with steps=["joint"]: the task graph
    train-joint -> tune-refinement -> evaluate -> register; the first two steps' models untouched;
    the evaluation and the registration under the flow's MLflow parent run."""
    from fusionnet.io.hashing import file_sha256
    from tests.test_registry import runs_by_name, tiny_project

    api, env = prefect_api
    project = tiny_project(tmp_path / "project")
    shutil.copytree(ROOT / "pipeline", project / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    write_toy_shards(project / "data" / "shards", n_train=4, n_val=2, size=64)
    params = {**yaml.safe_load(tiny_params(tmp_path / "train.yaml", iters=1).read_text()),
              **yaml.safe_load((project / "params.yaml").read_text())}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = {s: file_sha256(project / "models" / s / "model.safetensors") for s in ("segmentation", "fusion", "joint")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow import MlflowClient

    MlflowClient(uri).create_experiment("fusionnet-test", artifact_location=(tmp_path / "artifacts").as_uri())
    env = {**env, "MLFLOW_TRACKING_URI": uri, "FUSIONNET_MLFLOW_EXPERIMENT": "fusionnet-test",
           "FUSIONNET_MODEL_CACHE": str(tmp_path / "cache"), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    worker = _deploy_and_start_worker(env, project, "joint-only", tmp_path / "worker.log")
    try:
        _trigger(env, project, "fusionnet-train/joint-only", 'steps=["joint"]')
        (run,) = wait_final(api, "fusionnet-train/joint-only", 1, timeout=400)
    finally:
        stop(worker)
    log = (tmp_path / "worker.log").read_text()
    assert run["state"]["type"] == "COMPLETED", log[-4000:]
    assert run["parameters"].get("downstream") is True  # the deployment's default: the whole graph
    names = [t["name"] for t in task_runs(api, run["id"])]
    assert names[0] == "train-joint" and [n.rsplit("-", 1)[0] for n in names[1:]] == ["tune-refinement", "evaluate",
                                                                                     "register"], names
    after = {s: file_sha256(project / "models" / s / "model.safetensors") for s in before}
    assert after["segmentation"] == before["segmentation"] and after["fusion"] == before["fusion"]
    assert after["joint"] != before["joint"]  # retrained from the fusion model
    registered = json.loads((project / "models" / "registered.json").read_text())
    assert registered["alias"] == "champion" and registered["sha256"] == after["joint"]
    details = json.loads((project / "metrics" / "details.json").read_text())
    assert registered["settings"]["radius"] == details["guided_filter"]["radius"]
    runs = runs_by_name(MlflowClient(uri))
    parent = runs["joint"].data.tags["mlflow.parentRunId"]
    assert runs["evaluate"].data.tags["mlflow.parentRunId"] == parent == runs["register"].data.tags["mlflow.parentRunId"]
    assert json.loads((project / "metrics" / "photos.json").read_text())["held_out"]["scored"] == ["GT02"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_each_with_its_worker_train_one_step_together(prefect_api, tmp_path):
    """A deployment with --nnodes 2 and a c10d rendezvous on 127.0.0.1: two flow runs, taken by two
    workers (one run each), join one DDP group of world size 2; the leader node logs and hands
    back, the follower records its role; both finish COMPLETED."""
    from mlflow import MlflowClient

    api, env = prefect_api
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**env, "MLFLOW_TRACKING_URI": uri}
    project = _scratch_project(tmp_path / "shared", None, {"dispatch": "local"}, iters=2)
    MlflowClient(uri).search_experiments()  # create the SQLite schema now: two flow runs at once would race to
    subprocess.run([sys.executable, "-m", "pipeline.deploy", "--pool", "two-nodes", "--name", "two-nodes",
                    "--project-dir", str(project), "--no-downstream", "--nnodes", "2",
                    "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "job-1"],
                   env=env, cwd=project, check=True, timeout=120, capture_output=True)
    workers = [subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "two-nodes", "--name", f"node-{n}",
                                 "--limit", "1"], env=env, cwd=project, stdout=open(tmp_path / f"node-{n}.log", "w"),
                                stderr=subprocess.STDOUT) for n in "ab"]
    try:
        for _ in range(2):
            _trigger(env, project, "fusionnet-train/two-nodes", 'steps=["segmentation"]')
        runs = wait_final(api, "fusionnet-train/two-nodes", 2, timeout=300)
    finally:
        for worker in workers:
            stop(worker)
    logs = "".join((tmp_path / f"node-{n}.log").read_text() for n in "ab")
    assert all(r["state"]["type"] == "COMPLETED" for r in runs), logs[-5000:]
    assert sorted(r["labels"]["prefect.worker.name"] for r in runs) == ["node-a", "node-b"]
    client = MlflowClient(uri)
    steps = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`fusionnet.kind` = 'step'")
    assert sorted(r.data.tags["fusionnet.node_role"] for r in steps) == ["follower", "leader"]
    (leader,) = [r for r in steps if r.data.tags["fusionnet.node_role"] == "leader"]
    assert leader.data.params["world_size"] == "2"
    assert json.loads((project / "models" / "segmentation" / "result.json").read_text())["nnodes"] == 2


def test_a_worker_counts_as_gone_only_after_stale_s_without_a_sign_of_life():
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from pipeline.training.dispatch import _alive_age

    def run(state_at: float, beat: float | None):
        state = SimpleNamespace(timestamp=datetime.fromtimestamp(state_at, timezone.utc))
        return SimpleNamespace(state=state, labels={} if beat is None else {handoff.ALIVE_LABEL: str(beat)})

    assert _alive_age(run(100.0, None), 130.0) == pytest.approx(30)  # running, no beat yet
    assert _alive_age(run(100.0, 125.0), 130.0) == pytest.approx(5)  # beating
    # rescheduled and running again: the dead attempt's old beat does not make it stale at once
    assert _alive_age(run(128.0, 50.0), 130.0) == pytest.approx(2)
