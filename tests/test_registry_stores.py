"""One MLflow store per command (pipeline.tracking.store), with two projects side by side.

Two temporary git + DVC projects, A and B, each with its own mlflow.db holding `late-fusion-matting`
@champion of different weights, and one model cache shared by both. With MLFLOW_TRACKING_URI unset,
the store is the project holding the current folder (or --project): every lookup, download and cache
entry of a command comes from it, never from the other project, never from the checkout the package
is installed in, and a lookup outside any project creates nothing. Also: `fusionnet pull --out` never
replaces a folder it did not write.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.helpers import isolate_mlflow
from tests.test_registry import MODEL, image_file, model_file, register, registry_env, sha256

pytestmark = pytest.mark.slow  # registers two models (about 15 s)


def make_project(root: Path) -> Path:
    """A git repository with `dvc init` in it (what a clone of the project is)."""
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    """{"A": root, "B": root, "weights": {"A": file, "B": file}, "cache": folder}: each project's store has
    MODEL v1 @champion, from its own weights (seed 1 in A, seed 2 in B)."""
    base = tmp_path_factory.mktemp("stores")
    found = {"cache": base / "cache", "weights": {}}
    for name, seed in (("A", 1), ("B", 2)):
        root = found[name] = make_project(base / name)
        found["weights"][name] = model_file(base / f"weights-{name}.safetensors", seed=seed)
        with registry_env(root):
            assert register(root, found["weights"][name], sad=1.0, tag="v1")["alias"] == "champion"
    return found


@pytest.fixture
def no_uri(projects, monkeypatch):
    """MLFLOW_TRACKING_URI unset (the rule then follows the project), the shared model cache."""
    isolate_mlflow(monkeypatch, "unused", model_cache=projects["cache"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    return monkeypatch


def pulled_sha(folder: Path) -> str:
    from pipeline.registry.models import weights_file

    return sha256(weights_file(folder))


def test_each_project_pulls_and_resolves_its_own_champion(projects, no_uri, tmp_path, capsys):
    """From A (a subfolder: the rule walks up), B, and B with --project A; the matte resolver the same,
    each from its own cache entry, and a second round from the cache still crosses nothing."""
    from fusionnet.cli.main import main as fusionnet
    from pipeline.registry.resolver import resolve

    want = {name: sha256(projects["weights"][name]) for name in "AB"}
    assert want["A"] != want["B"]
    inside_a = projects["A"] / "photos"
    inside_a.mkdir(exist_ok=True)
    for cwd, extra, expect in ((inside_a, [], "A"), (projects["B"], [], "B"), (projects["B"], ["--project", str(projects["A"])], "A")):
        no_uri.chdir(cwd)
        out = tmp_path / f"pulled-{cwd.name}-{len(extra)}"
        assert fusionnet(["pull", "--out", str(out), *extra]) == 0, capsys.readouterr().err
        assert pulled_sha(out) == want[expect], f"pull from {cwd} {extra}"
    assert not (inside_a / "mlflow.db").exists()
    resolved = {}
    for _ in range(2):  # downloaded, then from the cache
        for name in ("A", "B", "A"):
            no_uri.chdir(projects[name])
            path = resolve(f"models:/{MODEL}@champion")
            assert sha256(path) == want[name], f"resolved from {name}"
            resolved.setdefault(name, path)
            assert path == resolved[name]
    assert resolved["A"].parents[4] != resolved["B"].parents[4]  # <cache>/<store>/<name>/<version>/<sha>/...
    assert projects["cache"] in resolved["A"].parents


def test_matte_with_a_registry_uri_uses_the_current_projects_model(projects, no_uri, tmp_path, capsys):
    """`fusionnet matte --model models:/...@champion` from B mattes with B's weights (alpha = B's own)."""
    import numpy as np
    from PIL import Image

    from fusionnet.cli.main import main as fusionnet
    from tests.test_registry import only_match, raw_alpha

    photo = image_file(tmp_path / "photo.png", seed=3)
    references = {name: raw_alpha(projects["weights"][name], np.asarray(Image.open(photo).convert("RGB")))
                  for name in "AB"}
    for name in "BA":
        no_uri.chdir(projects[name])
        out = tmp_path / f"mattes-{name}"
        code = fusionnet(["matte", str(photo), "--model", f"models:/{MODEL}@champion", "--out", str(out),
                          "--max-side", "64", "--no-refine", "--device", "cpu", "--precision", "fp32"])
        assert code == 0, capsys.readouterr().err
        alpha = np.asarray(Image.open(out / "photo_alpha.png"), dtype=np.float32) / 255
        assert only_match(alpha, references) == name


def test_a_tampered_cache_entry_is_downloaded_again_and_a_wrong_download_refused(projects, no_uri):
    from mlflow import MlflowClient

    from pipeline.registry.resolver import SHA_TAG, resolve

    no_uri.chdir(projects["A"])
    path = resolve(f"models:/{MODEL}@champion")
    good = sha256(projects["weights"]["A"])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # half a file, as a killed copy leaves
    again = resolve(f"models:/{MODEL}@champion")
    assert again == path and sha256(again) == good
    # the registry records another sha256 than the file it serves: refused, naming both
    uri = f"sqlite:///{projects['A'] / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.set_model_version_tag(MODEL, "1", SHA_TAG, "0" * 64)
    try:
        with pytest.raises(LookupError, match=f"has sha256 {good}.*records {'0' * 64}.*refusing"):
            resolve(f"models:/{MODEL}@champion")
    finally:
        client.set_model_version_tag(MODEL, "1", SHA_TAG, good)


def test_no_store_is_named_and_none_is_created(projects, no_uri, tmp_path, capsys):
    """Outside any project, and in a project without mlflow.db: a clear error (rc 2) naming where it looked
    and how to point at a store; no mlflow.db appears anywhere."""
    from fusionnet.cli.main import main as fusionnet

    nowhere = tmp_path / "nowhere"
    bare = make_project(tmp_path / "bare")
    for cwd in (nowhere, bare):
        cwd.mkdir(exist_ok=True)
        no_uri.chdir(cwd)
        assert fusionnet(["pull", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "error: no MLflow store found" in err and "MLFLOW_TRACKING_URI" in err and "--project" in err
        assert (str(bare / "mlflow.db") if cwd == bare else f"{nowhere} and the folders above it") in err
        photo = image_file(tmp_path / "photo.png")
        assert fusionnet(["matte", str(photo), "--model", f"models:/{MODEL}@champion", "--out", str(tmp_path / "m")]) == 2
        assert "no MLflow store found" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
        assert sorted(p.name for p in tmp_path.rglob("mlflow.db")) == []


def test_pull_never_replaces_a_folder_it_did_not_write(projects, no_uri, tmp_path, capsys):
    from fusionnet.cli.main import main as fusionnet

    no_uri.chdir(projects["B"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    assert fusionnet(["pull", "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert f"error: {mine}: folder is not empty and was not written by `fusionnet pull`" in err and "--force" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"
    no_uri.chdir(mine)  # `--out .` inside a user's folder: the same refusal
    assert fusionnet(["pull", "--out", ".", "--project", str(projects["B"])]) == 2
    assert (mine / "notes.txt").read_text() == "my notes"
    no_uri.chdir(projects["B"])
    assert fusionnet(["pull", "--out", str(mine), "--force"]) == 0
    assert not (mine / "notes.txt").exists() and pulled_sha(mine) == sha256(projects["weights"]["B"])
    assert fusionnet(["pull", "--out", str(mine), "--project", str(projects["A"])]) == 0  # one pull wrote: fine
    assert pulled_sha(mine) == sha256(projects["weights"]["A"])
    (mine / "artifacts" / "extra.txt").write_text("added later")  # anything pull did not write: refused again
    assert fusionnet(["pull", "--out", str(mine)]) == 2
    assert (mine / "artifacts" / "extra.txt").is_file()


def test_runs_are_logged_into_the_project_being_run(projects, no_uri, tmp_path):
    """A parent run started in B goes to B's store, never A's nor the installed checkout's; a step process
    started meanwhile in another folder (as a launcher may) logs into the same store."""
    from pipeline.tracking.runs import parent_run

    counts = {name: run_count(projects[name]) for name in "AB"}
    no_uri.chdir(projects["B"])
    no_uri.setenv("FUSIONNET_MLFLOW_EXPERIMENT", "fusionnet-test")
    with parent_run({"seed": 0}) as run_id:
        step = subprocess.run(
            [sys.executable, "-c", "from pipeline.tracking.runs import get_client; print(get_client().tracking_uri)"],
            cwd=tmp_path, capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert step.stdout.strip() == f"sqlite:///{projects['B'] / 'mlflow.db'}", step.stderr
    assert run_count(projects["A"]) == counts["A"] and run_count(projects["B"]) == counts["B"] + 1
    assert "FUSIONNET_PROJECT" not in os.environ and run_id


def test_a_dvc_stage_logs_into_its_own_repository(projects, no_uri):
    """`dvc repro` in B runs a stage that opens the tracking client: B's store (DVC_ROOT), not A's."""
    no_uri.chdir(projects["B"])
    script = ("from pipeline.tracking.runs import get_client, experiment_id\n"
              "client = get_client(); client.create_run(experiment_id(client), run_name='from-dvc')\n"
              "open('store.txt', 'w').write(client.tracking_uri)\n")
    (projects["B"] / "stage.py").write_text(script)
    (projects["B"] / "dvc.yaml").write_text(
        f"stages:\n  log:\n    cmd: {sys.executable} stage.py\n    deps: [stage.py]\n    outs: [{{store.txt: {{cache: false}}}}]\n")
    before = run_count(projects["A"])
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=projects["B"], capture_output=True,
                          text=True, env=os.environ.copy(), timeout=180)
    assert done.returncode == 0, done.stderr
    assert (projects["B"] / "store.txt").read_text() == f"sqlite:///{projects['B'] / 'mlflow.db'}"
    assert run_count(projects["A"]) == before
    with sqlite3.connect(projects["B"] / "mlflow.db") as db:
        assert db.execute("select count(*) from runs where name = 'from-dvc'").fetchone()[0] == 1


def run_count(root: Path) -> int:
    with sqlite3.connect(root / "mlflow.db") as db:
        return db.execute("select count(*) from runs").fetchone()[0]


def test_the_store_rule(tmp_path):
    """The rule itself: MLFLOW_TRACKING_URI, FUSIONNET_PROJECT, DVC_ROOT, else the nearest marker upwards;
    a DVC temporary experiment workspace is its repository."""
    from pipeline.tracking.store import NoStoreError, tracking_uri

    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "sub" / "deeper").mkdir(parents=True)
    (repo / "mlflow.db").write_bytes(b"")
    temp_exp = repo / ".dvc" / "tmp" / "exps" / "tmpabc"
    temp_exp.mkdir(parents=True)
    (temp_exp / ".git").mkdir()
    db = f"sqlite:///{repo / 'mlflow.db'}"
    assert tracking_uri(environ={}, cwd=repo / "sub" / "deeper") == db
    assert tracking_uri(environ={}, cwd=temp_exp) == db
    assert tracking_uri(environ={"DVC_ROOT": str(repo)}, cwd=tmp_path) == db
    assert tracking_uri(environ={"FUSIONNET_PROJECT": str(repo), "DVC_ROOT": "/elsewhere"}, cwd=tmp_path) == db
    assert tracking_uri(environ={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, cwd=repo) == "http://127.0.0.1:5000"
    with pytest.raises(NoStoreError, match="no project was found"):
        tracking_uri(environ={}, cwd=tmp_path)
    (repo / "mlflow.db").unlink()
    assert tracking_uri(environ={}, cwd=repo) == db  # a pipeline run may create its project's store...
    with pytest.raises(NoStoreError, match=f"{repo / 'mlflow.db'} does not exist"):
        tracking_uri(must_exist=True, environ={}, cwd=repo)  # ... a lookup may not
    assert json.dumps(sorted(p.name for p in repo.iterdir())) == '[".dvc", ".git", "sub"]'
