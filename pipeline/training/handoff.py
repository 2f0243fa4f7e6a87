"""What a dispatched step hands back and what it needs handed in, through MLflow (worker side and driver side).

A step trained on a worker that does not share the DVC checkout's filesystem returns its outputs
as artifacts of its MLflow child run: every file of models/<step>/ except the resume state
(`state.pt`, meaningful only where the step ran) under `outputs/`, with `outputs/manifest.json`
mapping each relative path to its sha256. The run is tagged `fusionnet.model_sha256`, so the next
step's worker finds its init model by content (`find_model_run`), whichever machine trained it.

`Heartbeat` keeps a flow run's label `fusionnet.alive` (unix seconds) fresh while the flow
process lives; the dispatching stage reads it to tell a dead worker from a slow step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fusionnet.io.hashing import file_sha256

ARTIFACT_DIR = "outputs"
MANIFEST = "manifest.json"
NOT_HANDED_BACK = ("state.pt",)  # the resume state: large, and only useful where the step runs
TAG_MODEL_SHA = "fusionnet.model_sha256"
TAG_FLOW_RUN = "fusionnet.prefect_flow_run_id"
ALIVE_LABEL = "fusionnet.alive"


class HandoffError(RuntimeError):
    """An output or input of a dispatched step is missing or does not match its recorded sha256."""


def manifest_of(out_dir: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file of a step's out_dir that is handed back."""
    out_dir = Path(out_dir)
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name not in NOT_HANDED_BACK)
    return {p.relative_to(out_dir).as_posix(): file_sha256(p) for p in files}


def mismatches(out_dir: Path, manifest: dict[str, str]) -> list[str]:
    """Files of `manifest` that are missing under out_dir or differ from their sha256."""
    bad = []
    for rel, digest in manifest.items():
        path = Path(out_dir) / rel
        if not path.is_file() or file_sha256(path) != digest:
            bad.append(rel)
    return bad


def upload_outputs(client: Any, run_id: str, out_dir: Path) -> dict[str, str]:
    """Log out_dir's files (not state.pt) and their manifest as `outputs/` of MLflow run `run_id`."""
    out_dir = Path(out_dir)
    manifest = manifest_of(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / ARTIFACT_DIR
        for rel in manifest:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(out_dir / rel, staged / rel)
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        client.log_artifacts(run_id, str(staged), ARTIFACT_DIR)
    if "model.safetensors" in manifest:
        client.set_tag(run_id, TAG_MODEL_SHA, manifest["model.safetensors"])
    return manifest


def download_outputs(client: Any, run_id: str, out_dir: Path) -> dict[str, str]:
    """Fetch run `run_id`'s `outputs/` into out_dir, each file checked against the manifest first.

    The files land in a sibling temp dir and are moved into out_dir only once all match, so a
    failed transfer leaves no output that looks complete.
    """
    import mlflow

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-fetch-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACT_DIR,
                                                         dst_path=tmp, tracking_uri=client.tracking_uri))
        manifest_path = local / MANIFEST
        if not manifest_path.is_file():
            raise HandoffError(f"MLflow run {run_id}: no {ARTIFACT_DIR}/{MANIFEST}; the step handed back no outputs")
        manifest = json.loads(manifest_path.read_text())
        manifest_path.unlink()
        bad = mismatches(local, manifest)
        if bad:
            raise HandoffError(f"MLflow run {run_id}: {', '.join(bad)} missing or not matching their sha256")
        for rel in manifest:
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local / rel, target)
    return manifest


def find_model_run(client: Any, sha256: str) -> str | None:
    """Id of an MLflow run (any experiment) whose handed-back model.safetensors has this sha256."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{TAG_MODEL_SHA}` = '{sha256}'", max_results=1)
    return runs[0].info.run_id if runs else None


def ensure_init_model(path: Path, sha256: str, client: Any, log=print) -> str:
    """Make `path` the model with this sha256: as it is, or from the MLflow run that handed it back."""
    path = Path(path)
    if path.is_file() and file_sha256(path) == sha256:
        log(f"[init] {path}: sha256 {sha256[:12]} present")
        return "present"
    run_id = find_model_run(client, sha256)
    if run_id is None:
        raise HandoffError(f"{path}: init model sha256 {sha256} is neither on this worker nor handed back to "
                           f"MLflow {client.tracking_uri} by an earlier step")
    import mlflow

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{ARTIFACT_DIR}/model.safetensors",
                                                         dst_path=tmp, tracking_uri=client.tracking_uri))
        if file_sha256(local) != sha256:
            raise HandoffError(f"MLflow run {run_id}: model.safetensors does not match sha256 {sha256}")
        os.replace(local, path)
    log(f"[init] {path}: sha256 {sha256[:12]} fetched from MLflow run {run_id}")
    return "fetched"


class Heartbeat:
    """Context manager: label the current flow run `fusionnet.alive=<unix s>` every `every_s` seconds."""

    def __init__(self, flow_run_id: str | None, every_s: float | None):
        self.flow_run_id, self.every_s = flow_run_id, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.update_flow_run_labels(self.flow_run_id, {ALIVE_LABEL: f"{time.time():.1f}"})
                except Exception:  # a server hiccup must not kill the training; the next beat retries
                    pass
                if self._stop.wait(self.every_s):
                    return

    def __enter__(self) -> Heartbeat:
        if self.flow_run_id and self.every_s:
            self._thread = threading.Thread(target=self._beat, name="fusionnet-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
