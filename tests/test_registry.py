"""MLflow registry: pyfunc logging, champion/challenger rule, pull, and `fusionnet matte --model models:/...`.

Everything runs against a real MLflow SQLite store in a temporary folder (never the project's).
`registry_env` and `register` are reused by tests/test_serving.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_evaluate import make_checkpoints

MODEL = "late-fusion-matting"
SET_A, SET_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64  # two test-set data versions


@contextmanager
def registry_env(root: Path):
    """MLFLOW_TRACKING_URI -> a SQLite store under `root`; experiment artifacts under `root` too."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("FUSIONNET_MLFLOW_EXPERIMENT", "fusionnet-test")
        mp.setenv("FUSIONNET_MODEL_CACHE", str(root / "cache"))
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        for name in ("FUSIONNET_PARENT_RUN_ID", "FUSIONNET_PIPELINE_RUN", "DVC_STAGE", "MLFLOW_RUN_ID"):
            mp.delenv(name, raising=False)
        mp.chdir(root)  # anything MLflow puts relative to the working directory stays in root
        MlflowClient(uri).create_experiment("fusionnet-test", artifact_location=(root / "artifacts").as_uri())
        yield uri


def write_evaluation(folder: Path, sad: float, radius: int = 2, eps: float = 1e-2,
                     test_set: str | None = SET_A) -> tuple[Path, Path]:
    """The evaluate stage's outputs that register reads, with a chosen raw.band.sad and test-set version
    (None: a details.json without one)."""
    metrics, reports = folder / "metrics", folder / "reports"
    metrics.mkdir(parents=True, exist_ok=True)
    reports.mkdir(parents=True, exist_ok=True)
    (metrics / "evaluate.json").write_text(json.dumps({"raw": {"band": {"sad": sad, "mse": 0.1}, "full": {"sad": 2 * sad}}}))
    details = {"guided_filter": {"radius": radius, "eps": eps}}
    if test_set is not None:
        details["test_set"] = {"version": test_set, "split": "test", "images": 3}
    (metrics / "details.json").write_text(json.dumps(details))
    (reports / "table.md").write_text(f"| Method | SAD-25 |\n|---|---:|\n| Ours-raw | {sad} |\n")
    return metrics, reports


def register(root: Path, weights: Path, sad: float, tag: str, test_set: str | None = SET_A, **register_params) -> dict:
    from pipeline.registration import register_pipeline_model

    metrics, reports = write_evaluation(root / tag, sad, test_set=test_set)
    params = {"register": {"max_side": 64, "precision": "fp32", **register_params}}
    return register_pipeline_model(params, weights, metrics, reports, root / tag / "registered.json")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A store with one registered tiny model (v1, champion) and its weights file."""
    root = tmp_path_factory.mktemp("registry")
    weights = make_checkpoints(root / "models")["joint"]
    with registry_env(root) as uri:
        result = register(root, weights, sad=1.0, tag="v1")
        yield {"root": root, "uri": uri, "weights": weights, "first": result}


def image_file(path: Path, seed: int = 0, size=(40, 56)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- champion / challenger


@pytest.mark.slow
def test_champion_moves_only_when_beaten(registry):
    from pipeline.registry import get_client

    root, weights = registry["root"], registry["weights"]
    first = registry["first"]
    assert (first["version"], first["alias"], first["reason"]) == ("1", "champion", "no champion yet")
    worse = register(root, weights, sad=2.0, tag="v2")
    assert (worse["alias"], worse["champion_version"]) == ("challenger", "1")
    assert "does not beat" in worse["reason"]
    better = register(root, weights, sad=0.5, tag="v3")
    assert (better["alias"], better["champion_version"], better["champion_value"]) == ("champion", "1", 1.0)
    tie = register(root, weights, sad=0.5, tag="v4")
    assert tie["alias"] == "challenger"  # a tie is not a win

    client = get_client()
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "3"
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "4"
    version = client.get_model_version(MODEL, "3")
    assert float(version.tags["metric.raw.band.sad"]) == 0.5
    assert version.tags["fusionnet.checkpoint.sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert version.tags["fusionnet.test_set"] == SET_A
    assert "Ours-raw" in version.description
    assert json.loads((root / "v3" / "registered.json").read_text())["alias_uri"] == f"models:/{MODEL}@champion"


@pytest.mark.slow
def test_greater_is_better_and_missing_metric(registry):
    from pipeline.registry import get_client, promote, register_version

    client = get_client()
    source = client.get_model_version(MODEL, "1").source
    name = "promote-rule"
    same_set = {"fusionnet.test_set": SET_A}
    versions = [register_version(client, source, None, {"score": v}, "", tags=same_set, name=name).version
                for v in (0.5, 0.7, 0.6)]
    decisions = [promote(client, v, "score", greater_is_better=True, name=name) for v in versions]
    assert [d.alias for d in decisions] == ["champion", "champion", "challenger"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(versions[1])
    no_metric = register_version(client, source, None, {"other": 1.0}, "", tags=same_set, name=name).version
    assert promote(client, no_metric, "score", greater_is_better=True, name=name).alias == "challenger"  # NaN never wins

    from pipeline.registration import register_pipeline_model

    metrics, reports = write_evaluation(registry["root"] / "bad-metric", 1.0)
    with pytest.raises(KeyError, match="raw.band.nope"):
        register_pipeline_model({"register": {"metric": "raw.band.nope"}}, registry["weights"], metrics, reports,
                                registry["root"] / "x.json")


@pytest.mark.slow
def test_champion_is_compared_only_on_the_same_test_set(registry):
    """A much better number on other test data does not move the champion; the same data does."""
    from pipeline.registry import get_client

    root, weights, name = registry["root"], registry["weights"], "test-set-rule"
    first = register(root, weights, sad=1.0, tag="s1", model_name=name)
    assert (first["alias"], first["test_set"]) == ("champion", SET_A)
    other = register(root, weights, sad=0.1, tag="s2", test_set=SET_B, model_name=name)
    assert (other["alias"], other["compared"], other["champion_version"]) == ("challenger", False, "1")
    assert (other["test_set"], other["champion_test_set"]) == (SET_B, SET_A)
    assert other["champion_value"] is None and "not compared" in other["reason"] and SET_B in other["reason"]
    client = get_client()
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert client.get_model_version(name, "2").tags["fusionnet.test_set"] == SET_B
    assert "not compared" in client.get_model_version(name, "2").tags["fusionnet.promotion"]
    assert json.loads((root / "s2" / "registered.json").read_text())["compared"] is False
    # unrecorded test data (an old details.json) is not comparable either
    unknown = register(root, weights, sad=0.01, tag="s3", test_set=None, model_name=name)
    assert unknown["alias"] == "challenger" and "(unrecorded)" in unknown["reason"]
    assert "fusionnet.test_set" not in client.get_model_version(name, "3").tags
    # the same test set: compared, and the better version takes the alias
    same = register(root, weights, sad=0.5, tag="s4", model_name=name)
    assert (same["alias"], same["compared"], same["champion_value"]) == ("champion", True, 1.0)
    assert str(client.get_model_version_by_alias(name, "champion").version) == "4"
    # a bad test-set version is an error naming details.json
    metrics, reports = write_evaluation(root / "s5", 0.4, test_set="")
    from pipeline.registration import register_pipeline_model

    with pytest.raises(ValueError, match="s5/metrics/details.json"):
        register_pipeline_model({"register": {"model_name": name}}, weights, metrics, reports, root / "s5.json")


# ----------------------------------------------------------------------------- use


@pytest.mark.slow
def test_pull_downloads_the_champion(registry, tmp_path):
    # the real console command, found through the installed fusionnet.model_pullers entry point
    cli = Path(sys.executable).with_name("fusionnet")
    done = subprocess.run([str(cli), "pull", "--out", str(tmp_path / "pulled")], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)
    assert done.returncode == 0, done.stderr
    missing = subprocess.run([str(cli), "pull", f"models:/{MODEL}@nope", "--out", str(tmp_path / "nope")],
                             capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert missing.returncode == 2 and "nope" in missing.stderr and not (tmp_path / "nope").exists()
    folder = tmp_path / "pulled"
    info = json.loads((folder / "fusionnet-model.json").read_text())
    champion = info["version"]
    assert info["alias"] == "champion" and info["name"] == MODEL
    from pipeline.registry import get_client, weights_file

    expected_sha = get_client().get_model_version(MODEL, champion).tags["fusionnet.checkpoint.sha256"]
    assert hashlib.sha256(weights_file(folder).read_bytes()).hexdigest() == expected_sha
    assert (folder / "MLmodel").is_file() and (folder / "code" / "fusionnet" / "infer.py").is_file()
    requirements = (folder / "requirements.txt").read_text()
    assert "torch==" in requirements and "mlflow==" in requirements  # pinned, nothing to resolve


@pytest.mark.slow
def test_pyfunc_predicts_alpha_and_rejects_bad_images(registry):
    import mlflow

    from fusionnet.infer import Matter, load_model
    from pipeline.pyfunc_model import decode_png, images_frame
    from pipeline.registry import weights_file

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 51, 3), dtype=np.uint8)
    out = model.predict(images_frame([image]), params={"max_side": 64})
    assert list(out.columns) == ["alpha", "height", "width"]
    assert (out.loc[0, "height"], out.loc[0, "width"]) == (37, 51)
    alpha = decode_png(out.loc[0, "alpha"])
    settings = registry["first"]["settings"]
    weights = weights_file(Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion")))
    matter = Matter(load_model(weights), device="cpu", precision="fp32", max_side=64, refine=True,
                    radius=settings["radius"], eps=settings["eps"])
    reference = np.round(matter(image).alpha * 255) / 255
    assert alpha.shape == (37, 51)
    assert np.abs(alpha - reference).max() <= 1 / 255 + 1e-6

    with pytest.raises(mlflow.exceptions.MlflowException, match="row 1: not an image"):
        model.predict(images_frame([image, b"definitely not a PNG"]))


@pytest.mark.slow
def test_fusionnet_matte_with_a_registry_uri(registry, tmp_path):
    """The resolver plugin, found through its installed entry point, lets `fusionnet matte` take models:/ URIs."""
    from fusionnet.infer import Matter, load_model
    from pipeline.registry import get_client

    source = image_file(tmp_path / "photo.png")
    env = os.environ.copy()
    cmd = [sys.executable, "-m", "fusionnet.cli", "matte", str(source), "--model", f"models:/{MODEL}@champion",
           "--out", str(tmp_path / "out"), "--max-side", "64", "--device", "cpu", "--no-refine"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    alpha = np.asarray(Image.open(tmp_path / "out" / "photo_alpha.png"), np.float32) / 255
    # the same weights as the champion, run directly
    champion = get_client().get_model_version_by_alias(MODEL, "champion")
    cache = Path(os.environ["FUSIONNET_MODEL_CACHE"])
    (weights,) = [p for p in cache.rglob("*.safetensors")
                  if hashlib.sha256(p.read_bytes()).hexdigest() == champion.tags["fusionnet.checkpoint.sha256"]][:1]
    image = np.asarray(Image.open(source).convert("RGB"))
    reference = Matter(load_model(weights), device="cpu", max_side=64, refine=False)(image).alpha
    assert np.abs(alpha - reference).max() <= 1 / 255 + 1e-6

    # an alias nobody set: a clear usage error (exit 2), not a traceback
    cmd[cmd.index(f"models:/{MODEL}@champion")] = f"models:/{MODEL}@nobody"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "models:/late-fusion-matting@nobody" in done.stderr
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------------- the pipeline steps


def tiny_project(root: Path) -> Path:
    """A project folder with params.yaml, data/composites, data/foregrounds (photo GT01 trained on),
    photos/ (GT01, GT02) and models/<step>/model.safetensors."""
    import yaml

    from tests.test_evaluate import TINY_PARAMS, make_composites, make_foregrounds, make_photos

    make_composites(root / "data" / "composites")
    make_checkpoints(root / "models")
    make_photos(root / "photos", names=("GT01", "GT02"))
    make_foregrounds(root / "data" / "foregrounds", [{"id": "GT01", "split": "train", "source": "folder"},
                                                     {"id": "syn-00000", "split": "val", "source": "synthetic"}])
    params = {"evaluate": {**TINY_PARAMS["evaluate"], "photos": {"root": "photos"}},
              "register": {"max_side": 64, "precision": "fp32"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def runs_by_name(client, experiment: str = "fusionnet-test") -> dict:
    exp = client.get_experiment_by_name(experiment)
    return {run.info.run_name: run for run in client.search_runs([exp.experiment_id])}


@pytest.mark.slow
def test_dvc_stages_log_evaluate_and_register_under_one_parent(tmp_path):
    """`python stages/evaluate.py` then `python stages/register.py`, as one `dvc repro` runs them."""
    from pipeline.registry import get_client

    project = tiny_project(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    with registry_env(tmp_path):
        env = {**os.environ, "FUSIONNET_PIPELINE_RUN": "repro-1"}
        for script in ("evaluate", "register"):
            done = subprocess.run([sys.executable, str(repo / "stages" / f"{script}.py"), "--params", "params.yaml",
                                   *(["--composites", "data/composites"] if script == "evaluate" else [])],
                                  cwd=project, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        client = get_client()
        runs = runs_by_name(client)
        evaluate, register_run = runs["evaluate"], runs["register"]
        parent = evaluate.data.tags["mlflow.parentRunId"]
        assert register_run.data.tags["mlflow.parentRunId"] == parent
        assert client.get_run(parent).info.status == "FINISHED"
        table = json.loads((project / "metrics" / "evaluate.json").read_text())
        assert evaluate.data.metrics["raw.band.sad"] == pytest.approx(table["raw"]["band"]["sad"])
        assert "claims.composites.joint.bracketing_ratio" in evaluate.data.metrics
        artifacts = {a.path for folder in ("evaluation", "pictures") for a in client.list_artifacts(evaluate.info.run_id, folder)}
        assert "evaluation/table.md" in artifacts and any(p.startswith("pictures/worst_1_") for p in artifacts)
        registered = json.loads((project / "models" / "registered.json").read_text())
        assert registered["alias"] == "champion" and registered["value"] == pytest.approx(table["raw"]["band"]["sad"])
        # the served settings carry the guided filter chosen on validation
        details = json.loads((project / "metrics" / "details.json").read_text())
        # the test set's data version goes from the evaluation to the registered version
        from pipeline.evaluation import split_data_version

        version = split_data_version(project / "data" / "composites")["version"]
        assert details["test_set"]["version"] == registered["test_set"] == version
        assert evaluate.data.tags["fusionnet.test_set"] == version
        assert client.get_model_version(MODEL, registered["version"]).tags["fusionnet.test_set"] == version
        # the stage read data/foregrounds (its default --foregrounds): GT01 was trained on, so not scored
        photos = json.loads((project / "metrics" / "photos.json").read_text())
        assert photos["held_out"]["scored"] == ["GT02"] and list(photos["held_out"]["excluded"]) == ["GT01"]
        assert evaluate.data.tags["fusionnet.photos_excluded"] == "GT01"
        assert evaluate.data.metrics["photos.held_out"] == 1.0
        assert registered["settings"]["radius"] == details["guided_filter"]["radius"]
