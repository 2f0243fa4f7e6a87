"""MLflow tracking: one parent run per pipeline run, one child run per training step.

Store: MLFLOW_TRACKING_URI when set (a tracking server), else the project's SQLite file
`sqlite:///<project>/mlflow.db` with artifacts in `<project>/mlartifacts`. SQLite locks under
several writing processes: keep one writer (DVC runs stages one at a time; only rank 0 logs) or
use a server.

Runs are driven through `MlflowClient` with explicit run ids, never the fluent
`mlflow.start_run`: with MLFLOW_RUN_ID set, `start_run(parent_run_id=...)` resumes that run
instead of nesting. The parent run id travels between processes in FUSIONNET_PARENT_RUN_ID.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  (applies the offline switches before mlflow is imported)
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from pipeline.env import PROJECT_DIR
from pipeline.provenance import data_version_tags, flatten_params, git_commit, pipeline_run_key, project_root

PARENT_RUN_ENV = "FUSIONNET_PARENT_RUN_ID"
EXPERIMENT_ENV = "FUSIONNET_MLFLOW_EXPERIMENT"
DEFAULT_EXPERIMENT = "fusionnet"
TAG_KIND = "fusionnet.kind"  # "pipeline" (parent) | "step" (child)
TAG_PIPELINE_RUN = "fusionnet.pipeline_run"
TAG_STEP = "fusionnet.step"
_BATCH = 100  # MLflow's limit of params/tags per log_batch call


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's SQLite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"


def get_client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(client: MlflowClient, name: str | None = None) -> str:
    """Id of the experiment (FUSIONNET_MLFLOW_EXPERIMENT or "fusionnet"), created if missing.

    On a SQLite store its artifacts go to `mlartifacts/` beside the database file (MLflow's own
    default is ./mlruns relative to whatever the working directory is); a server decides itself.
    """
    name = name or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):  # next to the database file: ./mlartifacts
        db_file = Path(client.tracking_uri.removeprefix("sqlite:///"))
        location = (db_file.resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another process created it between our lookup and create
        return client.get_experiment_by_name(name).experiment_id


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log the params not yet on the run; logged keys keep their value (MLflow refuses to change one,
    and a retried step logs the same values again)."""
    have = client.get_run(run_id).data.params
    todo = [Param(k, v[:6000]) for k, v in params.items() if k not in have]
    for start in range(0, len(todo), _BATCH):
        client.log_batch(run_id, params=todo[start : start + _BATCH], synchronous=True)


def _set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    items = [RunTag(k, str(v)[:8000]) for k, v in tags.items()]
    for start in range(0, len(items), _BATCH):
        client.log_batch(run_id, tags=items[start : start + _BATCH], synchronous=True)


def provenance_tags(shards_dir: Path | None) -> dict[str, str]:
    """Git commit (MLflow's own tag, so the UI shows it) and the data version of the shards."""
    root = project_root()
    commit, dirty = git_commit(root)
    tags: dict[str, str] = {}
    if commit is not None:
        tags[MLFLOW_GIT_COMMIT] = commit
        tags["fusionnet.git_dirty"] = str(dirty).lower()
    if shards_dir is not None:
        tags.update(data_version_tags(Path(shards_dir), root))
    return tags


def _find_parent(client: MlflowClient, exp_id: str, key: str) -> str | None:
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{TAG_PIPELINE_RUN}` = '{key}' and tags.`{TAG_KIND}` = 'pipeline'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def resolve_parent_run(
    client: MlflowClient, params: Mapping[str, Any], shards_dir: Path | None, explicit: str | None = None
) -> str:
    """The parent run of the current pipeline run, created if needed (see pipeline.provenance).

    `explicit` (a dispatching stage's parent), then FUSIONNET_PARENT_RUN_ID win; else the run
    tagged with this pipeline run's key; else a new one.
    """
    explicit = explicit or os.environ.get(PARENT_RUN_ENV)
    if explicit:
        client.get_run(explicit)  # a clear MlflowException if the id is wrong
        return explicit
    exp_id = experiment_id(client)
    key = pipeline_run_key()
    if key is not None:
        key = re.sub(r"[^A-Za-z0-9_.:-]", "-", key)  # safe inside the quoted search filter
    if key is not None and (found := _find_parent(client, exp_id, key)) is not None:
        return found
    tags = {TAG_KIND: "pipeline", **provenance_tags(shards_dir)}
    if key is not None:
        tags[TAG_PIPELINE_RUN] = key
    run = client.create_run(exp_id, run_name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    _log_params(client, run.info.run_id, flatten_params(params))
    return run.info.run_id


def failed_status(exc: BaseException) -> str:
    """MLflow's status for a run ended by `exc`: KILLED for Ctrl-C, else FAILED."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


@contextmanager
def parent_run(
    params: Mapping[str, Any], shards_dir: Path | None = None, run_id: str | None = None
) -> Iterator[str]:
    """Enter the pipeline's parent run; yields its id, exported as FUSIONNET_PARENT_RUN_ID meanwhile.

    The run is RUNNING inside the block and FINISHED (FAILED on an exception) after it; a later
    stage of the same pipeline run re-enters it, so its final status is its last stage's.
    """
    client = get_client()
    run_id = resolve_parent_run(client, params, shards_dir, explicit=run_id)
    client.update_run(run_id, status="RUNNING")
    previous = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run_id  # step subprocesses and the evaluation hook inherit it
    try:
        yield run_id
    except BaseException as exc:
        client.set_terminated(run_id, status=failed_status(exc))
        raise
    else:
        client.set_terminated(run_id, status="FINISHED")
    finally:
        if previous is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = previous


def start_step_run(
    client: MlflowClient, parent_run_id: str, step: str, params: Mapping[str, Any], shards_dir: Path | None
) -> str:
    """A child run of `parent_run_id` for one step (a training step, the evaluation, ...), with the
    whole params.yaml flattened as its params."""
    parent = client.get_run(parent_run_id)
    tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, TAG_KIND: "step", TAG_STEP: step, **provenance_tags(shards_dir)}
    if TAG_PIPELINE_RUN in parent.data.tags:
        tags[TAG_PIPELINE_RUN] = parent.data.tags[TAG_PIPELINE_RUN]
    run = client.create_run(parent.info.experiment_id, run_name=step, tags=tags)
    _log_params(client, run.info.run_id, flatten_params(params))
    return run.info.run_id


class MlflowTrainLogger:
    """fusionnet.train.TrainLogger writing to one MLflow run (rank 0 of a training step).

    Metrics are buffered and sent in batches (once the oldest is `flush_seconds` old or `max_buffer`
    values wait, before every image, and on `flush`), so a per-iteration log costs no round trip
    (~25 ms each to SQLite). A hard crash loses at most the last `flush_seconds` of points.
    """

    def __init__(
        self, run_id: str, client: MlflowClient | None = None, flush_seconds: float = 2.0, max_buffer: int = 500
    ) -> None:
        self.run_id = run_id
        self.client = client or get_client()
        self.flush_seconds = flush_seconds
        self.max_buffer = max_buffer
        self._buffer: list[Metric] = []
        self._oldest_at = 0.0  # monotonic time the oldest buffered value arrived

    def log_params(self, params: dict) -> None:
        """Log (nested) params under their flattened names; keys already logged keep their value."""
        _log_params(self.client, self.run_id, flatten_params(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record each value at `step` (the training iteration, or the epoch for per-epoch scores)."""
        now_ms = int(time.time() * 1000)
        if not self._buffer:
            self._oldest_at = time.monotonic()
        self._buffer.extend(Metric(key, float(value), now_ms, int(step)) for key, value in metrics.items())
        if len(self._buffer) >= self.max_buffer or time.monotonic() - self._oldest_at >= self.flush_seconds:
            self.flush()

    def log_image(self, png_path: Path, artifact_name: str) -> None:
        """Upload `png_path` as artifact `artifact_name` (e.g. "plots/epoch_003.png")."""
        self.flush()
        png_path = Path(png_path)
        target = Path(artifact_name)
        folder = target.parent.as_posix() if target.parent != Path(".") else None
        if png_path.name == target.name:
            self.client.log_artifact(self.run_id, str(png_path), artifact_path=folder)
            return
        with tempfile.TemporaryDirectory() as tmp:  # MLflow names an artifact after its file
            renamed = Path(tmp) / target.name
            shutil.copyfile(png_path, renamed)
            self.client.log_artifact(self.run_id, str(renamed), artifact_path=folder)

    def flush(self) -> None:
        """Send the buffered metrics."""
        while self._buffer:
            chunk, self._buffer = self._buffer[:1000], self._buffer[1000:]
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        _set_tags(self.client, self.run_id, tags)
