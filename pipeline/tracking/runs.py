"""MLflow tracking: one parent run per pipeline run, one child run per training step.

Store: MLFLOW_TRACKING_URI when set (a tracking server), else the SQLite file
`sqlite:///<project>/mlflow.db` of the project being run (pipeline.tracking.store: FUSIONNET_PROJECT,
DVC_ROOT, else the project holding the current folder; never the checkout the package is installed
from), with artifacts in `<project>/mlartifacts`. SQLite locks under
several writing processes: keep one writer (DVC runs stages one at a time; only rank 0 logs) or
use a server.

Runs are driven through `MlflowClient` with explicit run ids, never the fluent
`mlflow.start_run`: with MLFLOW_RUN_ID set, `start_run(parent_run_id=...)` resumes that run
instead of nesting. The parent run id travels between processes in FUSIONNET_PARENT_RUN_ID.

What the MLflow UI shows (the section below): the experiment is a model-training experiment,
the parent run is named after the profile and its data (`synthetic-128fg`), and every run that
reads the shards has them as its dataset input (DVC md5 as digest) and a Source.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  (applies the offline switches before mlflow is imported)
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import (
    MLFLOW_GIT_COMMIT,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_USER,
)

from pipeline.tracking import store
from pipeline.tracking.provenance import data_version_tags, flatten_params, git_commit, pipeline_run_key, project_root

PARENT_RUN_ENV = "FUSIONNET_PARENT_RUN_ID"
EXPERIMENT_ENV = "FUSIONNET_MLFLOW_EXPERIMENT"
DEFAULT_EXPERIMENT = "fusionnet"
TAG_KIND = "fusionnet.kind"  # "pipeline" (parent) | "step" (child)
TAG_PIPELINE_RUN = "fusionnet.pipeline_run"
TAG_STEP = "fusionnet.step"
TAG_TRAINED_MODEL_SHA = "fusionnet.trained_model_sha256"  # on a step run: sha256 of the model file it trained
_BATCH = 100  # MLflow's limit of params/tags per log_batch call
# The experiment tag the MLflow UI reads for an experiment's kind; "custom_model_development" is its
# "Machine learning" kind (training runs), "genai_development" its GenAI one (traces, tokens).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# MLflow 3.17's UI opens experiments on the GenAI overview unless the page's workflow switch says
# otherwise (a URL parameter, else the browser's last choice): links to the runs page carry it.
RUNS_PAGE_QUERY = "workflowType=machine_learning"
PROFILES = {"synthetic": "synthetic", "folder": "photos", "dim": "dim"}  # foregrounds.source -> profile


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the SQLite file of the project being run (pipeline.tracking.store)."""
    return store.tracking_uri()


def get_client() -> MlflowClient:
    """The client of this project's store: runs and the model registry both in `tracking_uri()`."""
    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, name: str | None = None) -> str:
    """Id of the experiment (FUSIONNET_MLFLOW_EXPERIMENT or "fusionnet"), created if missing.

    On a SQLite store its artifacts go to `mlartifacts/` beside the database file (MLflow's own
    default is ./mlruns relative to whatever the working directory is); a server decides itself.
    The experiment is tagged a model-training experiment (EXPERIMENT_KIND_TAG), also when it
    exists without the tag; a kind someone set by hand stays.
    """
    name = name or os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if not found.tags.get(EXPERIMENT_KIND_TAG):
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        return found.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:///"):  # next to the database file: ./mlartifacts
        db_file = Path(client.tracking_uri.removeprefix("sqlite:///"))
        location = (db_file.resolve().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
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
    """Source (entry point, user) and git commit (MLflow's own tags, so the UI shows them) and the
    data version of the shards."""
    root = project_root()
    commit, dirty = git_commit(root)
    tags: dict[str, str] = source_tags(root)
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
    """The parent run of the current pipeline run, created if needed (see pipeline.tracking.provenance).

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
    run = client.create_run(exp_id, run_name=parent_run_name(params, shards_dir), tags=tags)
    _log_params(client, run.info.run_id, flatten_params(params))
    if shards_dir is not None:
        log_shards_input(client, run.info.run_id, Path(shards_dir), tags)
    return run.info.run_id


def failed_status(exc: BaseException) -> str:
    """MLflow's status for a run ended by `exc`: KILLED for Ctrl-C, else FAILED."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


@contextmanager
def parent_run(
    params: Mapping[str, Any], shards_dir: Path | None = None, run_id: str | None = None
) -> Iterator[str]:
    """Enter the pipeline's parent run; yields its id, exported as FUSIONNET_PARENT_RUN_ID meanwhile.

    With a tracking server, prints the link to the experiment's runs table on stderr.

    The run is RUNNING inside the block and FINISHED (FAILED on an exception) after it; a later
    stage of the same pipeline run re-enters it, so its final status is its last stage's.
    """
    client = get_client()
    run_id = resolve_parent_run(client, params, shards_dir, explicit=run_id)
    client.update_run(run_id, status="RUNNING")
    if client.tracking_uri.startswith(("http://", "https://")):  # where to look, for whoever watches the log
        exp_id = client.get_run(run_id).info.experiment_id
        print(f"[mlflow] runs: {runs_page_url(client.tracking_uri, exp_id)}", file=sys.stderr, flush=True)
    previous = {name: os.environ.get(name) for name in (PARENT_RUN_ENV, store.PROJECT_ENV)}
    os.environ[PARENT_RUN_ENV] = run_id  # step subprocesses and the evaluation hook inherit it
    if client.tracking_uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
        # ... and the project, so a step started in another folder logs into this store, not its cwd's
        os.environ[store.PROJECT_ENV] = str(store.project_dir())
    try:
        yield run_id
    except BaseException as exc:
        client.set_terminated(run_id, status=failed_status(exc))
        raise
    else:
        client.set_terminated(run_id, status="FINISHED")
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
    if shards_dir is not None:
        log_shards_input(client, run.info.run_id, Path(shards_dir), tags)
    return run.info.run_id


# ----------------------------------------------------------------------------- what the UI shows


def runs_page_url(server_url: str, exp_id: str) -> str:
    """The MLflow UI's runs table of experiment `exp_id` on `server_url` (e.g. http://127.0.0.1:5000),
    opened as model training whatever the browser chose last."""
    return f"{server_url.rstrip('/')}/#/experiments/{exp_id}/runs?{RUNS_PAGE_QUERY}"


def profile_name(params: Mapping[str, Any]) -> str:
    """The params profile in one word, from `foregrounds.source`: synthetic | photos (folder) | dim."""
    source = str((params.get("foregrounds") or {}).get("source", "synthetic"))
    return PROFILES.get(source, source)


def foreground_count(shards_dir: Path) -> int | None:
    """Distinct foregrounds (column fg_id) in shards_dir/{train,val}/*.parquet; None without shards.

    The training data's foregrounds (train + val; the test foregrounds are never in the shards).
    """
    import pyarrow.parquet as pq

    files = sorted(Path(shards_dir).glob("*/*.parquet"))
    ids: set[str] = set()
    try:
        for path in files:
            ids.update(pq.read_table(path, columns=["fg_id"]).column("fg_id").to_pylist())
    except (OSError, KeyError, ValueError):  # unreadable or another layout: the name says only the profile
        return None
    return len(ids) or None


def parent_run_name(params: Mapping[str, Any], shards_dir: Path | None) -> str:
    """"<profile>-<N>fg" (e.g. "synthetic-128fg", "photos-14fg"): the same params and data, the same name."""
    count = foreground_count(Path(shards_dir)) if shards_dir is not None else None
    return f"{profile_name(params)}-{count}fg" if count else profile_name(params)


def entry_point(root: Path) -> str:
    """What started this process: its script relative to the project (a DVC stage's
    "stages/train.py"), else the Prefect flow it runs, else the script's file name."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.suffix == ".py" and script.is_file():
        try:
            return script.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    if "prefect" in sys.modules:  # a Prefect worker's process runs the flow from site-packages
        from prefect.runtime import flow_run

        if flow_run.flow_name:
            return f"prefect flow {flow_run.flow_name}"
    return script.name if script is not None else "python"


def source_tags(root: Path) -> dict[str, str]:
    """MLflow's Source and User columns: the entry point (LOCAL) and who ran it."""
    tags = {MLFLOW_SOURCE_NAME: entry_point(root), MLFLOW_SOURCE_TYPE: "LOCAL"}
    try:
        tags[MLFLOW_USER] = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        pass
    return tags


def dvc_dir_md5(directory: Path) -> str:
    """DVC's md5 of `directory` ("<32 hex>.dir", what `dvc add` would record), no DVC project needed."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as tmp:  # dry_run: nothing is written to this object store
        _, _, obj = build(HashFileDB(fs, tmp), str(Path(directory).resolve()), fs, "md5", dry_run=True)
    return obj.hash_info.value


class ShardsDataset(MetaDataset):
    """The shards as an MLflow dataset (data stays where it is): name, digest, source, and a profile
    of row and foreground counts that the UI's dataset view shows."""

    def __init__(self, source: Any, name: str, digest: str, profile: Mapping[str, Any]) -> None:
        self._profile = dict(profile)
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def shards_dataset(shards_dir: Path, dvc_md5: str | None = None) -> ShardsDataset:
    """Name "shards", digest = DVC's md5 of the directory (`dvc_md5` as dvc.lock records it, else
    computed the same way), source = the directory; profile = summary.json's rows and the foregrounds."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    shards_dir = Path(shards_dir).resolve()
    local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
    summary_path = shards_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    profile = {f"{split}_rows": (summary.get(split) or {}).get("rows") for split in ("train", "val")}
    profile["foregrounds"] = foreground_count(shards_dir)
    return ShardsDataset(local(str(shards_dir)), "shards", dvc_md5 or dvc_dir_md5(shards_dir), profile)


def log_shards_input(client: MlflowClient, run_id: str, shards_dir: Path, tags: Mapping[str, str]) -> None:
    """The shards as run `run_id`'s dataset input, context "training" (the Dataset column). `tags`:
    the run's provenance tags, whose fusionnet.data.dvc_md5 (from dvc.lock) is the digest if present."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if not Path(shards_dir).is_dir():
        return
    dataset = shards_dataset(shards_dir, tags.get("fusionnet.data.dvc_md5"))
    context = InputTag(key=MLFLOW_DATASET_CONTEXT, value="training")
    client.log_inputs(run_id, [DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[context])])


class MlflowTrainLogger:
    """fusionnet.train.tracking.TrainLogger writing to one MLflow run (rank 0 of a training step).

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
