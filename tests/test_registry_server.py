"""The registry through a real `mlflow server` (SQLite backend, artifacts proxied to a local folder), as a
shared tracking server is used: the register step, `fusionnet pull` by alias and by version number, the
resolver following a moved alias, and the pulled pyfunc run by an interpreter that cannot import the
checkout (the model's own code_paths copy of fusionnet is all it has).

One server and two registered versions (distinct weights) per module; tests/test_registry.py covers the
same paths on a SQLite store and the champion rule in detail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.helpers import ROOT, free_port, isolate_mlflow, one_thread_env, stop_process, wait_http
from tests.test_registry import MODEL, image_file, model_file, only_match, raw_alpha, register, sha256

pytestmark = pytest.mark.slow  # a server start, and each test a second or more through HTTP

SADS = {"1": 1.0, "2": 0.5}  # v2 beats v1: @champion ends on v2
CHAMPION = "2"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on a free port with MODEL v1, v2 registered through it (the register step).

    Gives uri, root, artifacts (the server's artifact folder), weights (version -> model file), decisions.
    """
    root = tmp_path_factory.mktemp("registry-server")
    port, artifacts = free_port(), root / "server-artifacts"
    uri = f"http://127.0.0.1:{port}"
    log = open(root / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(artifacts)],
        cwd=root, env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"{uri}/health", timeout=180, proc=proc)
        client_dir = root / "client"
        client_dir.mkdir()
        with pytest.MonkeyPatch.context() as mp:
            isolate_mlflow(mp, uri, experiment="fusionnet-server-test", model_cache=root / "cache")
            mp.chdir(client_dir)  # whatever the client would write locally shows up here
            weights = {v: model_file(root / "models" / f"v{v}" / "model.safetensors", seed=10 + int(v)) for v in SADS}
            decisions = {v: register(root, weights[v], sad=sad, tag=f"v{v}") for v, sad in SADS.items()}
            yield {"uri": uri, "root": root, "artifacts": artifacts, "client_dir": client_dir, "weights": weights,
                   "decisions": decisions}
    finally:
        stop_process(proc, timeout=3, group=True)  # it lingers on SIGTERM (open connections): killed after 3 s
        log.close()


@pytest.fixture(scope="module")
def pulled(server, tmp_path_factory):
    """`fusionnet pull --out DIR` (the console command, default URI @champion) from the server: DIR."""
    folder = tmp_path_factory.mktemp("pulled") / "champion"
    done = subprocess.run([str(Path(sys.executable).with_name("fusionnet")), "pull", "--out", str(folder)],
                          env=one_thread_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_the_register_step_stores_the_model_on_the_server(server):
    from mlflow import MlflowClient

    decisions, weights = server["decisions"], server["weights"]
    assert [(d["version"], d["alias"]) for d in decisions.values()] == [("1", "champion"), ("2", "champion")]
    assert decisions["2"]["champion_value"] == SADS["1"] and decisions["2"]["compared"] is True
    client = MlflowClient(server["uri"])
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == CHAMPION
    # the files went through the server into its artifact folder, none to the client's working directory
    for decision in decisions.values():
        assert client.get_logged_model(decision["model_id"]).artifact_location.startswith("mlflow-artifacts:/")
    stored = {sha256(p) for p in server["artifacts"].rglob("*.safetensors")}
    assert stored == {sha256(weights[v]) for v in SADS}
    assert not any(server["client_dir"].iterdir())


def test_pull_by_alias_version_number_and_run(server, pulled, tmp_path):
    from fusionnet.cli.main import main as fusionnet
    from pipeline.registry.models import weights_file

    info = json.loads((pulled / "fusionnet-model.json").read_text())
    assert info == {"uri": f"models:/{MODEL}@champion", "name": MODEL, "version": CHAMPION, "alias": "champion"}
    assert sha256(weights_file(pulled)) == sha256(server["weights"][CHAMPION])
    assert (pulled / "code" / "fusionnet" / "inference" / "matter.py").is_file()
    # version 1 by number (in-process: the same entry point as the console command)
    assert fusionnet(["pull", f"models:/{MODEL}/1", "--out", str(tmp_path / "v1")]) == 0
    assert sha256(weights_file(tmp_path / "v1")) == sha256(server["weights"]["1"])
    assert json.loads((tmp_path / "v1" / "fusionnet-model.json").read_text())["version"] == "1"
    # and the model v1's register run logged, by run
    run_uri = f"runs:/{server['decisions']['1']['run_id']}/{MODEL}"
    assert fusionnet(["pull", run_uri, "--out", str(tmp_path / "run")]) == 0
    assert sha256(weights_file(tmp_path / "run")) == sha256(server["weights"]["1"])


def test_the_resolver_follows_a_moved_alias_on_the_server(server):
    from mlflow import MlflowClient

    from fusionnet.inference.loading import resolve_model_path

    client, weights, alias_uri = MlflowClient(server["uri"]), server["weights"], f"models:/{MODEL}@champion"
    assert sha256(resolve_model_path(alias_uri)) == sha256(weights[CHAMPION])
    client.set_registered_model_alias(MODEL, "champion", "1")
    try:
        assert sha256(resolve_model_path(alias_uri)) == sha256(weights["1"])
    finally:
        client.set_registered_model_alias(MODEL, "champion", CHAMPION)
    assert sha256(resolve_model_path(alias_uri)) == sha256(weights[CHAMPION])


# ----------------------------------------------------------------------------- the pulled model on its own

ISOLATED_CHECK = """\
import importlib.util, json, sys
from pathlib import Path

model_dir, image, out = sys.argv[1:4]
importable = {name: importlib.util.find_spec(name) is not None for name in ("fusionnet", "pipeline")}
import mlflow
import pandas as pd

model = mlflow.pyfunc.load_model(model_dir)
prediction = model.predict(pd.DataFrame({"image": [Path(image).read_bytes()]}))
Path(out).write_bytes(prediction.loc[0, "alpha"])
import fusionnet.inference.matter

print(json.dumps({"importable_before_load": importable, "fusionnet": fusionnet.__file__,
                  "infer": fusionnet.inference.matter.__file__, "pipeline_imported": "pipeline" in sys.modules,
                  "sys_path": sys.path}))
"""


def python_without_the_checkout(folder: Path) -> Path:
    """The python of a new virtualenv that sees .venv's installed packages but not the checkout.

    .venv's site-packages is a plain line of a .pth file, so its own .pth files (among them the
    editable install's finder that maps `fusionnet` and `pipeline` to the checkout) never run.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (folder / "lib" / version / "site-packages" / "venv-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder / "bin" / "python"


def test_the_pulled_pyfunc_runs_without_the_checkout(server, pulled, tmp_path):
    """mlflow.pyfunc.load_model(pulled folder).predict(...) in an interpreter where neither fusionnet
    nor pipeline is importable, outside the checkout: fusionnet comes from the model's code/ folder."""
    python = python_without_the_checkout(tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "check.py").write_text(ISOLATED_CHECK)
    source = image_file(elsewhere / "photo.png", seed=3)
    env = {k: v for k, v in one_thread_env().items() if not k.startswith(("PYTHON", "MLFLOW_TRACKING", "VIRTUAL_ENV"))}
    # -I: no PYTHON* variables, no user site, not the script's folder first on sys.path
    done = subprocess.run([str(python), "-I", "check.py", str(pulled), str(source), "alpha.png"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["importable_before_load"] == {"fusionnet": False, "pipeline": False}
    code = (pulled / "code").resolve()
    for module in ("fusionnet", "infer"):
        assert Path(report[module]).resolve().is_relative_to(code), report[module]
    assert not report["pipeline_imported"]
    # no other folder on its path holds a fusionnet package (the checkout's is not reachable at all)
    assert [p for p in report["sys_path"] if (Path(p or ".") / "fusionnet" / "__init__.py").is_file()] == [str(code)]
    assert os.fspath(ROOT) not in report["sys_path"]
    # the champion's alpha at its registered settings (refined, 64 px), not v1's
    alpha = np.asarray(Image.open(elsewhere / "alpha.png").convert("L"), np.float32) / 255
    settings = server["decisions"][CHAMPION]["settings"]
    image = np.asarray(Image.open(source).convert("RGB"))
    references = {v: raw_alpha(w, image, refine=True, radius=settings["radius"], eps=settings["eps"])
                  for v, w in server["weights"].items()}
    assert only_match(alpha, references) == CHAMPION
