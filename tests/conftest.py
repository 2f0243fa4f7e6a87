"""Fixtures shared by the tests; plain helper functions are in tests/support/helpers.py.

Session-scoped objects (`tiny_model`, `tiny_checkpoint`) are shared by every test: never train or
modify them in place (copy.deepcopy first).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.support.helpers import SHARED_DATA, isolate_mlflow, require_shared_data, stop_process, tiny_net


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run only where torch sees a CUDA GPU; elsewhere (CI) they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """torch runs on one thread for the rest of the module (module-scoped fixtures included), restored after:
    several test processes share 2 cores, and oversubscribed OpenMP makes a tiny forward ~10x slower.
    Whole file: pytestmark = pytest.mark.usefixtures("one_thread")."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model():
    """LateFusionNet(backbone="densenet121", pretrained=False), paper widths, torch seed 0, eval mode. Shared: do not modify."""
    return tiny_net(seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_model, tmp_path_factory) -> Path:
    """`tiny_model` saved with fusionnet.model.save (a .safetensors path)."""
    from fusionnet.model import save

    return save(tiny_model, tmp_path_factory.mktemp("tiny-model") / "tiny.safetensors")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store in tmp, selected through MLFLOW_TRACKING_URI, with no run, parent run,
    pipeline run or DVC stage inherited from the environment. Gives an MlflowClient on it."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    isolate_mlflow(monkeypatch, uri)
    return MlflowClient(uri)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real photos with ground-truth alpha); the test is skipped when it is absent."""
    return require_shared_data(SHARED_DATA)


@pytest.fixture
def processes():
    """`start(args, **popen_kwargs) -> Popen`: each process started is stopped on teardown (SIGTERM to its
    session, then SIGKILL), pass or fail. Processes get their own session (start_new_session=True)."""
    started: list[subprocess.Popen] = []

    def start(args, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        stop_process(proc, timeout=20, group=True)


@pytest.fixture
def serve():
    """`serve(model, *args, log=PATH) -> Server`: `fusionnet serve` on a free port (tests.support.server.Server),
    ready, and stopped (SIGTERM, then SIGKILL) on teardown."""
    from tests.support.server import Server

    started = []

    def start(model, *args: str, log: Path, timeout: float = 240.0):
        server = Server(model, *args, log=log)
        started.append(server)
        return server.wait_ready(timeout)

    yield start
    for server in started:
        server.stop()
