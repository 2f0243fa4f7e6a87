"""The evaluation in MLflow: child run "evaluate" timed around the real work, and the table's headline
numbers (SAD/MSE of the -25 band and the full image, raw and refined) on it and on the parent run."""

from __future__ import annotations

import json
import time

import pytest

import pipeline  # noqa: F401  (offline switches first)
from pipeline import tasks
from pipeline.tracking import runs as tracking
from pipeline.tracking.evaluation import headline_metrics
from tests.test_registry import registry_env, tiny_project

HEADLINE_KEYS = {f"test/{score}{region}_{row}" for score in ("sad", "mse") for region in ("25", "full")
                 for row in ("raw", "refined")}


def test_headline_names_follow_the_table():
    evaluate = {"raw": {"band": {"sad": 9.5, "mse": 0.1, "grad": 3.0}, "full": {"sad": 12.0, "mse": 0.05}},
                "refined": {"band": {"sad": 8.0}}, "closed_form": {"band": {"sad": 1.0}}}
    assert headline_metrics(evaluate) == {"test/sad25_raw": 9.5, "test/mse25_raw": 0.1, "test/sadfull_raw": 12.0,
                                          "test/msefull_raw": 0.05, "test/sad25_refined": 8.0}


@pytest.mark.timeout(300)
def test_evaluate_run_spans_the_evaluation_and_the_parent_gets_the_headline(tmp_path, monkeypatch):
    """A real tiny evaluation (tests/test_registry.py's project) through the `evaluate` task's code."""
    project = tiny_project(tmp_path)
    seconds: list[float] = []
    real = tasks.run_evaluation

    def timed_evaluation(*args, **kwargs):  # the real evaluation, timed from outside
        start = time.monotonic()
        try:
            return real(*args, **kwargs)
        finally:
            seconds.append(time.monotonic() - start)

    monkeypatch.setattr(tasks, "run_evaluation", timed_evaluation)
    with registry_env(tmp_path):
        with tracking.parent_run({"seed": 0}) as parent_id:
            checkpoints = tasks.checkpoints_of(project / "models")
            record = tasks.evaluate_task.fn(project / "params.yaml", checkpoints, project / "data" / "composites",
                                            project / "metrics", project / "reports", project / "data" / "foregrounds",
                                            {"radius": 2, "eps": 1e-2}, parent_id)
        client = tracking.get_client()
        child = client.get_run(record["run_id"])
        parent = client.get_run(parent_id)

    assert child.info.run_name == "evaluate" and child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    (work,) = seconds
    assert child.info.end_time - child.info.start_time >= int(work * 1000) - 1  # ms stamps: 1 ms of rounding

    table = json.loads((project / "metrics" / "evaluate.json").read_text())
    expected = {f"test/{s}{tag}_{row}": table[row][region][s] for row in ("raw", "refined")
                for region, tag in (("band", "25"), ("full", "full")) for s in ("sad", "mse")}
    assert set(expected) == HEADLINE_KEYS
    for run in (child, parent):
        assert {k: run.data.metrics[k] for k in HEADLINE_KEYS} == pytest.approx(expected, rel=1e-12)
    # the DVC table file (4 significant digits, SAD /1000) shows the same number
    raw_file = json.loads((project / "metrics" / "table" / "composites" / "raw.json").read_text())
    assert raw_file["band"]["mse"] == pytest.approx(parent.data.metrics["test/mse25_raw"], rel=1e-3)
    # the parent carries the headline, not the evaluation's hundreds of detail metrics
    assert not {k for k in parent.data.metrics if not k.startswith("test/")}
    assert len(child.data.metrics) > len(HEADLINE_KEYS)
