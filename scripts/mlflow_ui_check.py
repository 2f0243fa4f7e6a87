"""The smallest tracked pipeline run, to look at in the MLflow UI: parent run, one training step, the model.

    python scripts/mlflow_ui_check.py --root /tmp/ui-check
    mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:////tmp/ui-check/mlflow.db
    # then open the printed runs_page (the runs table, as model training)

Writes toy shards (fusionnet.train.toy) and a tiny params.yaml (densenet121 at 64 px, one
iteration) under --root, then does what one `dvc repro` of train_joint + register does, minus
Prefect (whose temporary server is slow to start on a busy machine): the parent run
(pipeline.tracking.runs.parent_run), the joint step as its child run trained by the real step process
(pipeline.training.step_main), the step summary (pipeline.training.steps), and registration of the trained file
(pipeline.registry.registration) with a stand-in evaluation (fixed metrics). Logs to MLFLOW_TRACKING_URI,
else sqlite:///<root>/mlflow.db. Prints one JSON line: the ids to look for in the UI.
tests/test_mlflow_ui.py runs it, then checks the runs page in headless Chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pipeline  # noqa: F401  (offline switches before mlflow is imported)
import yaml


def tiny_params(path: Path) -> Path:
    """densenet121 at 64x64 on CPU, one iteration per step (as tests/test_prefect_deployment.py)."""
    step = {"epochs": 1, "max_iters_per_epoch": 1}
    params = {
        "seed": 0,
        "foregrounds": {"source": "synthetic"},
        "model": {"backbone": "densenet121", "pretrained": False, "input_norm": "imagenet"},
        "train_common": {"device": "cpu", "precision": "fp32", "batch_size": 2, "num_workers": 0,
                         "checkpoint_every": 1, "log_every": 1, "val_max_images": 2, "visual_count": 2,
                         "threads": 1},
        "train_seg": dict(step), "train_fusion": dict(step), "train_joint": dict(step),
        "register": {"precision": "fp32"},
    }
    path.write_text(yaml.safe_dump(params))
    return path


def stand_in_evaluation(folder: Path) -> tuple[Path, Path]:
    """metrics/evaluate.json, metrics/details.json, reports/table.md as the evaluate stage writes them."""
    metrics, reports = folder / "metrics", folder / "reports"
    metrics.mkdir(parents=True, exist_ok=True)
    reports.mkdir(parents=True, exist_ok=True)
    (metrics / "evaluate.json").write_text(json.dumps({"raw": {"band": {"sad": 1.0, "mse": 0.1}}}))
    (metrics / "details.json").write_text(json.dumps({"guided_filter": {"radius": 2, "eps": 1e-2},
                                                      "test_set": {"version": "sha256:" + "0" * 64}}))
    (reports / "table.md").write_text("| Method | SAD-25 |\n|---|---:|\n| Ours-raw | 1.0 |\n")
    return metrics, reports


def run(root: Path) -> dict:
    """The tracked run under `root`; returns the ids and values the UI should show."""
    from fusionnet.train.toy import write_toy_shards
    from pipeline.tracking import runs as tracking
    from pipeline.training.launch import StepJob, step_command
    from fusionnet.io.params import load_params
    from pipeline.registry.registration import register_pipeline_model
    from pipeline.training.steps import _log_step_summary

    root = Path(root).resolve()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    os.environ.setdefault("FUSIONNET_PIPELINE_RUN", f"ui-check-{root.name}")  # register finds the same parent
    shards = write_toy_shards(root / "data" / "shards", n_train=8, n_val=2, size=64)
    params_path = tiny_params(root / "params.yaml")
    params = load_params(params_path)
    out = root / "models" / "joint"
    client = tracking.get_client()
    with tracking.parent_run(params, shards) as parent_id:
        step_id = tracking.start_step_run(client, parent_id, "joint", params, shards)
        with tempfile.TemporaryDirectory() as tmp:
            result_path = Path(tmp) / "result.json"
            cmd = step_command(StepJob("joint", params_path, shards, out), step_id, result_path)
            subprocess.run(cmd, check=True)
            result = json.loads(result_path.read_text())
        _log_step_summary(client, step_id, result, out)
        client.set_terminated(step_id, status="FINISHED")
    metrics, reports = stand_in_evaluation(root / "evaluation")
    registered = register_pipeline_model(params, Path(result["model_path"]), metrics, reports,
                                         root / "models" / "registered.json")
    parent = client.get_run(parent_id)
    return {
        "tracking_uri": tracking.tracking_uri(), "experiment_id": parent.info.experiment_id,
        "parent_run_id": parent_id, "parent_run_name": parent.info.run_name, "step_run_id": step_id,
        "register_run_id": registered["run_id"], "model_id": registered["model_id"],
        "model_name": registered["name"], "model_version": registered["version"],
        "dataset_digest": parent.inputs.dataset_inputs[0].dataset.digest,
        "runs_page": tracking.runs_page_url("http://127.0.0.1:5000", parent.info.experiment_id),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="folder for the shards, models and SQLite store")
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    print(json.dumps(run(args.root)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
