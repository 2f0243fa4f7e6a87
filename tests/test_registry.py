"""MLflow registry: pyfunc logging, champion/challenger rule, pull, and `fusionnet matte --model models:/...`.

Everything runs against a real MLflow SQLite store in a temporary folder (never the project's).
`registry_env` and `register` are reused by tests/test_serving.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.helpers import isolate_mlflow
from tests.test_evaluate import make_checkpoints

MODEL = "late-fusion-matting"
SET_A, SET_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64  # two test-set data versions


@contextmanager
def registry_env(root: Path):
    """MLFLOW_TRACKING_URI -> a SQLite store under `root`; experiment artifacts under `root` too."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        isolate_mlflow(mp, uri, experiment="fusionnet-test", model_cache=root / "cache")
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
    from pipeline.registry.registration import register_pipeline_model

    metrics, reports = write_evaluation(root / tag, sad, test_set=test_set)
    params = {"crops": {"max_side": 64}, "register": {"precision": "fp32", **register_params}}
    return register_pipeline_model(params, weights, metrics, reports, root / tag / "registered.json")


# version -> raw.band.sad, in the order registered; version N's weights come from seed N (distinct alphas)
HISTORY = {"1": 1.0, "2": 2.0, "3": 0.5, "4": 0.5}
CHAMPION_AT_END = "3"  # v1 champion, v2 worse, v3 better (takes the alias), v4 a tie (not a win)


def model_file(path: Path, seed: int) -> Path:
    """A narrow densenet121 fusionnet model file (fast); another seed gives other weights and another alpha."""
    from fusionnet.model import save
    from tests.support.helpers import tiny_net

    save(tiny_net(seed, narrow=True), path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A store with HISTORY registered through the register step, each version from its own weights.

    Gives root, uri, weights (version -> model file), decisions (version -> register's result), first.
    """
    root = tmp_path_factory.mktemp("registry")
    weights = {v: model_file(root / "models" / f"v{v}" / "model.safetensors", seed=int(v)) for v in HISTORY}
    with registry_env(root) as uri:
        decisions = {v: register(root, weights[v], sad=sad, tag=f"v{v}") for v, sad in HISTORY.items()}
        yield {"root": root, "uri": uri, "weights": weights, "decisions": decisions, "first": decisions["1"]}


def image_file(path: Path, seed: int = 0, size=(40, 56)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
    return path


def raw_alpha(weights: Path, image: np.ndarray, **settings) -> np.ndarray:
    """(H,W) alpha in [0,1] that Matter gives for `image` with model file `weights` (max_side 64, no
    refinement unless `settings` say otherwise)."""
    from fusionnet.inference.loading import load_model
    from fusionnet.inference.matter import Matter

    settings = {"max_side": 64, "refine": False, **settings}
    return Matter(load_model(weights), device="cpu", precision="fp32", **settings)(image).alpha


def only_match(alpha: np.ndarray, references: dict[str, np.ndarray]) -> str:
    """The one version whose reference alpha equals `alpha` to 8-bit rounding; fails if none or several."""
    gaps = {v: float(np.abs(alpha - ref).max()) for v, ref in references.items()}
    matches = [v for v, gap in gaps.items() if gap <= 1 / 255 + 1e-6]
    assert len(matches) == 1, f"alpha matches versions {matches}; max differences {gaps}"
    return matches[0]


# ----------------------------------------------------------------------------- champion / challenger


@pytest.mark.slow
def test_champion_moves_only_when_beaten(registry):
    from pipeline.tracking.runs import get_client

    root, weights, decisions = registry["root"], registry["weights"], registry["decisions"]
    first, worse, better, tie = (decisions[v] for v in HISTORY)
    assert (first["version"], first["alias"], first["reason"]) == ("1", "champion", "no champion yet")
    assert (worse["version"], worse["alias"], worse["champion_version"]) == ("2", "challenger", "1")
    assert "does not beat" in worse["reason"]
    assert (better["alias"], better["champion_version"], better["champion_value"]) == ("champion", "1", 1.0)
    assert (tie["alias"], tie["champion_version"]) == ("challenger", "3")  # a tie is not a win

    client = get_client()
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == CHAMPION_AT_END
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "4"
    assert len({sha256(w) for w in weights.values()}) == len(HISTORY)  # so the tests below tell versions apart
    for v in HISTORY:  # each version records its own weights
        assert client.get_model_version(MODEL, v).tags["fusionnet.checkpoint.sha256"] == sha256(weights[v])
    version = client.get_model_version(MODEL, "3")
    assert float(version.tags["metric.raw.band.sad"]) == 0.5
    assert version.tags["fusionnet.test_set"] == SET_A
    assert "Ours-raw" in version.description
    assert json.loads((root / "v3" / "registered.json").read_text())["alias_uri"] == f"models:/{MODEL}@champion"


@pytest.mark.slow
def test_champion_is_compared_only_on_the_same_test_set(registry):
    """A much better number on other test data does not move the champion; the same data does."""
    from pipeline.tracking.runs import get_client

    root, weights, name = registry["root"], registry["weights"]["1"], "test-set-rule"
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
    from pipeline.registry.registration import register_pipeline_model

    with pytest.raises(ValueError, match="s5/metrics/details.json"):
        register_pipeline_model({"register": {"model_name": name}}, weights, metrics, reports, root / "s5.json")


# ----------------------------------------------------------------------------- use


@pytest.mark.slow
def test_pull_downloads_the_champion(registry, tmp_path, capsys):
    # the real console command, found through the installed fusionnet.model_pullers entry point
    cli = Path(sys.executable).with_name("fusionnet")
    done = subprocess.run([str(cli), "pull", "--out", str(tmp_path / "pulled")], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)
    assert done.returncode == 0, done.stderr
    from fusionnet.cli.main import main as fusionnet  # the same entry point in-process: one torch start-up less

    assert fusionnet(["pull", f"models:/{MODEL}@nope", "--out", str(tmp_path / "nope")]) == 2
    assert f"models:/{MODEL}@nope" in capsys.readouterr().err and not (tmp_path / "nope").exists()
    folder = tmp_path / "pulled"
    info = json.loads((folder / "fusionnet-model.json").read_text())
    assert info == {"uri": f"models:/{MODEL}@champion", "name": MODEL, "version": CHAMPION_AT_END,
                    "alias": "champion"}
    from pipeline.registry.models import weights_file

    # the champion's own weights arrived, not another version's
    assert sha256(weights_file(folder)) == sha256(registry["weights"][CHAMPION_AT_END])
    assert (folder / "MLmodel").is_file() and (folder / "code" / "fusionnet" / "inference" / "matter.py").is_file()
    requirements = (folder / "requirements.txt").read_text()
    assert "torch==" in requirements and "mlflow==" in requirements  # pinned, nothing to resolve


@pytest.mark.slow
def test_pull_by_version_number(registry, tmp_path, capsys):
    """`fusionnet pull models:/name/N` gets version N, not the champion. In-process: the same entry point
    as the console command, without another torch start-up."""
    from fusionnet.cli import main as cli
    from pipeline.registry.models import weights_file

    weights = registry["weights"]
    for version in ("2", "4"):  # neither is the champion
        folder = tmp_path / f"v{version}"
        assert cli.main(["pull", f"models:/{MODEL}/{version}", "--out", str(folder)]) == 0
        assert sha256(weights_file(folder)) == sha256(weights[version])
        info = json.loads((folder / "fusionnet-model.json").read_text())
        assert (info["name"], info["version"]) == (MODEL, version) and "alias" not in info
    assert f"models:/{MODEL}/4 -> {tmp_path / 'v4'}" in capsys.readouterr().out
    # a version that does not exist: usage error naming the URI, no folder
    assert cli.main(["pull", f"models:/{MODEL}/99", "--out", str(tmp_path / "v99")]) == 2
    assert f"models:/{MODEL}/99" in capsys.readouterr().err and not (tmp_path / "v99").exists()


@pytest.mark.slow
def test_pull_by_run_uri(registry, tmp_path, capsys):
    """`fusionnet pull runs:/<run>/<name>`: the model that run logged (the register run of v2 here; MLflow 3
    downloads it into <folder>/<name>, which download_model must look in)."""
    from fusionnet.cli import main as cli
    from pipeline.registry.models import weights_file

    run_uri = f"runs:/{registry['decisions']['2']['run_id']}/{MODEL}"  # logged under the model's name
    assert cli.main(["pull", run_uri, "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert sha256(weights_file(tmp_path / "run")) == sha256(registry["weights"]["2"])
    assert json.loads((tmp_path / "run" / "fusionnet-model.json").read_text()) == {"uri": run_uri}


@pytest.mark.slow
def test_pyfunc_predicts_alpha_and_rejects_bad_images(registry):
    import mlflow

    from pipeline.registry.pyfunc_model import decode_png, images_frame

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 51, 3), dtype=np.uint8)
    out = model.predict(images_frame([image]), params={"max_side": 64})
    assert list(out.columns) == ["alpha", "height", "width"]
    assert (out.loc[0, "height"], out.loc[0, "width"]) == (37, 51)
    alpha = decode_png(out.loc[0, "alpha"])
    assert alpha.shape == (37, 51)
    # the registered settings (refined, the guided filter's radius/eps) with the champion's weights
    settings = registry["first"]["settings"]
    references = {v: raw_alpha(w, image, refine=True, radius=settings["radius"], eps=settings["eps"])
                  for v, w in registry["weights"].items()}
    assert only_match(alpha, references) == CHAMPION_AT_END

    with pytest.raises(mlflow.exceptions.MlflowException, match="row 1: not an image"):
        model.predict(images_frame([image, b"definitely not a PNG"]))


@pytest.mark.slow
def test_fusionnet_matte_with_a_registry_uri(registry, tmp_path, capsys):
    """The resolver plugin, found through its installed entry point, lets `fusionnet matte` take models:/ URIs."""
    source = image_file(tmp_path / "photo.png")
    env = os.environ.copy()
    cmd = [sys.executable, "-m", "fusionnet.cli.main", "matte", str(source), "--model", f"models:/{MODEL}@champion",
           "--out", str(tmp_path / "out"), "--max-side", "64", "--device", "cpu", "--no-refine"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    alpha = np.asarray(Image.open(tmp_path / "out" / "photo_alpha.png"), np.float32) / 255
    # the champion's weights, run directly, give this alpha; no other version's do
    image = np.asarray(Image.open(source).convert("RGB"))
    references = {v: raw_alpha(w, image) for v, w in registry["weights"].items()}
    assert only_match(alpha, references) == CHAMPION_AT_END

    # an alias nobody set: a clear usage error (exit 2), not a traceback (in-process: one torch start-up less)
    from fusionnet.cli.main import main as fusionnet

    cmd[cmd.index(f"models:/{MODEL}@champion")] = f"models:/{MODEL}@nobody"
    assert fusionnet(cmd[3:]) == 2
    err = capsys.readouterr().err
    assert f"error: --model models:/{MODEL}@nobody" in err and "Traceback" not in err


@pytest.mark.slow
def test_the_resolver_follows_a_moved_alias(registry):
    """An alias is looked up on every call, so moving @champion takes effect at once; a version's download
    is cached and not fetched again."""
    from pipeline.registry.models import register_version
    from pipeline.tracking.runs import get_client
    from pipeline.registry.resolver import resolve

    client, weights, name = get_client(), registry["weights"], "moving-alias"
    for version in ("1", "2"):  # the same models as MODEL's v1 and v2, under another name
        register_version(client, client.get_model_version(MODEL, version).source, None, {}, "", name=name)
    client.set_registered_model_alias(name, "champion", "1")
    first = resolve(f"models:/{name}@champion")
    assert sha256(first) == sha256(weights["1"])
    downloaded_at = first.stat().st_mtime_ns
    client.set_registered_model_alias(name, "champion", "2")
    moved = resolve(f"models:/{name}@champion")
    assert sha256(moved) == sha256(weights["2"]) and moved != first
    assert resolve(f"models:/{name}/1") == first and first.stat().st_mtime_ns == downloaded_at  # from the cache
    client.set_registered_model_alias(name, "champion", "1")  # and back: the cached v1, not v2
    assert resolve(f"models:/{name}@champion") == first


@pytest.mark.slow
def test_an_alias_moved_during_the_download_does_not_mix_versions(registry, monkeypatch):
    """@champion promoted between the resolver's lookup and its download: the cache folder of the version
    looked up holds that version's files, and the next call sees the new champion."""
    import pipeline.registry.resolver as resolver
    from pipeline.registry.models import register_version
    from pipeline.tracking.runs import get_client

    client, weights, name = get_client(), registry["weights"], "alias-moved-mid-download"
    for version in ("1", "2"):
        register_version(client, client.get_model_version(MODEL, version).source, None, {}, "", name=name)
    client.set_registered_model_alias(name, "champion", "1")
    download = resolver.download_model

    def promoted_meanwhile(uri, dest, *store):
        client.set_registered_model_alias(name, "champion", "2")
        return download(uri, dest, *store)

    monkeypatch.setattr(resolver, "download_model", promoted_meanwhile)
    looked_up = resolver.resolve(f"models:/{name}@champion")
    assert resolver.cached_model_dir(f"models:/{name}/1") in looked_up.parents
    assert sha256(looked_up) == sha256(weights["1"])
    assert sha256(resolver.resolve(f"models:/{name}@champion")) == sha256(weights["2"])


def test_a_resolver_that_returns_no_file_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """A resolver plugin answering a folder or a missing path: resolve_model_path says which plugin
    returned what, and `fusionnet matte` makes it a usage error (exit 2) with nothing written."""
    from fusionnet.cli import main as cli
    from fusionnet.inference import loading as infer

    answers = {"fake:/a-folder": tmp_path, "fake:/gone": tmp_path / "gone.safetensors"}

    class FakeResolver:  # what importlib.metadata.entry_points gives for `fake = tests.fake:resolve`
        name, value = "fake", "tests.fake:resolve"

        def load(self):
            return answers.__getitem__

    monkeypatch.setattr(infer, "entry_points",
                        lambda group: [FakeResolver()] if group == infer.MODEL_RESOLVER_GROUP else [])
    for uri, answer in answers.items():
        with pytest.raises(FileNotFoundError) as caught:
            infer.resolve_model_path(uri)
        assert str(caught.value) == f"{uri}: resolver tests.fake:resolve returned {answer}, which is not a file"
    source = image_file(tmp_path / "photo.png")
    out = tmp_path / "out"
    assert cli.main(["matte", str(source), "--model", "fake:/a-folder", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"error: --model fake:/a-folder: resolver tests.fake:resolve returned {tmp_path}, which is not a file" in err
    assert not out.exists() or not any(out.iterdir())


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
    params = {"crops": TINY_PARAMS["crops"], "evaluate": {**TINY_PARAMS["evaluate"], "photos": {"root": "photos"}},
              "register": {"precision": "fp32"}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def runs_by_name(client, experiment: str = "fusionnet-test") -> dict:
    exp = client.get_experiment_by_name(experiment)
    return {run.info.run_name: run for run in client.search_runs([exp.experiment_id])}
