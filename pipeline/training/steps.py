"""The paper's three training steps (Sec. 3.4: segmentation, fusion, joint) as Prefect tasks, one step at a time.

Each step is a task that runs the step in a subprocess (`python -m pipeline.training.step_main`, or
`torch.distributed.run` with one process per GPU). A crash (non-zero exit, a signal, an OOM kill)
fails the task, which Prefect retries once; the step then resumes from out_dir/state.pt.
`train_one_step` is the flow for one step; each DVC training stage runs it in-process. The whole
pipeline flow (`train`: the three steps, then evaluation and registration) is pipeline.flows;
this module imports none of the downstream code, so the training stages do not depend on it.

Each step is one MLflow child run under the pipeline's parent run (pipeline.tracking.runs).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import pipeline  # noqa: F401  (applies the offline switches before prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fusionnet.io.atomic import write_text_atomic
from fusionnet.io.hashing import file_sha256
from fusionnet.io.params import load_params
from fusionnet.train.config import STEPS  # torch-free: the fusionnet.train package imports nothing itself
from pipeline.training import handoff
from pipeline.training.launch import NPROC_ENV, Rendezvous, StepJob, processes_per_node, step_command, train_device  # noqa: F401  (re-exported)
from pipeline.tracking.runs import TAG_TRAINED_MODEL_SHA, failed_status, get_client, parent_run, start_step_run


class StepCrashed(RuntimeError):
    """A training step's process exited with a non-zero code (or was killed by a signal)."""


@task(retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE, task_run_name="train-{job.step}")
def train_step_task(job: StepJob, mlflow_run_id: str | None) -> dict[str, Any]:
    """Run `job` in a subprocess; returns its StepResult as a dict (model_path, history, ...)."""
    logger = get_run_logger()
    step, out_dir = job.step, job.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    rendezvous = Rendezvous.from_env()  # several nodes: this node's launcher joins the job's rendezvous
    # a fresh path per attempt (a stale result must not pass for this one's), and per node (nodes
    # sharing out_dir each write their own)
    with tempfile.TemporaryDirectory(prefix="fusionnet-result-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = step_command(job, mlflow_run_id, result_path, rendezvous)
        resuming = (out_dir / "state.pt").is_file()
        logger.info("%s step %s: %s", "resuming" if resuming else "starting", step, " ".join(cmd))
        code = subprocess.run(cmd, check=False).returncode
        if code != 0:
            raise StepCrashed(f"step {step!r}: {' '.join(cmd[:3])}... exited with code {code}")
        if not result_path.is_file():
            raise StepCrashed(f"step {step!r}: exited 0 but wrote no result")
        text = result_path.read_text()
    result = json.loads(text)
    if result.get("node_role", "leader") == "leader":  # the step directory's result.json (a DVC output)
        write_text_atomic(out_dir / "result.json", text)
    return result


def _log_step_summary(client: Any, run_id: str, result: dict[str, Any], out_dir: Path) -> None:
    """Throughput, iterations, initial (untrained) val scores on the child run; history.json as artifact.

    The per-iteration and per-epoch curves were logged by the step itself through MlflowTrainLogger.
    """
    metrics = {f"summary/{k}": result.get(k) for k in ("samples_per_s", "data_wait_fraction", "iterations", "train_s")}
    metrics.update({f"initial/{k}": v for k, v in (result.get("initial_val") or {}).items()})
    for name, value in metrics.items():
        if isinstance(value, (int, float)):
            client.log_metric(run_id, name, float(value), step=int(result.get("iterations") or 0))
    client.set_tag(run_id, "fusionnet.model_path", str(result.get("model_path", "")))
    if result.get("model_sha256"):  # registration finds the run that trained a model file by this
        client.set_tag(run_id, TAG_TRAINED_MODEL_SHA, result["model_sha256"])
    history = out_dir / "history.json"
    if history.is_file():
        client.log_artifact(run_id, str(history))


def discard_state_of_other_init(out_dir: Path, init_checkpoint: Path | None) -> bool:
    """Remove out_dir/state.pt if it was not trained from `init_checkpoint` (returns whether it did).

    The library resumes a state.pt whose settings match, but cannot tell that the previous step
    was retrained since: without this, a re-run flow would keep a fusion step built on an old
    segmentation model. The init model's sha256 is recorded beside the state. (DVC deletes a
    stage's outputs before running it, so this matters for Prefect runs outside DVC.)
    """
    marker = out_dir / "init.sha256"
    digest = file_sha256(init_checkpoint) if init_checkpoint else "none"
    state = out_dir / "state.pt"
    stale = state.is_file() and (not marker.is_file() or marker.read_text().strip() != digest)
    if stale:
        state.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest + "\n")
    return stale


class StepOutcome(NamedTuple):
    model_path: Path
    node_role: str  # "leader" (the node with global rank 0; every single-node run) | "follower"


def run_tracked_step(job: StepJob, params: dict[str, Any], parent_run_id: str, hand_back: bool = False) -> StepOutcome:
    """`job` as a child run of `parent_run_id`: the task (retried once), then its summary. `params`:
    the content of job.params_path (logged as the run's params).

    hand_back: also log the step's outputs to the child run (pipeline.training.handoff), for a dispatching
    DVC stage on a machine that does not share this one's filesystem. On a follower node of a
    multi-node step (rank 0 ran elsewhere and logged the curves) the child run only records that.
    """
    discard_state_of_other_init(job.out_dir, job.init_checkpoint)  # before the first attempt: retries resume
    client = get_client()
    child = start_step_run(client, parent_run_id, job.step, params, job.shards_dir)
    flow_run_id = _current_flow_run_id()
    if flow_run_id:
        client.set_tag(child, handoff.TAG_FLOW_RUN, flow_run_id)
    try:
        result = train_step_task(job, child)
        role = result.get("node_role", "leader")
        client.set_tag(child, "fusionnet.node_role", role)
        if role == "leader":
            _log_step_summary(client, child, result, job.out_dir)
            if hand_back:
                handoff.upload_outputs(client, child, job.out_dir)
    except BaseException as exc:
        client.set_terminated(child, status=failed_status(exc))
        raise
    client.set_terminated(child, status="FINISHED")
    return StepOutcome(Path(result["model_path"]), role)


def _current_flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


@flow(name="fusionnet-train-step")
def train_one_step(
    step: str,
    params_path: str = "params.yaml",
    shards_dir: str = "data/shards",
    out_dir: str | None = None,
    init_checkpoint: str | None = None,
    nproc_per_node: int | None = None,
) -> str:
    """Train one step into out_dir (default models/<step>); returns its model path. Used by DVC."""
    if step not in STEPS:
        raise ValueError(f"step {step!r}: expected one of {list(STEPS)}")
    params_file, shards = Path(params_path).resolve(), Path(shards_dir).resolve()
    params = load_params(params_file)
    out = Path(out_dir or Path("models") / step).resolve()
    init = Path(init_checkpoint).resolve() if init_checkpoint else None
    if init is not None and not init.is_file():
        raise FileNotFoundError(f"{init}: init checkpoint for step {step!r} not found")
    with parent_run(params, shards) as parent_id:
        job = StepJob(step, params_file, shards, out, init, processes_per_node(nproc_per_node, train_device(params)))
        model = run_tracked_step(job, params, parent_id).model_path
    return str(model)

