"""Prefect flow `train`: the pipeline from the shards to a registered model.

    train-segmentation -> train-fusion -> train-joint [-> tune-refinement -> evaluate -> register]

runs segmentation -> fusion -> joint (or a contiguous part of it), each step a task of
pipeline.training.steps (a subprocess, retried once, resuming from its state.pt), then with
`downstream=True` the tasks of pipeline.tasks. This is the flow the deployment serves
(pipeline.deploy); a DVC stage that dispatches one step triggers it with steps=[step]
(pipeline.training.dispatch). The flow returns the final model path and calls the optional `evaluate` hook.

Each flow run is one MLflow parent run (pipeline.tracking.runs.parent_run), each step one child run.
"""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  (applies the offline switches before prefect is imported)
import yaml
from prefect import flow, get_run_logger

from fusionnet.io.params import load_params
from pipeline.training import datasync, handoff
from pipeline.training.steps import (  # noqa: F401  (re-exported: the step machinery's public names)
    NPROC_ENV,
    STEPS,
    StepCrashed,
    StepJob,
    _current_flow_run_id,
    discard_state_of_other_init,
    processes_per_node,
    train_device,
    run_tracked_step,
    step_command,
    train_one_step,
    train_step_task,
)
from pipeline.tasks import evaluate_and_register
from pipeline.tracking.runs import get_client, parent_run


def resolve_hook(spec: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"evaluate hook {spec!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(module_name), attr)


def _check_steps(steps: Sequence[str]) -> list[str]:
    """steps must be a contiguous, in-order run of STEPS (each step starts from the previous one's model)."""
    steps = list(steps)
    start = STEPS.index(steps[0]) if steps and steps[0] in STEPS else -1
    if start < 0 or steps != list(STEPS[start : start + len(steps)]):
        raise ValueError(f"steps {steps}: expected a contiguous, in-order part of {list(STEPS)}")
    return steps


@flow(name="fusionnet-train")
def train(
    params_path: str = "params.yaml",
    shards_dir: str = "data/shards",
    models_dir: str = "models",
    steps: list[str] | None = None,
    nproc_per_node: int | None = None,
    evaluate: str | None = None,
    params: dict[str, Any] | None = None,
    data_md5: str | None = None,
    init_sha256: str | None = None,
    parent_run_id: str | None = None,
    hand_back: bool = False,
    heartbeat_s: float | None = None,
    downstream: bool = False,
) -> str:
    """Train segmentation -> fusion -> joint into models_dir/<step>/; returns the final model path.

    steps: a contiguous part of the three (default all); a run starting after segmentation
    initialises from models_dir/<previous step>/model.safetensors.
    evaluate: 'package.module:function', called as fn(model_path=Path, parent_run_id=str) after
    training, inside the parent MLflow run (the hook for the evaluation flow).
    downstream: after the steps, the tasks tune-refinement -> evaluate -> register
    (pipeline.tasks) over the project that holds models_dir (its data/, metrics/, reports/);
    with steps=["joint"] this re-evaluates and re-registers without retraining the first two.

    Set by a dispatching DVC stage (pipeline.training.dispatch), for a worker that may not share its files:
    params: the params.yaml content itself (params_path is then ignored); data_md5: DVC's md5 of
    shards_dir, pulled from the DVC remote when this worker's copy differs (pipeline.training.datasync);
    init_sha256: the sha256 the first step's init model must have, fetched from MLflow when the
    local file differs; parent_run_id: the MLflow parent run to log under; hand_back: log each
    step's outputs to its child run; heartbeat_s: label the flow run alive every so many seconds.
    """
    steps = _check_steps(steps or STEPS)
    with handoff.Heartbeat(_current_flow_run_id(), heartbeat_s), tempfile.TemporaryDirectory() as tmp:
        if params is not None:  # the dispatcher's params, not whatever params.yaml this checkout has
            params_path = str(Path(tmp) / "params.yaml")
            Path(params_path).write_text(yaml.safe_dump(params, sort_keys=False))
        params_file, shards, models = Path(params_path).resolve(), Path(shards_dir).resolve(), Path(models_dir).resolve()
        loaded = load_params(params_file)
        if data_md5:
            datasync.ensure_version(shards, data_md5, datasync.dvc_root_of(shards), log=get_run_logger().info)
        nproc = processes_per_node(nproc_per_node, train_device(loaded))
        first = STEPS.index(steps[0])
        init = models / STEPS[first - 1] / "model.safetensors" if first > 0 else None
        if init is not None and init_sha256:
            handoff.ensure_init_model(init, init_sha256, get_client(), log=get_run_logger().info)
        if init is not None and not init.is_file():
            raise FileNotFoundError(f"{init}: step {steps[0]!r} starts from the previous step's model; train it first")
        with parent_run(loaded, shards, run_id=parent_run_id) as parent_id:
            for step in steps:
                job = StepJob(step, params_file, shards, models / step, init, nproc)
                outcome = run_tracked_step(job, loaded, parent_id, hand_back=hand_back)
                init = outcome.model_path
            if outcome.node_role == "follower":  # the leader node's flow run evaluates and registers
                get_run_logger().info("follower node of a multi-node run: no downstream tasks here")
                return str(init)
            if downstream:
                evaluate_and_register(models.parent, params_file, models, parent_id)
            if evaluate:
                resolve_hook(evaluate)(model_path=init, parent_run_id=parent_id)
    return str(init)
