"""MLflow tracking: params flattening, provenance tags, pipeline-run identity, parent/child runs,
the TrainLogger, and a whole `train` flow logging to a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import pipeline  # noqa: F401  (offline switches first)
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from pipeline.tracking import runs as tracking
from pipeline.tracking.provenance import PIPELINE_RUN_ENV, dvc_md5, flatten_params, pipeline_run_key
from tests.support.helpers import ROOT, free_port, isolate_mlflow, tiny_train_params, wait_http
from tests.test_hashing import content_sha256_by_hand, dvc_dir_md5_by_hand


# ---------------------------------------------------------------------------------- helpers
def prefect_env(tmp_path: Path) -> dict[str, str]:
    """base_env, keeping the temporary Prefect server's start-up limit (base_env drops every PREFECT_ variable,
    and Prefect's default 20 s is too short on a loaded 2-core host: "Timed out ... ephemeral Prefect API server")."""
    from tests.test_prefect_deployment import base_env

    timeout = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    return {**base_env(tmp_path), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": timeout}


def git_head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def is_between(commit: str, first: str, last: str) -> bool:
    """`commit` is `first`, `last`, or on the history from `first` to `last`."""
    def ancestor(a: str, b: str) -> bool:
        return subprocess.run(["git", "merge-base", "--is-ancestor", a, b], cwd=ROOT, capture_output=True).returncode == 0
    return len(commit) == 40 and ancestor(first, commit) and ancestor(commit, last)


def narrow_heads(params_path: Path) -> Path:
    """The params file with narrow FPN/fusion/decoder widths: each step process trains several times faster."""
    params = yaml.safe_load(params_path.read_text())
    params["model"].update(tiny_train_params(narrow=True)["model"])
    params_path.write_text(yaml.safe_dump(params))
    return params_path


def blob_png(path: Path, size: int = 16) -> Path:
    yy, xx = np.mgrid[:size, :size]
    Image.fromarray(((xx + yy) * 255 // (2 * size - 2)).astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------- provenance
def test_flatten_params_names_every_leaf_with_its_path():
    flat = flatten_params({"seed": 3, "train_joint": {"base_lr": 1e-5, "sizes": [512, 800], "x": {"on": True}}})
    assert flat == {"seed": "3", "train_joint.base_lr": "1e-05", "train_joint.sizes": "[512, 800]",
                    "train_joint.x.on": "true"}
    whole = flatten_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert "crops.out_size" in whole and all(isinstance(v, str) for v in whole.values())


def test_dvc_md5_reads_the_lock_entry_or_dvc_file_of_the_shards_dir(tmp_path):
    (tmp_path / "dvc.lock").write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    "composite": {"outs": [{"path": "data/composites", "md5": "aaa.dir"}]},
                    "shard_crops": {"outs": [{"path": "data/shards", "md5": "1234abcd.dir", "nfiles": 3}]},
                },
            }
        )
    )
    assert dvc_md5(tmp_path / "data" / "shards", tmp_path) == "1234abcd.dir"
    assert dvc_md5(tmp_path / "data" / "other", tmp_path) is None
    assert dvc_md5(tmp_path / "data" / "shards", tmp_path / "nowhere") is None
    (tmp_path / "raw").mkdir()  # data tracked with `dvc add` has a .dvc file instead
    (tmp_path / "raw" / "fg.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "77.dir", "path": "fg"}]}))
    assert dvc_md5(tmp_path / "raw" / "fg", tmp_path / "nowhere") == "77.dir"


def test_pipeline_run_key_is_shared_by_the_stages_of_one_dvc_process(tmp_path, monkeypatch):
    """Stages of one `dvc` process share a key; another `dvc` process gets another; the env var wins."""
    monkeypatch.delenv(PIPELINE_RUN_ENV, raising=False)
    fake_dvc = tmp_path / "bin" / "dvc"  # a real process named dvc that runs two "stages"
    fake_dvc.parent.mkdir()
    probe = "from pipeline.tracking.provenance import pipeline_run_key; print(pipeline_run_key())"
    fake_dvc.write_text(
        f"#!{sys.executable}\nimport os, subprocess, sys\n"
        f"for _ in range(2):\n"
        f"    subprocess.run(['/bin/sh', '-c', '{sys.executable} -c \"{probe}\"'], check=True,"
        f" env={{**os.environ, 'DVC_STAGE': 'train_seg'}})\n"
    )
    fake_dvc.chmod(fake_dvc.stat().st_mode | stat.S_IEXEC)
    first = subprocess.run([str(fake_dvc)], capture_output=True, text=True, check=True).stdout.split()
    second = subprocess.run([str(fake_dvc)], capture_output=True, text=True, check=True).stdout.split()
    assert len(first) == 2 and first[0] == first[1] and first[0].startswith("dvc-")
    assert second[0] == second[1] and second[0] != first[0]
    assert pipeline_run_key({"DVC_STAGE": "x", PIPELINE_RUN_ENV: "nightly-7"}) == "nightly-7"
    assert pipeline_run_key({}) is None  # a standalone run outside DVC: new parent each time


# ---------------------------------------------------------------------------------- runs and logger
def test_parent_run_is_reused_within_a_pipeline_run_and_new_for_the_next(mlflow_store, monkeypatch, tmp_path):
    client = mlflow_store
    params = {"seed": 0, "train_seg": {"epochs": 2}}
    monkeypatch.setenv(PIPELINE_RUN_ENV, "repro-1")
    with tracking.parent_run(params) as first:
        assert os.environ[tracking.PARENT_RUN_ENV] == first  # inherited by step subprocesses
    assert tracking.PARENT_RUN_ENV not in os.environ
    with tracking.parent_run(params) as again:
        pass
    monkeypatch.setenv(PIPELINE_RUN_ENV, "repro-2")
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.parent_run(params) as other:
            raise RuntimeError("boom")
    assert again == first and other != first
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and client.get_run(other).info.status == "FAILED"
    assert run.data.params == {"seed": "0", "train_seg.epochs": "2"}
    assert run.data.tags[tracking.TAG_PIPELINE_RUN] == "repro-1"
    assert len(run.data.tags[MLFLOW_GIT_COMMIT]) == 40  # the project's HEAD
    # its artifacts live beside the database, not in ./mlruns of whatever the cwd is
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    # an explicit FUSIONNET_PARENT_RUN_ID wins over the pipeline-run key
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, first)
    with tracking.parent_run(params) as explicit:
        assert explicit == first


def test_train_logger_records_params_metrics_and_named_images(mlflow_store, tmp_path):
    client = mlflow_store
    params = {"seed": 1, "model": {"backbone": "densenet121"}}
    with tracking.parent_run(params, shards_dir=tmp_path / "shards") as parent_id:
        child = tracking.start_step_run(client, parent_id, "segmentation", params, tmp_path / "shards")
        logger = tracking.MlflowTrainLogger(child, client, flush_seconds=3600)
        logger.log_params({"epochs": 3, "lr": {"base": 0.1}})
        logger.log_params({"epochs": 3})  # the same value again (a resumed step) is accepted
        for it in range(5):
            logger.log_metrics({"loss/total": 1.0 / (it + 1), "lr": 0.1}, step=it)
        assert client.get_metric_history(child, "loss/total") == []  # buffered: no round trip yet
        logger.log_image(blob_png(tmp_path / "grid.png"), "plots/epoch_001.png")
        logger.log_image(blob_png(tmp_path / "loss_curves.png"), "loss_curves.png")
        logger.log_metrics({"val_sad": 12.5}, step=1)
        logger.flush()
    run = client.get_run(child)
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent_id and run.data.tags[tracking.TAG_STEP] == "segmentation"
    assert run.data.params["epochs"] == "3" and run.data.params["lr.base"] == "0.1"
    assert run.data.params["model.backbone"] == "densenet121"  # the whole params.yaml, flattened
    history = client.get_metric_history(child, "loss/total")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert client.get_metric_history(child, "val_sad")[0].value == 12.5
    artifacts = {a.path for a in client.list_artifacts(child)} | {a.path for a in client.list_artifacts(child, "plots")}
    assert {"plots/epoch_001.png", "loss_curves.png"} <= artifacts
    local = Path(client.download_artifacts(child, "plots/epoch_001.png", str(tmp_path / "dl")))
    assert np.array_equal(np.asarray(Image.open(local)), np.asarray(Image.open(tmp_path / "grid.png")))
    children = client.search_runs([run.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'")
    assert [r.info.run_id for r in children] == [child]


# ---------------------------------------------------------------------------------- what the UI shows
@pytest.fixture(scope="module")
def ui_store(tmp_path_factory) -> MlflowClient:
    """One SQLite store for the tests below (creating a store's schema costs seconds)."""
    root = tmp_path_factory.mktemp("ui-store")
    with pytest.MonkeyPatch.context() as mp:
        isolate_mlflow(mp, f"sqlite:///{root / 'mlflow.db'}")
        yield MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def test_the_experiment_is_a_model_training_experiment(ui_store):
    client = ui_store
    fresh = tracking.experiment_id(client, "fresh")
    assert client.get_experiment(fresh).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = client.create_experiment("older")  # created before the kind was set: gets it on next use
    assert tracking.experiment_id(client, "older") == older
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.experiment_id(client, "chosen")  # a kind someone chose stays
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"
    assert tracking.runs_page_url("http://127.0.0.1:5000/", fresh) == (
        f"http://127.0.0.1:5000/#/experiments/{fresh}/runs?workflowType=machine_learning")


def test_runs_are_named_by_profile_and_data_and_have_the_shards_as_dataset(ui_store, tmp_path, monkeypatch):
    from fusionnet.train.toy import write_toy_shards

    client = ui_store
    shards = write_toy_shards(tmp_path / "shards", n_train=6, n_val=2, size=32)  # foregrounds fg00000..fg00005
    photos = {"seed": 0, "foregrounds": {"source": "folder"}}
    with tracking.parent_run(photos, shards) as parent_id:
        child = tracking.start_step_run(client, parent_id, "joint", photos, shards)
    with tracking.parent_run(photos, shards) as again:  # a new pipeline run on the same params and data
        pass
    with tracking.parent_run({"foregrounds": {"source": "synthetic"}}, shards) as synthetic:
        pass
    with tracking.parent_run(photos) as no_data:
        pass
    names = {run_id: client.get_run(run_id).info.run_name for run_id in (parent_id, again, synthetic, no_data)}
    assert names == {parent_id: "photos-6fg", again: "photos-6fg", synthetic: "synthetic-6fg", no_data: "photos"}

    digest = dvc_dir_md5_by_hand(shards)
    for run_id in (parent_id, child):
        (dataset_input,) = client.get_run(run_id).inputs.dataset_inputs
        dataset = dataset_input.dataset
        assert (dataset.name, dataset.digest, dataset.source_type) == ("shards", digest, "local")
        assert json.loads(dataset.source) == {"uri": str(shards.resolve())}
        assert json.loads(dataset.profile) == {"train_rows": 6, "val_rows": 2, "foregrounds": 6}
        assert {t.key: t.value for t in dataset_input.tags} == {"mlflow.data.context": "training"}
    assert client.get_run(no_data).inputs.dataset_inputs == []
    exp_id = client.get_run(parent_id).info.experiment_id
    found = client.search_runs([exp_id], f"dataset.digest = '{digest}' and dataset.context = 'training'")
    assert {r.info.run_id for r in found} == {parent_id, child, again, synthetic}  # the UI's dataset filter

    # inside a DVC project the digest is the md5 dvc.lock records for the shards
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"shard_crops": {
        "outs": [{"path": "shards", "md5": "0123456789abcdef0123456789abcdef.dir"}]}}}))
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    with tracking.parent_run(photos, shards) as in_dvc:
        pass
    (dataset_input,) = client.get_run(in_dvc).inputs.dataset_inputs
    assert dataset_input.dataset.digest == "0123456789abcdef0123456789abcdef.dir"


def test_the_source_is_the_entry_point_relative_to_the_project(ui_store, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "stages" / "train.py"), "--step", "joint"])
    assert tracking.entry_point(ROOT) == "stages/train.py"
    monkeypatch.setattr(sys, "argv", ["/elsewhere/tool.py"])  # not a file here: its name
    assert tracking.entry_point(ROOT) == "tool.py"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "scripts" / "mlflow_ui_check.py")])
    with tracking.parent_run({"seed": 0}) as parent_id:
        pass
    tags = ui_store.get_run(parent_id).data.tags
    assert tags["mlflow.source.name"] == "scripts/mlflow_ui_check.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and len(tags[MLFLOW_GIT_COMMIT]) == 40


# ---------------------------------------------------------------------------------- real server
def record_evaluation(model_path: Path, parent_run_id: str) -> None:
    """The `evaluate` hook used below: marks the parent run as the real evaluation flow would."""
    client = tracking.get_client()
    client.log_metric(parent_run_id, "hook/called", 1.0)
    client.set_tag(parent_run_id, "hook.model_path", str(model_path))
    assert os.environ[tracking.PARENT_RUN_ENV] == parent_run_id  # so nested code lands in the same parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_flow_logs_parent_and_step_runs_to_a_tracking_server(tmp_path):
    from fusionnet.train.toy import write_toy_shards
    from tests.test_prefect_deployment import tiny_params

    shards = write_toy_shards(tmp_path / "shards", n_train=8, n_val=2, size=64)
    params = narrow_heads(tiny_params(tmp_path / "params.yaml", iters=1))
    models = tmp_path / "models"
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = prefect_env(tmp_path)
    server_log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        env=env, cwd=tmp_path, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"{uri}/health", timeout=90, proc=server)
        env.update(MLFLOW_TRACKING_URI=uri, FUSIONNET_PIPELINE_RUN="test-pipeline-1")
        code = (
            "from pipeline.flows import train; "
            f"print('MODEL', train(params_path={str(params)!r}, shards_dir={str(shards)!r}, "
            f"models_dir={str(models)!r}, evaluate='tests.test_mlflow_tracking:record_evaluation'))"
        )
        head_before = git_head()
        flow = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=240)
        assert flow.returncode == 0, flow.stdout[-3000:] + flow.stderr[-3000:]
        assert f"MODEL {models / 'joint' / 'model.safetensors'}" in flow.stdout

        client = MlflowClient(uri)
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        (parent,) = client.search_runs(exp_ids, f"tags.`{tracking.TAG_KIND}` = 'pipeline'")
        assert parent.info.status == "FINISHED"
        assert parent.data.tags[tracking.TAG_PIPELINE_RUN] == "test-pipeline-1"
        assert parent.data.params["model.backbone"] == "densenet121"
        assert parent.data.params["train_joint.max_iters_per_epoch"] == "1"
        assert parent.data.metrics["hook/called"] == 1.0
        assert parent.data.tags["hook.model_path"] == str(models / "joint" / "model.safetensors")
        # the checkout's commit when the flow started: HEAD then, or one committed meanwhile (shared checkouts)
        assert is_between(parent.data.tags[MLFLOW_GIT_COMMIT], head_before, git_head())
        assert parent.data.tags["fusionnet.data.sha256"] == content_sha256_by_hand(shards)
        # what the UI shows: named after profile and data, the shards as dataset, the flow as source
        assert parent.info.run_name == "synthetic-8fg"
        assert parent.data.tags["mlflow.source.name"] == "prefect flow fusionnet-train"
        assert parent.inputs.dataset_inputs[0].dataset.digest == dvc_dir_md5_by_hand(shards)
        assert f"[mlflow] runs: {uri}/#/experiments/{parent.info.experiment_id}/runs?" in flow.stderr

        children = client.search_runs(exp_ids, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'",
                                      order_by=["attributes.start_time ASC"])
        assert [c.info.run_name for c in children] == ["segmentation", "fusion", "joint"]
        for child in children:
            run_id, step = child.info.run_id, child.info.run_name
            assert child.info.status == "FINISHED" and child.info.artifact_uri.startswith("mlflow-artifacts:")
            assert child.data.params["train_seg.epochs"] == "1" and child.data.params["step"] == step
            assert child.inputs.dataset_inputs[0].dataset.digest == dvc_dir_md5_by_hand(shards)
            assert len(child.data.tags[tracking.TAG_TRAINED_MODEL_SHA]) == 64
            assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1]
            assert [m.step for m in client.get_metric_history(run_id, "train/lr")] == [1]
            assert len(client.get_metric_history(run_id, "val/sad")) == 2  # before training and after epoch 1
            assert child.data.metrics["epoch/samples_per_s"] > 0 and child.data.metrics["summary/samples_per_s"] > 0
            assert child.data.metrics["initial/val_sad"] >= 0
            names = {a.path for folder in (None, "plots") for a in client.list_artifacts(run_id, folder)}
            assert {"history.json", "plots/val_epoch_000.png", "plots/val_epoch_001.png",
                    "plots/loss_curves.png"} <= names
            served = client.download_artifacts(run_id, "plots/loss_curves.png", str(tmp_path / "dl" / step))
            assert Path(served).read_bytes() == (models / step / "plots" / "loss_curves.png").read_bytes()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dvc_repro_groups_the_training_stages_under_one_parent(tmp_path):
    """The real dvc.yaml training stages (their cmd and params lists; code deps dropped) in a scratch
    DVC project: one `dvc repro` = one parent run with a child per step, tagged with DVC's md5 of
    the shards; a train_fusion key change leaves train_seg alone, a train_common change does not."""
    from fusionnet.train.toy import write_toy_shards
    from tests.test_prefect_deployment import tiny_params

    project = tmp_path / "project"
    (project / "stages").mkdir(parents=True)
    (project / "stages" / "train.py").write_text((ROOT / "stages" / "train.py").read_text())
    write_toy_shards(project / "data" / "shards", n_train=8, n_val=2, size=64)
    narrow_heads(tiny_params(project / "params.yaml", iters=1))
    stages = {name: stage for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()
              if name.startswith("train_")}
    assert list(stages) == ["train_seg", "train_fusion", "train_joint"]
    for stage in stages.values():
        stage["deps"] = [d for d in stage["deps"] if d.startswith(("data/", "models/", "stages/"))]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    env = prefect_env(tmp_path)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    dvc = [str(Path(sys.executable).with_name("dvc"))]

    def run(*args: str) -> str:
        done = subprocess.run(dvc + list(args), cwd=project, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    run("init", "--no-scm", "-q")
    run("add", "-q", "data/shards")
    run("repro", "train_fusion")  # two stages are enough to show the grouping (and save time)
    shards_md5 = yaml.safe_load((project / "data" / "shards.dvc").read_text())["outs"][0]["md5"]

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(exp_ids, f"tags.`{tracking.TAG_KIND}` = 'pipeline'")
    assert parent.data.tags[tracking.TAG_PIPELINE_RUN].startswith("dvc-")
    assert parent.data.tags["fusionnet.data.dvc_md5"] == shards_md5
    children = client.search_runs(exp_ids, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time ASC"])
    assert [c.info.run_name for c in children] == ["segmentation", "fusion"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(c.data.tags["fusionnet.data.dvc_md5"] == shards_md5 for c in children)
    # the UI's Dataset column shows DVC's md5 as the digest, its Source column the stage script
    assert shards_md5 == dvc_dir_md5_by_hand(project / "data" / "shards")
    for tracked in (parent, *children):
        assert tracked.inputs.dataset_inputs[0].dataset.digest == shards_md5
        assert tracked.data.tags["mlflow.source.name"] == "stages/train.py"

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_fusion"]["base_lr"] = params["train_fusion"].get("base_lr", 5e-4) / 2
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(json.loads(run("status", "--json"))) == {"train_fusion", "train_joint"}  # joint never ran
    params["train_common"]["grad_clip"] = 1.0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert set(json.loads(run("status", "--json"))) == {"train_seg", "train_fusion", "train_joint"}
