"""An evaluation record in MLflow: child run "evaluate" of the pipeline run, its metrics, tags and files.

The record is computed by fusionnet.evaluation.run.run_evaluation (no MLflow there); this logs it.
The child run is opened before the evaluation starts and closed after it (`evaluation_run`), so its
duration in the runs table is the evaluation's. The table's headline numbers (HEADLINE_METRICS) go on
the child and on the parent run, so the runs table compares pipeline runs without its hidden columns.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from pipeline.registry.models import flatten_metrics
from pipeline.tracking.runs import MlflowTrainLogger, failed_status, get_client, start_step_run

# The paper's table in eight numbers: SAD and MSE over the -25 transition band ("band") and the whole
# image ("full"), of the raw and the guided-filter-refined joint model (metrics/evaluate.json).
HEADLINE_ROWS = ("raw", "refined")
HEADLINE_REGIONS = {"band": "25", "full": "full"}
HEADLINE_SCORES = ("sad", "mse")


def headline_metrics(evaluate: Mapping[str, Any]) -> dict[str, float]:
    """`record["evaluate"]` (metrics/evaluate.json: row -> region -> score) -> {"test/sad25_raw": ..,
    "test/mse25_raw": .., "test/sadfull_raw": .., ..., "test/msefull_refined": ..}; rows or scores the
    evaluation did not compute are left out."""
    out: dict[str, float] = {}
    for row in HEADLINE_ROWS:
        for region, suffix in HEADLINE_REGIONS.items():
            for score in HEADLINE_SCORES:
                value = ((evaluate.get(row) or {}).get(region) or {}).get(score)
                if isinstance(value, (int, float)):
                    out[f"test/{score}{suffix}_{row}"] = float(value)
    return out


def mlflow_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Flat metric names for MLflow: "raw.band.sad", "claims.composites.joint.bracketing_ratio", ..."""
    metrics = flatten_metrics(record["evaluate"])
    metrics.update(flatten_metrics(record["claims"], "claims."))
    photos = record["photos"]
    if "rows" in photos:
        metrics.update(flatten_metrics(photos["rows"], "photos."))
        compared = flatten_metrics(photos["comparisons"], "photos.comparisons.")
        metrics.update({k: v for k, v in compared.items() if not k.endswith(".threshold")})
        for model, entry in photos["comparisons"].items():  # verdicts as 1/0
            metrics[f"photos.comparisons.{model}.holds"] = float(entry["holds"])
            for name, comparison in entry.items():
                if name != "holds":
                    metrics[f"photos.comparisons.{model}.{name}.holds"] = float(comparison["holds"])
    if photos.get("held_out"):
        metrics["photos.held_out"] = float(len(photos["held_out"]["scored"]))
        metrics["photos.excluded"] = float(len(photos["held_out"]["excluded"]))
    gf = {k: v for k, v in (record["details"].get("guided_filter") or {}).items() if k != "grid"}
    metrics.update(flatten_metrics(gf, "guided_filter."))
    metrics.update(flatten_metrics(record["details"]["seconds"], "seconds."))
    return metrics


@contextmanager
def evaluation_run(params: Mapping[str, Any], parent_run_id: str | None) -> Iterator[str | None]:
    """Child run "evaluate" of `parent_run_id`, RUNNING for the duration of the block; yields its id
    (None and no run when `parent_run_id` is None). FINISHED after the block, FAILED (KILLED on
    Ctrl-C) when it raises: start and end time are the evaluation's own."""
    if not parent_run_id:
        yield None
        return
    client = get_client()
    run_id = start_step_run(client, parent_run_id, "evaluate", params, None)
    try:
        yield run_id
    except BaseException as exc:
        client.set_terminated(run_id, status=failed_status(exc))
        raise
    client.set_terminated(run_id, status="FINISHED")


def log_evaluation(record: Mapping[str, Any], run_id: str, parent_run_id: str | None = None) -> None:
    """Log the evaluation into the (running) child run `run_id` (see `evaluation_run`): every metric
    of `mlflow_metrics`, the checkpoints and test set as tags, the files as artifacts; the headline
    metrics also on `parent_run_id` when given."""
    client = get_client()
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in mlflow_metrics(record).items()]
    headline = [Metric(k, v, now, 0) for k, v in headline_metrics(record["evaluate"]).items()]
    metrics += headline
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
    if parent_run_id and headline:
        client.log_batch(parent_run_id, metrics=headline, synchronous=True)
    tags = {f"fusionnet.checkpoint.{p['source']}": f"{p['checkpoint']} sha256:{p['sha256']}"
            for p in record["details"]["provenance"].values() if p["sha256"]}
    if "skipped" in record["photos"]:
        tags["fusionnet.photos_skipped"] = str(record["photos"]["skipped"])
    if record["photos"].get("held_out"):
        tags["fusionnet.photos_excluded"] = ", ".join(record["photos"]["held_out"]["excluded"]) or "none"
    if record["details"].get("test_set"):
        tags["fusionnet.test_set"] = record["details"]["test_set"]["version"]
    MlflowTrainLogger(run_id, client).set_tags(tags)
    for path in record.get("files", []):
        folder = "pictures" if Path(path).parent.name == "pictures" else "evaluation"
        client.log_artifact(run_id, path, artifact_path=folder)
