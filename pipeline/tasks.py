"""The pipeline's downstream Prefect tasks: tune the refinement, evaluate, register (after train_joint).

The `train` flow runs them after its training steps (`downstream=True`), and the DVC stages
`evaluate` and `register` call the very same tasks, so a Prefect run and a `dvc repro` never
diverge. Each is a task with its own retry and logs; each also runs alone (a task called outside a
flow is its own task run in Prefect 3). The graph the Prefect UI shows for a full run:

    train-segmentation -> train-fusion -> train-joint -> tune-refinement -> evaluate -> register

tune-refinement picks the guided filter (paper Sec. 3.5) on the validation composites; evaluate
scores the paper's table rows, the "refined" ones with that filter applied; register logs the
joint model with that filter in its serving settings and moves `champion` only when it wins.
Project layout (relative to `project_dir`): data/composites, data/foregrounds, metrics/, reports/,
models/<step>/model.safetensors, models/registered.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  (offline switches before prefect is imported)
from prefect import task

from fusionnet.evaluation.run import run_evaluation, tune_refinement
from pipeline.env import PROJECT_DIR
from pipeline.tracking.evaluation import evaluation_run, log_evaluation
from fusionnet.io.params import load_params
from fusionnet.train.config import STEPS
from pipeline.registry.registration import TASK_OPTIONS, log_to_run, register_task


@task(name="tune-refinement", **TASK_OPTIONS)
def tune_refinement_task(params_path: Path, joint_checkpoint: Path, composites: Path) -> dict[str, Any]:
    """Guided-filter radius/eps for the joint model on the validation composites (evaluation.tune_refinement)."""
    gf = tune_refinement(load_params(params_path), Path(joint_checkpoint), Path(composites))
    log_to_run(f"guided filter: radius {gf['radius']}, eps {gf['eps']} on {gf['val_images']} validation composites")
    return gf


@task(name="evaluate", **TASK_OPTIONS)
def evaluate_task(
    params_path: Path,
    checkpoints: dict[str, Path],
    composites: Path,
    metrics_dir: Path,
    reports_dir: Path,
    foregrounds: Path | None,
    guided_filter: dict[str, Any] | None,
    parent_run_id: str | None,
) -> dict[str, Any]:
    """The paper's table rows, claims and pictures into metrics_dir/reports_dir; logged to MLflow
    as child run "evaluate" of parent_run_id (not logged when None), a run opened before the
    evaluation and closed after it, with the headline metrics also on the parent. Returns the record."""
    params = load_params(params_path)
    base_dir = Path(params_path).resolve().parent  # a relative photos root is relative to params.yaml
    with evaluation_run(params, parent_run_id) as run_id:  # open around the work: the run's duration is the evaluation's
        record = run_evaluation(params, checkpoints, Path(composites), Path(metrics_dir), Path(reports_dir), base_dir,
                                foregrounds, guided_filter=guided_filter)
        if run_id is not None:
            log_evaluation(record, run_id, parent_run_id)
            record["run_id"] = run_id
    raw = record["evaluate"].get("raw", {}).get("band", {})
    log_to_run(f"evaluated {record['details']['images']['test']} test composites: raw SAD-25 {raw.get('sad', float('nan')):.3f}")
    return record


def checkpoints_of(models_dir: Path) -> dict[str, Path]:
    """models_dir/<step>/model.safetensors of the steps that have one."""
    found = {s: Path(models_dir) / s / "model.safetensors" for s in STEPS}
    return {s: p for s, p in found.items() if p.is_file()}


def evaluate_and_register(project_dir: Path, params_path: Path, models_dir: Path, parent_run_id: str) -> dict[str, Any]:
    """tune-refinement -> evaluate -> register over the project's layout (see module doc)."""
    root = Path(project_dir)
    models = Path(models_dir)
    checkpoints = checkpoints_of(models)
    if "joint" not in checkpoints:
        raise FileNotFoundError(f"{models / 'joint' / 'model.safetensors'}: train the joint step first")
    composites = root / "data" / "composites"
    gf = tune_refinement_task(params_path, checkpoints["joint"], composites)
    record = evaluate_task(params_path, checkpoints, composites, root / "metrics", root / "reports",
                           root / "data" / "foregrounds", gf, parent_run_id)
    registration = register_task(params_path, checkpoints["joint"], root / "metrics", root / "reports",
                                 models / "registered.json", parent_run_id)
    return {"evaluation": record["details"], "registration": registration}


# ----------------------------------------------------------------------------- hook


def evaluate_hook(
    model_path: Path, parent_run_id: str, params_path: str = "params.yaml", project_dir: Path | None = None
) -> dict[str, Any]:
    """Hook form of the downstream tasks (`train(evaluate="pipeline.tasks:evaluate_hook")`):
    evaluate_and_register over `project_dir` (default: this checkout), with the
    models beside `model_path` (models/<step>/model.safetensors)."""
    root = Path(project_dir or PROJECT_DIR)
    return evaluate_and_register(root, root / params_path, Path(model_path).resolve().parent.parent, parent_run_id)
