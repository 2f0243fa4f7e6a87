"""A real `prefect server start` on 127.0.0.1 and process workers for the tests that need them.

Prefect's server and workers ignore SIGTERM (conftest's `processes` would wait 20 s for each
before its SIGKILL): they are stopped with SIGINT, then their whole process tree is killed.
Import the fixture by name: `from tests.support.prefect_servers import prefect_api` (one server per module).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.support.helpers import free_port, poll, wait_http

BIN = Path(sys.executable).parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def base_env(tmp_path: Path) -> dict[str, str]:
    """The caller's env minus anything pointing Prefect/MLflow elsewhere; stores under tmp_path. Keeps a
    temporary Prefect server's start-up limit (180 s unless set: Prefect's 20 s fails on a loaded host)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "FUSIONNET_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=os.environ.get(
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    return env


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 for this module's tests; yields (api url, base env)."""
    home = tmp_path_factory.mktemp("prefect-server")
    env = base_env(home)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env.update(PREFECT_API_URL=api, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", OMP_NUM_THREADS="1")
    log = open(home / "server.log", "w")
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                               "--no-ui"], env=env, cwd=home, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"{api}/health", timeout=120, proc=server)
        yield api, env
    finally:
        stop(server)
        log.close()


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """SIGINT (Prefect workers and servers ignore SIGTERM), then kill the process tree."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    kill_tree(proc.pid)


def kill_tree(pid: int) -> None:
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def deploy(env: dict, project_dir: Path, name: str, *more: str) -> None:
    """`python -m pipeline.deploy` of the project's own pipeline/ as fusionnet-train/<name> on pool <name>."""
    subprocess.run([sys.executable, "-m", "pipeline.deploy", "--pool", name, "--name", name,
                    "--project-dir", str(project_dir), *more], env=env, cwd=project_dir, check=True, timeout=120,
                   capture_output=True)


def start_worker(env: dict, project_dir: Path, pool: str, name: str, log_path: Path, *more: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name, *more],
                            env=env, cwd=project_dir, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def flow_run(api: str, flow_run_id: str) -> dict:
    import httpx

    return httpx.get(f"{api}/flow_runs/{flow_run_id}").json()


def flow_runs(api: str, deployment: str) -> list[dict]:
    import httpx

    flow, name = deployment.split("/")
    deployment_id = httpx.get(f"{api}/deployments/name/{flow}/{name}").json()["id"]
    body = {"deployments": {"id": {"any_": [deployment_id]}}}
    return httpx.post(f"{api}/flow_runs/filter", json=body).json()


def wait_final(api: str, deployment: str, count: int, timeout: float) -> list[dict]:
    """The deployment's `count` flow runs once all are final (one filter request per poll, with back-off)."""
    def done() -> list[dict] | None:
        runs = flow_runs(api, deployment)
        return runs if len(runs) == count and all(r["state"]["type"] in FINAL for r in runs) else None

    return poll(done, timeout, f"{deployment}: {count} final flow runs", first=0.5, longest=3.0)


def task_runs(api: str, flow_run_id: str) -> list[dict]:
    import httpx

    query = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    return httpx.post(f"{api}/task_runs/filter", json=query).json()

