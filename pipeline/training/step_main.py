"""One training step in one process: `python -m pipeline.training.step_main` (under torchrun: one per GPU).

The Prefect task runs this as a subprocess so that a hard crash (a signal, an OOM kill) ends only
this process; the retried task resumes from out_dir/state.pt. Rank 0 logs to the MLflow child run
given by --mlflow-run-id.

Results: the first process of every node (LOCAL_RANK 0) writes a JSON result to --result, so the
task on each node sees its launcher succeed with a result. The node holding global rank 0 is the
"leader": its result is the StepResult plus {"node_role": "leader", "rank": 0, ...}. Every other
node is a "follower": the same fields, with out_dir / model_path / history_path in its own --out.

Several nodes (WORLD_SIZE > LOCAL_WORLD_SIZE, torchrun with a rendezvous, see pipeline/training/launch.py)
need not share a filesystem, and only rank 0 writes the trainer's files. So, between the node
leaders (LOCAL_RANK 0 of each node, a gloo group), by sha256 and only where a node's copy differs:
  - before training, the out_dir/state.pt (and model.safetensors beside it) of the node whose
    state.pt got furthest (rank 0 may sit on another node after a retry) are copied to every node's
    --out (a missing file removed there), so all nodes resume from the same iteration; and every
    node's --init must have rank 0's bytes (the follower's own copy, e.g. the previous step's
    mirrored model), else every rank stops with a ValueError before training;
  - after training, rank 0's model.safetensors and history.json are copied to every node's --out,
    so a follower can start the next step from its own copy. plots/ and the latest state.pt stay
    on rank 0's node only.
With a shared filesystem and the same --out everywhere the digests agree and nothing is copied;
--result must then differ per node (followers write theirs before rank 0 writes its own, so a
shared path ends up holding the leader's result).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusionnet.io.atomic import write_bytes_atomic, write_text_atomic
from fusionnet.io.hashing import file_sha256
from fusionnet.io.params import load_params
from fusionnet.train.config import STEPS, StepConfig
from fusionnet.train.loop import run_step
import pipeline  # noqa: F401  (applies the offline switches before mlflow is imported)

if TYPE_CHECKING:
    from fusionnet.train.distributed import DistContext

MIRRORED_BEFORE = ("state.pt", "model.safetensors")
MIRRORED_AFTER = ("model.safetensors", "history.json")


@dataclass(frozen=True)
class NodePlace:
    """This process in the launch, from torchrun's env (a lone process: rank 0 of 1 on node 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    nnodes: int = 1

    @classmethod
    def from_env(cls) -> NodePlace:
        get = lambda key, default: int(os.environ.get(key, default))  # noqa: E731
        world = get("WORLD_SIZE", 1)
        local_world = get("LOCAL_WORLD_SIZE", world)
        return cls(get("RANK", 0), world, get("LOCAL_RANK", 0), local_world, get("GROUP_RANK", 0),
                   get("GROUP_WORLD_SIZE", max(1, world // max(1, local_world))))

    @property
    def multi_node(self) -> bool:
        return self.world_size > self.local_world_size

    @property
    def role(self) -> str:
        """'leader' on the node holding global rank 0, else 'follower'."""
        return "leader" if self.rank - self.local_rank == 0 else "follower"

    def fields(self) -> dict[str, Any]:
        return {"node_role": self.role, "rank": self.rank, "world_size": self.world_size,
                "node_rank": self.node_rank, "nnodes": self.nnodes, "local_world_size": self.local_world_size}


def _jsonable(result: Any) -> dict[str, Any]:
    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(vars(result))
    return json.loads(json.dumps(data, default=str))  # Paths and numpy scalars as strings/numbers


def _digest(path: Path | None) -> str | None:
    return file_sha256(path) if path is not None and path.is_file() else None


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(doc, indent=1))


class NodeLeaders:
    """Collectives between the LOCAL_RANK 0 processes of all nodes (gloo, also beside nccl).
    Construct on every rank (a collective); call gather / mirror on node leaders only."""

    def __init__(self, place: NodePlace):
        import torch.distributed as dist

        self.dist, self.place = dist, place
        local_ranks: list[Any] = [None] * place.world_size
        dist.all_gather_object(local_ranks, place.local_rank)
        leaders = [r for r, lr in enumerate(local_ranks) if lr == 0]
        self.group = dist.new_group(ranks=leaders, backend="gloo")  # every rank must call new_group
        self.size = len(leaders)

    def gather(self, item: Any) -> list[Any]:
        """`item` of every node leader, in global-rank order (index 0: rank 0)."""
        views: list[Any] = [None] * self.size
        self.dist.all_gather_object(views, item, group=self.group)
        return views

    def mirror(self, paths: list[Path], src: int = 0) -> list[Path]:
        """Make this node's `paths` equal to those of global rank `src` (a node leader): bytes, or absence.
        Only differing files travel (sha256). Returns the paths rewritten on this node."""
        mine = [_digest(p) for p in paths]
        views = dict(self.gather((self.place.rank, mine)))
        source, copied = views[src], []
        for i, path in enumerate(paths):
            if all(view[i] == source[i] for view in views.values()):
                continue  # the same bytes everywhere (or a shared filesystem): nothing to send
            box = [path.read_bytes() if self.place.rank == src and source[i] is not None else None]
            self.dist.broadcast_object_list(box, src=src, group=self.group)
            if self.place.rank != src and mine[i] != source[i]:
                path.unlink(missing_ok=True)
                if box[0] is not None:
                    write_bytes_atomic(path, box[0])
                copied.append(path)
        return copied


def _progress(state_path: Path) -> tuple[int, int]:
    """(finished, iteration) of a state.pt, (-1, -1) when missing or unreadable; mmap: tensors stay on disk."""
    import torch

    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
        return int(bool(state["finished"])), int(state["iteration"])
    except Exception:  # noqa: BLE001  (missing, torn or foreign: nothing to resume)
        return -1, -1


def _before_training(ctx: DistContext, place: NodePlace, leaders: NodeLeaders | None, out: Path, init: Path | None) -> None:
    """Multi-node: the most advanced resume files on every node; the same --init everywhere (else
    ValueError on all ranks). `leaders` on node leaders, None on the other local ranks."""
    from fusionnet.train.distributed import barrier, broadcast_object

    problem = None
    if leaders is not None:
        views = leaders.gather((place.rank, _progress(out / MIRRORED_BEFORE[0]), _digest(init)))
        # which node holds rank 0 is torch's choice per launch (hostname, pid): a retry may move it,
        # so the source is the node whose state.pt got furthest (ties: the lowest rank), not rank 0
        src = max(views, key=lambda view: (view[1], -view[0]))[0]
        copied = leaders.mirror([out / name for name in MIRRORED_BEFORE], src)
        if copied:
            print(f"rank {place.rank}: copied rank {src}'s {', '.join(p.name for p in copied)} into {out}", flush=True)
        bad = [rank for rank, _, digest in views if digest != views[0][2]]
        if bad:
            problem = (f"--init {init}: the nodes of ranks {bad} hold other bytes (or none) than rank 0's node; "
                       "every node must start the step from the same checkpoint")
    problem = broadcast_object(problem, ctx)  # rank 0 (a node leader) decides for all ranks
    if problem:
        raise ValueError(problem)
    barrier(ctx)  # the mirrored files are in place before any local rank reads them


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--step", choices=STEPS, required=True)
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", type=Path, default=None)
    parser.add_argument("--mlflow-run-id", default=None)
    parser.add_argument("--result", type=Path, default=None)
    args = parser.parse_args(argv)

    params = load_params(args.params)
    cfg = StepConfig.from_params(params, args.step)
    place = NodePlace.from_env()
    is_rank0, is_node_leader = place.rank == 0, place.local_rank == 0
    ctx = leaders = None
    if place.multi_node:
        from fusionnet.train.distributed import init_distributed

        ctx = init_distributed(cfg.device)  # run_step joins this group and leaves it open for the copies after
        leaders = NodeLeaders(place)
    try:
        if place.multi_node:
            _before_training(ctx, place, leaders if is_node_leader else None, args.out, args.init)
        result = _train(args, cfg, is_rank0)
        doc = {**_jsonable(result), **place.fields()}
        if place.multi_node:
            from fusionnet.train.distributed import barrier

            if is_node_leader:
                leaders.mirror([args.out / name for name in MIRRORED_AFTER])
            doc["model_sha256"] = _digest(Path(doc["model_path"])) if is_node_leader else None
            if is_node_leader and not is_rank0 and args.result is not None:
                _write_json(args.result, doc)
            barrier(ctx)  # followers first: on a shared --result path the leader's result is the last word
        elif is_rank0:
            doc["model_sha256"] = _digest(Path(doc["model_path"]))
        if is_rank0 and args.result is not None:
            _write_json(args.result, doc)
    finally:
        if ctx is not None:
            from fusionnet.train.distributed import shutdown

            shutdown(ctx)
    return 0


def _train(args: argparse.Namespace, cfg: StepConfig, is_rank0: bool):
    """run_step with rank 0's MLflow/progress logger; what was logged before a crash stays in the run."""
    logger = None
    if is_rank0 and args.mlflow_run_id:
        from pipeline.tracking.runs import MlflowTrainLogger

        logger = MlflowTrainLogger(args.mlflow_run_id)
    if is_rank0:
        logger = ProgressLogger(args.step, logger)
    try:
        return run_step(args.step, cfg, args.shards, args.out, init_checkpoint=args.init, logger=logger, resume=True)
    finally:
        if logger is not None:
            logger.flush()


class ProgressLogger:
    """Forwards to `inner` (MLflow) and prints each validation; iterations show in the step's
    progress display (fusionnet.train.progress: a bar on a terminal, a few plain lines in logs)."""

    def __init__(self, step: str, inner=None):
        self.step, self.inner = step, inner

    def log_params(self, params: dict) -> None:
        if self.inner is not None:
            self.inner.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.inner is not None:
            self.inner.log_metrics(metrics, step)
        if any(k.startswith("val") for k in metrics):
            from tqdm import tqdm

            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            # through tqdm, so a bar on the same terminal is redrawn below the line, not broken
            tqdm.write(f"[{self.step}] validation @ iteration {step}: {text}", file=sys.stdout)
            sys.stdout.flush()

    def log_image(self, png_path: Path, artifact_name: str) -> None:
        if self.inner is not None:
            self.inner.log_image(png_path, artifact_name)

    def flush(self) -> None:
        if self.inner is not None and hasattr(self.inner, "flush"):
            self.inner.flush()


if __name__ == "__main__":
    sys.exit(main())
