"""The forward pass and loss of each training step (paper Sec. 3.2-3.4, Eq. 6-10).

- segmentation: L_F + L_B on all four side outputs of both decoders (`segmentation_step_loss`);
  only the encoder and decoders run: the fusion network is most of the compute at full resolution
  and gets no gradient in this step.
- fusion: L_u (paper Eq. 8) on the blended alpha (`fusion_loss`).
- joint: L_J = L_u + w1 (L_F + L_B) + w2 L_s (paper Eq. 9, `joint_loss`).
Losses are computed in float32 even when the network ran under bf16/fp16 autocast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fusionnet.losses import fusion_loss, joint_loss, segmentation_step_loss
from fusionnet.model import LateFusionNet, MattingOutput
from fusionnet.train.config import StepConfig


class SideOutputs(NamedTuple):
    """The four side outputs of each decoder, `(N,1,H,W)` at input size, coarse to fine (1/8 .. 1/1).

    Has the attributes `fusionnet.losses.side_losses` reads, so it stands in for a MattingOutput there.
    """

    fg_sides: tuple[Tensor, ...]
    bg_sides: tuple[Tensor, ...]
    fg_side_logits: tuple[Tensor, ...]
    bg_side_logits: tuple[Tensor, ...]


class SegmentationNet(nn.Module):
    """Encoder + both decoders of a LateFusionNet (shared weights), without the fusion network.

    `LateFusionNet.segment` plus the sigmoids; tests check it against the full forward.
    A module (not a function) so DistributedDataParallel can wrap it.
    """

    def __init__(self, net: LateFusionNet):
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> SideOutputs:
        seg = self.net.segment(image)
        return SideOutputs(
            tuple(torch.sigmoid(t) for t in seg.fg_side_logits),
            tuple(torch.sigmoid(t) for t in seg.bg_side_logits),
            seg.fg_side_logits,
            seg.bg_side_logits,
        )


def step_module(model: LateFusionNet, step: str) -> nn.Module:
    """The module a step calls (and DDP wraps): the segmentation part alone in step 1, else the model."""
    return SegmentationNet(model) if step == "segmentation" else model


def _float(x):
    if isinstance(x, Tensor):
        return x.float()
    return tuple(t.float() for t in x)


def to_float32(output: MattingOutput | SideOutputs) -> MattingOutput | SideOutputs:
    """The same outputs in float32 (autocast leaves them bf16/fp16)."""
    if isinstance(output, SideOutputs):
        return SideOutputs(*(_float(v) for v in output))
    return MattingOutput(**{k: _float(v) for k, v in output.to_dict().items()})


def step_loss(step: str, output: MattingOutput | SideOutputs, alpha: Tensor, cfg: StepConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """(total loss to back-propagate, named loss terms) for `step`; `alpha` `(N,1,H,W)` in [0,1]."""
    output = to_float32(output)
    if step == "segmentation":
        seg = segmentation_step_loss(output, alpha)  # type: ignore[arg-type]  # SideOutputs duck-types it
        return seg.total, {"loss": seg.total, "loss_fg": seg.fg, "loss_bg": seg.bg}
    if step == "fusion":
        loss_u = fusion_loss(output.alpha, alpha)  # type: ignore[union-attr]
        return loss_u, {"loss": loss_u}
    if step == "joint":
        j = joint_loss(output, alpha, w1=cfg.side_weight, w2=cfg.sparsity_weight, gamma=cfg.sparsity_gamma)  # type: ignore[arg-type]
        terms = {"loss": j.total, "loss_fusion": j.fusion, "loss_fg": j.fg, "loss_bg": j.bg, "loss_sparsity": j.sparsity}
        return j.total, terms
    raise ValueError(f"unknown step {step!r}")


def accumulate_gradients(module: nn.Module, batches: Iterator[dict], accumulation: int, step: str, cfg: StepConfig,
                         device: torch.device, autocast: Callable[[], AbstractContextManager],
                         scaler: torch.amp.GradScaler, distributed: bool) -> tuple[dict[str, Tensor], float]:
    """Forward and backward `accumulation` micro-batches from `batches` into the gradients (the caller
    zeroes them before and steps after): the gradient of the mean loss over the global batch.

    Returns (the step's loss terms, means over the micro-batches, still on the device: no host sync;
    seconds spent waiting for `batches`). distributed: `module` is DDP-wrapped, and all-reduces
    gradients on the last micro-batch only.
    """
    terms_sum: dict[str, Tensor] = {}
    wait_s = 0.0
    for micro in range(accumulation):
        t0 = time.perf_counter()
        batch = next(batches)
        wait_s += time.perf_counter() - t0
        image = batch["image"].to(device, non_blocking=True)
        alpha = batch["alpha"].to(device, non_blocking=True)
        if cfg.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        sync = module.no_sync() if distributed and micro < accumulation - 1 else nullcontext()  # type: ignore[operator]
        with sync:
            with autocast():
                output = module(image)
            with torch.autocast(device.type, enabled=False):  # every loss in float32
                loss, terms = step_loss(step, output, alpha, cfg)
            scaler.scale(loss / accumulation).backward()
        for name, value in terms.items():
            part = value.detach() / accumulation
            terms_sum[name] = part if name not in terms_sum else terms_sum[name] + part
    return terms_sum, wait_s
