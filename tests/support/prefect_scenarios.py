"""The `train` flow's failure paths, run for real on Prefect's temporary server with a stand-in step.

    python -m tests.support.prefect_scenarios WORKDIR SCENARIO... > report.json

runs each scenario's flow in this one process (one temporary server for all: its start-up is
most of the cost) and prints {scenario: what happened} as JSON: the flow run's state and
message, its task runs (name, state, run count), the MLflow runs of the scenario's experiment
(name, status, tags) and the stand-in step's calls. tests/test_prefect_failures.py asserts on it.

The stand-in step replaces only the subprocess (`python -m tests.support.prefect_scenarios --fake-step
MODE <the real step argv>`), so the flow, the task with its retry, the child and parent MLflow
runs and the result hand-over are the pipeline's own code. MODE: crash (exit 3), no-result
(exit 0, nothing written), ok (a model named after the step and its init's bytes, a result.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

CALLS_ENV = "FUSIONNET_TEST_FAKE_CALLS"  # where the stand-in step appends one JSON line per call


def fake_step(argv: list[str]) -> int:
    """The stand-in for `python -m pipeline.training.step_main`: records its call, then behaves as MODE says."""
    mode, rest = argv[0], argv[1:]
    parser = argparse.ArgumentParser()
    for name in ("--step", "--params", "--shards", "--out", "--init", "--mlflow-run-id", "--result"):
        parser.add_argument(name)
    args = parser.parse_args(rest)
    with open(os.environ[CALLS_ENV], "a") as handle:
        handle.write(json.dumps({"step": args.step, "init": args.init, "out": args.out, "mode": mode}) + "\n")
    if mode == "crash":
        print(f"fake step {args.step}: crashing on purpose", flush=True)
        return 3
    if mode == "no-result":
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    init_bytes = Path(args.init).read_bytes() if args.init else b""
    model = out / "model.safetensors"
    model.write_bytes(f"{args.step}<-".encode() + init_bytes)  # traceable: which init each step started from
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    Path(args.result).write_text(json.dumps({"model_path": str(model), "model_sha256": sha, "iterations": 1,
                                             "node_role": "leader"}))
    return 0


def _install_stand_in(mode: str) -> None:
    """Make the flow's task launch the stand-in (with MODE) instead of pipeline.training.step_main."""
    import pipeline.training.steps
    from pipeline.training.launch import step_command

    def command(*args, **kwargs) -> list[str]:
        real = step_command(*args, **kwargs)
        return [sys.executable, "-m", "tests.support.prefect_scenarios", "--fake-step", mode, *real[real.index("--step"):]]

    pipeline.training.steps.step_command = command


def _task_runs(flow_run_id: str) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)  # limit: its server rejects null
    return [{"name": r.name, "state": r.state.type.value, "run_count": r.run_count} for r in runs]


def _mlflow_runs(experiment: str) -> list[dict]:
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return [{"id": r.info.run_id, "name": r.info.run_name, "status": r.info.status, "tags": r.data.tags}
            for r in client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])]


SCENARIOS = {
    # name: (stand-in mode, steps, models made before the run {step: bytes})
    "retry-fails": ("crash", ["segmentation"], {}),
    "no-result": ("no-result", ["segmentation"], {}),
    "missing-init": ("ok", ["fusion", "joint"], {}),
    "fusion-joint": ("ok", ["fusion", "joint"], {"segmentation": b"segmentation weights"}),
}


def run_scenario(name: str, workdir: Path, params: Path, shards: Path) -> dict:
    from pipeline.flows import train

    mode, steps, made = SCENARIOS[name]
    models = workdir / name / "models"
    models.mkdir(parents=True)
    for step, content in made.items():
        (models / step).mkdir(parents=True)
        (models / step / "model.safetensors").write_bytes(content)
    calls = workdir / name / "calls.jsonl"
    calls.touch()
    os.environ[CALLS_ENV] = str(calls)
    os.environ["FUSIONNET_MLFLOW_EXPERIMENT"] = name  # one experiment per scenario: its runs only
    _install_stand_in(mode)
    state = train(params_path=str(params), shards_dir=str(shards), models_dir=str(models), steps=steps,
                  nproc_per_node=1, return_state=True)
    flow_run_id = str(state.state_details.flow_run_id)
    return {
        "state": state.type.value, "message": state.message or "",
        "result": str(state.result(raise_on_failure=False)) if state.is_completed() else None,
        "task_runs": _task_runs(flow_run_id), "mlflow_runs": _mlflow_runs(name),
        "calls": [json.loads(line) for line in calls.read_text().splitlines()],
        "files": sorted(str(p.relative_to(models)) for p in models.rglob("*") if p.is_file()) if models.exists() else [],
    }


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--fake-step":
        return fake_step(argv[1:])
    workdir, names = Path(argv[0]), argv[1:]
    params, shards = workdir / "params.yaml", workdir / "shards"
    report = {name: run_scenario(name, workdir, params, shards) for name in names}
    print("SCENARIOS-JSON " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
