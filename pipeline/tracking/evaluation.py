"""An evaluation record in MLflow: child run "evaluate" of the pipeline run, its metrics, tags and files.

The record is computed by fusionnet.evaluation.run.run_evaluation (no MLflow there); this logs it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from pipeline.registry.models import flatten_metrics
from pipeline.tracking.runs import MlflowTrainLogger, get_client, start_step_run


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


def log_evaluation(record: Mapping[str, Any], params: Mapping[str, Any], parent_run_id: str) -> str:
    """Log the evaluation as child run "evaluate" of `parent_run_id`; returns its run id.

    The stage finds the parent with pipeline.registry.models.pipeline_parent (FUSIONNET_PARENT_RUN_ID, else
    the run of this pipeline run, i.e. one `dvc repro`, else a new one).
    """
    client = get_client()
    run_id = start_step_run(client, parent_run_id, "evaluate", params, None)
    try:
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in mlflow_metrics(record).items()]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
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
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id
