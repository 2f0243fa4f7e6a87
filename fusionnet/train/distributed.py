"""DistributedDataParallel plumbing: one process per GPU (or per CPU slot with gloo), set up by torchrun.

`torchrun --nproc_per_node N -m fusionnet.train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; without
them the step runs in a single process. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fusionnet.hardware import resolve_device


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str, timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank, name="params train_common.device")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world_size, local_rank, device)


# torch >= 2.15 renamed DDP's broadcast_buffers (deprecated, warns) to forward_sync_buffers; both keep
# the sync at construction, so every rank starts from rank 0's buffers
SYNC_BUFFERS_ARG = ("forward_sync_buffers" if "forward_sync_buffers" in
                    inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")


def ddp_options(module: nn.Module, device: torch.device) -> dict:
    """DistributedDataParallel keyword arguments for `module` as the step trains it (call after
    `set_train_mode`).

    broadcast_buffers (forward_sync_buffers in newer torch): only when a BatchNorm of the module updates its running statistics (train
    mode); in a step whose BatchNorms are all frozen (joint, or fusion's frozen segmentation network
    with a fusion network of none) the buffers never change, and broadcasting them before every
    forward is wasted traffic. gradient_as_bucket_view: gradients live in DDP's all-reduce buckets,
    saving a copy and the memory of one set of gradients.
    """
    updates_stats = any(m.training and m.track_running_stats for m in module.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm))
    return {"device_ids": [device.index] if device.type == "cuda" else None,
            SYNC_BUFFERS_ARG: updates_stats, "gradient_as_bucket_view": True}


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks of a small tensor (identity when alone)."""
    if not ctx.enabled:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean over ranks of a small float tensor (identity when alone)."""
    return all_reduce_sum(values, ctx) / ctx.world_size if ctx.enabled else values


def broadcast_object(obj: object, ctx: DistContext) -> object:
    """Rank 0's Python object on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
