"""How a training step is launched: process count per node, multi-node rendezvous, the argv.

One node (the default): `python -m pipeline.training.step_main ...` for one process, or
`python -m torch.distributed.run --standalone --nproc_per_node=N -m pipeline.training.step_main ...`.

Several nodes: every node runs the same launcher with torch's elastic rendezvous (c10d backend),

    python -m torch.distributed.run --nnodes=K --nproc_per_node=N --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:PORT --rdzv_id=JOB-STEP -m pipeline.training.step_main ...

and the K launchers form one DDP group of K x N processes. The rendezvous is described by env
(job variables of the deployment, see pipeline/deploy.py):

    FUSIONNET_NNODES          nodes taking part (default 1)
    FUSIONNET_RDZV_ENDPOINT   HOST:PORT of the c10d store; the node whose address is HOST hosts it
                              (binds PORT), the others connect to it
    FUSIONNET_RDZV_ID         the job id, the same on every node (one id per training job)
    FUSIONNET_RDZV_BACKEND    default c10d
    FUSIONNET_RDZV_CONF       optional --rdzv_conf, e.g. join_timeout=1800 (torch's default: 600 s for
                              all nodes to arrive)

The step name is appended to the job id (JOB-segmentation, ...): each step is its own rendezvous,
so nodes that disagree on the step time out at the rendezvous instead of training together.
Which node gets global rank 0 is torch's choice (participants sorted by (hostname, pid)), not
necessarily the endpoint's host; pipeline/training/step_main.py writes a result on every node saying which.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fusionnet.train.config import STEPS, StepConfig  # torch-free

NPROC_ENV = "FUSIONNET_NPROC_PER_NODE"
NNODES_ENV = "FUSIONNET_NNODES"
RDZV_ENDPOINT_ENV = "FUSIONNET_RDZV_ENDPOINT"
RDZV_ID_ENV = "FUSIONNET_RDZV_ID"
RDZV_BACKEND_ENV = "FUSIONNET_RDZV_BACKEND"
RDZV_CONF_ENV = "FUSIONNET_RDZV_CONF"


def processes_per_node(explicit: int | None = None, device: str = "auto") -> int:
    """Processes for the step: `explicit`, else FUSIONNET_NPROC_PER_NODE, else one per visible GPU
    (>= 1) when `device` (params train_common.device) is "cuda" or "auto", and 1 for "cpu" (a CPU
    profile on an 8-GPU node is one process using every core, not 8 gloo processes)."""
    if explicit:
        return int(explicit)
    if os.environ.get(NPROC_ENV):
        return int(os.environ[NPROC_ENV])
    if device == "cpu":
        return 1
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # counted without initialising CUDA in this process
        return max(1, len(visible_gpus(visible)))
    import torch

    return max(1, torch.cuda.device_count())


def train_device(params: Mapping) -> str:
    """params.yaml's train_common.device (default "auto"), checked by the step config's own check.
    Only this key: the rest of the params is the step process's to check (its error is the step's)."""
    common = params.get("train_common") or {}
    device = common.get("device", StepConfig.device) if isinstance(common, Mapping) else StepConfig.device
    return StepConfig(step=STEPS[0], device=device).device


def visible_gpus(value: str) -> list[str]:
    """The GPUs a CUDA_VISIBLE_DEVICES value makes visible, as CUDA reads it: entries up to the first
    invalid one (a negative or non-numeric index, or a repeat); GPU-/MIG- UUIDs count. "0,1,-1,2" -> 2."""
    seen: list[str] = []
    for entry in (e.strip() for e in value.split(",")):
        valid = entry.isdigit() or entry.startswith(("GPU-", "MIG-"))
        key = str(int(entry)) if entry.isdigit() else entry
        if not valid or key in seen:
            break
        seen.append(key)
    return seen


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of one training job meet: K nodes, a c10d endpoint HOST:PORT, a job id."""

    nnodes: int = 1
    endpoint: str | None = None
    job_id: str | None = None
    backend: str = "c10d"
    conf: str | None = None

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"{NNODES_ENV}={self.nnodes}: expected a node count >= 1")
        if self.nnodes == 1:
            return
        if not self.endpoint:
            raise ValueError(f"{NNODES_ENV}={self.nnodes} needs {RDZV_ENDPOINT_ENV}=HOST:PORT "
                             "(the c10d rendezvous store every node connects to)")
        host, sep, port = self.endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{RDZV_ENDPOINT_ENV}={self.endpoint!r}: expected HOST:PORT, e.g. node0.cluster:29400")
        if not self.job_id:
            raise ValueError(f"{NNODES_ENV}={self.nnodes} needs {RDZV_ID_ENV} (a job id, the same on every node)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Rendezvous:
        """The rendezvous the FUSIONNET_* variables describe (a single node when FUSIONNET_NNODES is unset)."""
        env = os.environ if environ is None else environ
        raw = env.get(NNODES_ENV, "").strip() or "1"
        if not raw.isdigit():
            raise ValueError(f"{NNODES_ENV}={raw!r}: expected a node count >= 1 (elastic min:max is not supported)")
        return cls(nnodes=int(raw), endpoint=env.get(RDZV_ENDPOINT_ENV) or None, job_id=env.get(RDZV_ID_ENV) or None,
                   backend=env.get(RDZV_BACKEND_ENV) or "c10d", conf=env.get(RDZV_CONF_ENV) or None)

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    def launcher_args(self, nproc: int, step: str) -> list[str]:
        """torch.distributed.run options joining this rendezvous with `nproc` local processes."""
        args = [f"--nnodes={self.nnodes}", f"--nproc_per_node={nproc}", f"--rdzv_backend={self.backend}",
                f"--rdzv_endpoint={self.endpoint}", f"--rdzv_id={self.job_id}-{step}"]
        if self.conf:
            args.append(f"--rdzv_conf={self.conf}")
        return args


@dataclass(frozen=True)
class StepJob:
    """One training step to run: which step, from which params file and shards, into which folder,
    starting from which model file (None: the segmentation step's ImageNet/random init), on how many
    processes of this node."""

    step: str
    params_path: Path
    shards_dir: Path
    out_dir: Path
    init_checkpoint: Path | None = None
    nproc: int = 1


def step_command(job: StepJob, mlflow_run_id: str | None, result_path: Path,
                 rendezvous: Rendezvous | None = None) -> list[str]:
    """argv that runs `job` on this node: plain python for one process on one node,
    torch.distributed.run --standalone for several, torch.distributed.run with the rendezvous
    for several nodes (even with one process each). rendezvous None: a single node."""
    launcher = [sys.executable]
    if rendezvous is not None and rendezvous.multi_node:
        launcher += ["-m", "torch.distributed.run", *rendezvous.launcher_args(job.nproc, job.step)]
    elif job.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.nproc}"]
    cmd = launcher + ["-m", "pipeline.training.step_main", "--step", job.step, "--params", str(job.params_path)]
    cmd += ["--shards", str(job.shards_dir), "--out", str(job.out_dir), "--result", str(result_path)]
    if job.init_checkpoint is not None:
        cmd += ["--init", str(job.init_checkpoint)]
    if mlflow_run_id is not None:
        cmd += ["--mlflow-run-id", mlflow_run_id]
    return cmd
