"""A DVC training stage that runs its step on a CUDA worker: trigger the deployment, watch it, take the outputs back.

params.yaml `orchestration` (read only by the training stages; not a DVC param dependency, since
where a step runs does not change what it produces):

    orchestration:
      dispatch: local          # local: train in this process (default) | deployment: on a worker
      deployment: fusionnet-train/gpu
      timeout_s: 86400         # give up (and cancel the flow run) after this long
      poll_s: 5                # how often the flow run's state is read
      heartbeat_s: 10          # the flow process labels its run alive this often
      stale_s: 60              # RUNNING with no heartbeat for this long: its worker is gone
      max_restarts: 1          # a run whose worker died is rescheduled (AwaitingRetry) this often

`dispatch_step` pushes the shards' DVC version to the default DVC remote (when one is set) and
triggers `train(steps=[step])` with the params' content, the data md5, the init model's sha256 and
the MLflow parent run; it prints the flow run id, every state change and the worker that took it.
A worker that dies (no heartbeat for stale_s) gets its run rescheduled for another worker, whose
retry resumes from the step's state.pt when the project dir is shared. On COMPLETED the step's
outputs are verified in place by sha256 (a shared project dir) or fetched from its MLflow run's
artifacts and verified (pipeline.training.handoff). Any other end fails the stage with the flow run's
state and message, and removes what would look like a finished step.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fusionnet.io.hashing import file_sha256
from fusionnet.io.params import load_params
import pipeline  # noqa: F401  (offline switches before prefect is imported)
from pipeline.training import datasync, handoff
from pipeline.tracking.runs import TAG_STEP, get_client, parent_run

MODES = ("local", "deployment")


class DispatchError(RuntimeError):
    """The dispatched flow run did not end COMPLETED with verified outputs."""


@dataclass(frozen=True)
class DispatchSettings:
    dispatch: str = "local"
    deployment: str = "fusionnet-train/gpu"
    timeout_s: float = 86400.0
    poll_s: float = 5.0
    heartbeat_s: float = 10.0
    stale_s: float = 60.0
    max_restarts: int = 1

    @classmethod
    def from_params(cls, params: dict[str, Any], source: str = "params.yaml") -> DispatchSettings:
        """The `orchestration` section (all keys optional); a clear ValueError for unknown keys or bad values."""
        section = params.get("orchestration") or {}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: orchestration must be a mapping, got {type(section).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown orchestration keys {unknown} (known: {sorted(known)})")
        settings = cls(**section)
        if settings.dispatch not in MODES:
            raise ValueError(f"{source}: orchestration.dispatch {settings.dispatch!r}: expected one of {list(MODES)}")
        if "/" not in settings.deployment:
            raise ValueError(f"{source}: orchestration.deployment {settings.deployment!r}: expected '<flow>/<deployment>'")
        for name in ("timeout_s", "poll_s", "heartbeat_s", "stale_s"):
            if not float(getattr(settings, name)) > 0:
                raise ValueError(f"{source}: orchestration.{name} must be > 0")
        if settings.stale_s <= settings.heartbeat_s:
            raise ValueError(f"{source}: orchestration.stale_s must exceed heartbeat_s")
        return settings


def _say(text: str) -> None:
    print(f"[dispatch] {text}", flush=True)


def _clear_outputs(out_dir: Path) -> None:
    """Remove what would pass for a finished step (keeps state.pt: a later attempt may resume it)."""
    for name in ("model.safetensors", "result.json", "history.json"):
        (Path(out_dir) / name).unlink(missing_ok=True)


def _worker(flow_run: Any) -> str:
    return (flow_run.labels or {}).get("prefect.worker.name") or "(no worker yet)"


def _alive_age(flow_run: Any, now: float) -> float:
    """Seconds since the flow process last showed it lives: its latest heartbeat label or, if later,
    the moment the run entered its current state (a rescheduled run still carries the dead attempt's
    last beat until its new flow process beats)."""
    beat = (flow_run.labels or {}).get(handoff.ALIVE_LABEL)
    since = flow_run.state.timestamp.timestamp() if flow_run.state.timestamp else now
    if beat is not None:
        since = max(since, float(beat))
    return now - since


def watch(flow_run_id: Any, settings: DispatchSettings, client: Any) -> Any:
    """Poll the flow run to a final state; print its changes; reschedule it when its worker died."""
    from prefect.states import AwaitingRetry, Cancelling

    deadline = time.monotonic() + settings.timeout_s
    seen, restarts = None, 0
    try:
        while True:
            run = client.read_flow_run(flow_run_id)
            now_state = (run.state.name, _worker(run))
            if now_state != seen:
                _say(f"flow run {run.name} ({run.id}): {run.state.name} on worker {now_state[1]}"
                     + (f": {run.state.message}" if run.state.message else ""))
                seen = now_state
            if run.state.is_final():
                return run
            silent_s = _alive_age(run, time.time()) if run.state.is_running() else 0.0
            if silent_s > settings.stale_s:
                if restarts >= settings.max_restarts:  # the seconds say whether stale_s was just tight or the worker gone
                    raise DispatchError(f"flow run {run.id}: worker {_worker(run)} silent for over {settings.stale_s:.0f} s "
                                        f"(no heartbeat for {silent_s:.0f} s) and {restarts} restart(s) used "
                                        "(orchestration.max_restarts)")
                restarts += 1
                _say(f"worker {_worker(run)} silent for over {settings.stale_s:.0f} s: rescheduling the run for "
                     f"another worker (restart {restarts}/{settings.max_restarts})")
                client.set_flow_run_state(run.id, AwaitingRetry(message="fusionnet: worker lost"), force=True)
            if time.monotonic() > deadline:
                raise DispatchError(f"flow run {run.id}: not finished after orchestration.timeout_s={settings.timeout_s:.0f} s")
            time.sleep(settings.poll_s)
    except BaseException:
        try:  # a stage that gives up (timeout, Ctrl-C) must not leave the training running
            run = client.read_flow_run(flow_run_id)
            if not run.state.is_final():
                client.set_flow_run_state(flow_run_id, Cancelling(message="fusionnet: the dispatching stage stopped"),
                                          force=True)
                _say(f"flow run {flow_run_id}: cancelled")
        except Exception:
            pass
        raise


def _step_run(mlflow_client: Any, flow_run_id: str, step: str) -> str:
    """The FINISHED MLflow child run the flow run's `step` logged (the last one, after a restart)."""
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    query = f"tags.`{handoff.TAG_FLOW_RUN}` = '{flow_run_id}' and tags.`{TAG_STEP}` = '{step}' and attributes.status = 'FINISHED'"
    runs = mlflow_client.search_runs(experiments, query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise DispatchError(f"flow run {flow_run_id} completed but no FINISHED MLflow run of step {step!r} is tagged with it")
    return runs[0].info.run_id


def take_outputs(mlflow_client: Any, run_id: str, out_dir: Path) -> str:
    """Outputs of MLflow run `run_id` into out_dir: verified in place, else downloaded and verified."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{handoff.ARTIFACT_DIR}/{handoff.MANIFEST}",
                                                    dst_path=tmp, tracking_uri=mlflow_client.tracking_uri)
        manifest = json.loads(Path(local).read_text())
    if out_dir.is_dir() and not handoff.mismatches(out_dir, manifest):
        return f"in place (shared project dir), {len(manifest)} files verified by sha256"
    handoff.download_outputs(mlflow_client, run_id, out_dir)
    return f"fetched from MLflow run {run_id}, {len(manifest)} files verified by sha256"


def dispatch_step(
    step: str,
    params_path: Path,
    shards_dir: Path,
    out_dir: Path,
    init_checkpoint: Path | None,
    settings: DispatchSettings,
) -> Path:
    """Run `step` through the deployment and wait; returns out_dir/model.safetensors (see module doc)."""
    from prefect.client.orchestration import get_client as prefect_client
    from prefect.deployments import run_deployment

    out_dir, shards_dir = Path(out_dir).resolve(), Path(shards_dir).resolve()
    if not os.environ.get("PREFECT_API_URL"):
        raise DispatchError("orchestration.dispatch is 'deployment' but PREFECT_API_URL is not set: "
                            "point it at the Prefect server the workers poll")
    if out_dir.name != step:
        raise ValueError(f"--out {out_dir}: a dispatched step writes <models dir>/{step}; name the directory {step!r}")
    root = datasync.dvc_root_of(shards_dir)
    params = load_params(params_path)
    md5 = datasync.local_md5(shards_dir, root)
    if md5 is None:
        raise FileNotFoundError(f"{shards_dir}: training data not found")
    if datasync.default_remote(root):
        sent = datasync.push_version(shards_dir, md5, root)
        _say(f"data {shards_dir.relative_to(root)} version {md5}: {sent} objects pushed to the DVC remote")
    else:
        _say(f"data {shards_dir.relative_to(root)} version {md5}: no DVC remote, a worker must already have it")
    parameters = {
        "params": params, "steps": [step], "data_md5": md5,
        "shards_dir": os.path.relpath(shards_dir, root), "models_dir": os.path.relpath(out_dir.parent, root),
        "init_sha256": file_sha256(init_checkpoint) if init_checkpoint else None,
        "hand_back": True, "heartbeat_s": settings.heartbeat_s,
        "downstream": False,  # DVC runs evaluate and register as its own stages
    }
    mlflow_client = get_client()
    with parent_run(params, shards_dir) as parent_id:
        parameters["parent_run_id"] = parent_id
        flow_run = run_deployment(settings.deployment, parameters=parameters, timeout=0, as_subflow=False)
        _say(f"triggered {settings.deployment}: flow run {flow_run.name} ({flow_run.id}), step {step}")
        with prefect_client(sync_client=True) as client:
            try:
                final = watch(flow_run.id, settings, client)
            except BaseException:
                _clear_outputs(out_dir)
                raise
        if not final.state.is_completed():
            _clear_outputs(out_dir)
            raise DispatchError(f"flow run {final.name} ({final.id}) ended {final.state.name}: {final.state.message or ''}")
        how = take_outputs(mlflow_client, _step_run(mlflow_client, str(final.id), step), out_dir)
        _say(f"step {step} outputs {how}")
    return out_dir / "model.safetensors"
