"""The DVC `evaluate` and `register` stages as `dvc repro` runs them: both under one MLflow parent run,
the evaluation's numbers and test-set version carried to the registered version.

Split from tests/test_registry.py (which keeps the store helpers and `tiny_project`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_registry import MODEL, registry_env, runs_by_name, tiny_project


@pytest.mark.slow
def test_dvc_stages_log_evaluate_and_register_under_one_parent(tmp_path):
    """`python stages/evaluate.py` then `python stages/register.py`, as one `dvc repro` runs them."""
    from pipeline.tracking.runs import get_client

    project = tiny_project(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    with registry_env(tmp_path):
        env = {**os.environ, "FUSIONNET_PIPELINE_RUN": "repro-1"}
        for script in ("evaluate", "register"):
            done = subprocess.run([sys.executable, str(repo / "stages" / f"{script}.py"), "--params", "params.yaml",
                                   *(["--composites", "data/composites"] if script == "evaluate" else [])],
                                  cwd=project, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        client = get_client()
        runs = runs_by_name(client)
        evaluate, register_run = runs["evaluate"], runs["register"]
        parent = evaluate.data.tags["mlflow.parentRunId"]
        assert register_run.data.tags["mlflow.parentRunId"] == parent
        assert client.get_run(parent).info.status == "FINISHED"
        table = json.loads((project / "metrics" / "evaluate.json").read_text())
        assert evaluate.data.metrics["raw.band.sad"] == pytest.approx(table["raw"]["band"]["sad"])
        assert "claims.composites.joint.bracketing_ratio" in evaluate.data.metrics
        artifacts = {a.path for folder in ("evaluation", "pictures") for a in client.list_artifacts(evaluate.info.run_id, folder)}
        assert "evaluation/table.md" in artifacts and any(p.startswith("pictures/worst_1_") for p in artifacts)
        registered = json.loads((project / "models" / "registered.json").read_text())
        assert registered["alias"] == "champion" and registered["value"] == pytest.approx(table["raw"]["band"]["sad"])
        # the served settings carry the guided filter chosen on validation
        details = json.loads((project / "metrics" / "details.json").read_text())
        # the test set's data version goes from the evaluation to the registered version
        from fusionnet.evaluation.run import split_data_version

        version = split_data_version(project / "data" / "composites")["version"]
        assert details["test_set"]["version"] == registered["test_set"] == version
        assert evaluate.data.tags["fusionnet.test_set"] == version
        assert client.get_model_version(MODEL, registered["version"]).tags["fusionnet.test_set"] == version
        # the stage read data/foregrounds (its default --foregrounds): GT01 was trained on, so not scored
        photos = json.loads((project / "metrics" / "photos.json").read_text())
        assert photos["held_out"]["scored"] == ["GT02"] and list(photos["held_out"]["excluded"]) == ["GT01"]
        assert evaluate.data.tags["fusionnet.photos_excluded"] == "GT01"
        assert evaluate.data.metrics["photos.held_out"] == 1.0
        assert registered["settings"]["radius"] == details["guided_filter"]["radius"]
