"""The `train` flow's deployment: local source, a process work pool, GPU job variables.

    python -m pipeline.deploy --pool gpu [--gpus 0,1] [--nproc 2] [--project-dir /shared/fusionnet] \
        [--env MLFLOW_TRACKING_URI=http://mlflow-host:5000] \
        [--nnodes 2 --rdzv-endpoint node0.cluster:29400 --rdzv-id job-42]

registers deployment "fusionnet-train/<name>" on the server at PREFECT_API_URL. Its flow runs
start in --project-dir (a pull step `set_working_directory`; every worker machine must have the
checkout at that path, e.g. a shared filesystem, and `pip install -e .[pipeline]`). A
`prefect worker start --pool gpu` on each CUDA machine picks runs up. Job variables: `env`
(CUDA_VISIBLE_DEVICES picks the GPUs, FUSIONNET_NPROC_PER_NODE the torchrun process count;
unset, a run uses every GPU the worker sees, one process each) and `working_dir`; both can be
overridden per run with `prefect deployment run ... --job-variable env='{...}'`.

Several nodes: --nnodes K, --rdzv-endpoint HOST:PORT and --rdzv-id JOB become FUSIONNET_NNODES,
FUSIONNET_RDZV_ENDPOINT and FUSIONNET_RDZV_ID in `env` (pipeline/training/launch.py reads them). Start K
flow runs of the deployment, one on a worker of each node, with the same three values; each
node's step launcher joins the c10d rendezvous and the K nodes train as one DDP group. Give every
training job its own id, per run: `--job-variable env='{"FUSIONNET_RDZV_ID": "job-43"}'` (the
worker merges a run's `env` key by key into the deployment's).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from uuid import UUID

import pipeline  # noqa: F401  (applies the offline switches before prefect is imported)
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.workers.process import ProcessWorker

from pipeline.env import OFFLINE_ENV, PROJECT_DIR
from pipeline.flows import train
from pipeline.training.launch import NNODES_ENV, NPROC_ENV, RDZV_ENDPOINT_ENV, RDZV_ID_ENV, Rendezvous

ENTRYPOINT = "pipeline/flows.py:train"
DEFAULT_POOL = "gpu"
DEFAULT_NAME = "gpu"


async def _ensure_process_pool(pool: str) -> None:
    async with get_client() as client:
        try:
            await client.read_work_pool(pool)
            return
        except ObjectNotFound:
            pass
        template = ProcessWorker.get_default_base_job_template()
        try:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        except ObjectAlreadyExists:  # created by someone else meanwhile
            pass


def job_variables(
    gpus: str | None = None,
    nproc: int | None = None,
    project_dir: Path = PROJECT_DIR,
    extra_env: dict[str, str] | None = None,
    nnodes: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> dict[str, Any]:
    """Process-worker job variables: offline env, GPU selection, multi-node rendezvous, the flow run's
    working directory. Raises ValueError for nnodes > 1 without a HOST:PORT endpoint or a job id."""
    env = {**OFFLINE_ENV, **(extra_env or {})}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if nproc is not None:
        env[NPROC_ENV] = str(nproc)
    for key, value in ((NNODES_ENV, nnodes), (RDZV_ENDPOINT_ENV, rdzv_endpoint), (RDZV_ID_ENV, rdzv_id)):
        if value is not None:
            env[key] = str(value)
    Rendezvous.from_env(env)  # a bad combination fails at deploy time, not when the nodes start
    return {"env": env, "working_dir": str(project_dir)}


def deploy(
    pool: str = DEFAULT_POOL,
    name: str = DEFAULT_NAME,
    project_dir: Path = PROJECT_DIR,
    gpus: str | None = None,
    nproc: int | None = None,
    parameters: dict[str, Any] | None = None,
    create_pool: bool = True,
    extra_env: dict[str, str] | None = None,
    nnodes: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> UUID:
    """Register the deployment (creating the process pool if missing); returns its id."""
    if create_pool:
        run_coro_as_sync(_ensure_process_pool(pool))
    source_flow = train.from_source(source=str(Path(project_dir).resolve()), entrypoint=ENTRYPOINT)
    # to_deployment + apply rather than Flow.deploy: prefect 3.8's deploy() first lists the pool's
    # workers with a request its own server rejects (422: limit/offset null) under fastapi 0.154
    deployment = source_flow.to_deployment(
        name=name,
        work_pool_name=pool,
        job_variables=job_variables(gpus, nproc, Path(project_dir).resolve(), extra_env, nnodes, rdzv_endpoint, rdzv_id),
        parameters=parameters or {},
    )
    return deployment.apply()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pool", default=DEFAULT_POOL, help="process work pool (created if missing)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="deployment name (fusionnet-train/<name>)")
    parser.add_argument("--project-dir", type=Path, default=PROJECT_DIR, help="checkout path on the workers")
    parser.add_argument("--gpus", default=None, help="CUDA_VISIBLE_DEVICES for the runs, e.g. 0,1")
    parser.add_argument("--nproc", type=int, default=None, help="processes per step (torchrun)")
    parser.add_argument("--nnodes", type=int, default=None, help="nodes training together (torchrun rendezvous)")
    parser.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="c10d rendezvous store (with --nnodes > 1)")
    parser.add_argument("--rdzv-id", default=None, metavar="JOB", help="rendezvous job id, the same on every node")
    parser.add_argument("--no-downstream", action="store_true",
                        help="runs stop after training (default: tune-refinement, evaluate, register follow)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="more env for the runs, e.g. MLFLOW_TRACKING_URI=http://mlflow-host:5000 (repeatable)")
    args = parser.parse_args(argv)
    bad = [item for item in args.env if "=" not in item]
    if bad:
        parser.error(f"--env {bad[0]!r}: expected KEY=VALUE")
    extra_env = dict(item.split("=", 1) for item in args.env)
    rendezvous = {"nnodes": args.nnodes, "rdzv_endpoint": args.rdzv_endpoint, "rdzv_id": args.rdzv_id}
    try:
        job_variables(extra_env=extra_env, **rendezvous)
    except ValueError as exc:
        parser.error(str(exc))
    parameters = {"downstream": not args.no_downstream}  # a run's default: the whole graph down to register
    deployment_id = deploy(args.pool, args.name, args.project_dir, args.gpus, args.nproc, parameters=parameters,
                           extra_env=extra_env, **rendezvous)
    print(f"deployment fusionnet-train/{args.name} ({deployment_id}) on pool {args.pool!r}")
    print(f"start a worker:  prefect worker start --pool {args.pool}")
    print(f"run it:          prefect deployment run fusionnet-train/{args.name}")


if __name__ == "__main__":
    main()
