"""The pipeline's last Prefect task, `register`: the joint model -> MLflow registry, champion or challenger.

Its own module so that the DVC `register` stage, which runs only this task, depends on none of
the evaluation code (pipeline.tasks holds the others and the order they run in).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  (offline switches before prefect is imported)
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.provenance import load_params

TASK_OPTIONS = dict(retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)


def log_to_run(text: str) -> None:
    """A line in the task run's log (the Prefect UI), or on stdout when called outside a run (.fn)."""
    try:
        get_run_logger().info(text)
    except Exception:
        print(text, flush=True)


@task(name="register", **TASK_OPTIONS)
def register_task(
    params_path: Path, model: Path, metrics_dir: Path, reports_dir: Path, out: Path, parent_run_id: str | None
) -> dict[str, Any]:
    """Register `model` (pipeline.registry.register_pipeline_model): champion or challenger."""
    from pipeline.registry import register_pipeline_model

    result = register_pipeline_model(load_params(params_path), Path(model), Path(metrics_dir), Path(reports_dir),
                                     Path(out), parent_run_id)
    log_to_run(f"registered {result['name']} v{result['version']} as @{result['alias']}: {result['reason']}")
    return result
