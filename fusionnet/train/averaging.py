"""An exponential moving average (EMA) of a step's weights, validated and handed on instead of the last ones.

With 12 training photos the segmentation step's validation SAD jumps by +-1 between checkpoints 36
iterations apart (2 validation photos): the weights wander around a good region rather than settle.
Averaging the iterates (Polyak; the EMA as in TensorFlow's ExponentialMovingAverage, timm's ModelEmaV3)
evens that out. Not in the paper, whose 8-GPU runs have 43k composites and keep the last weights.

    average_t = d_t * average_{t-1} + (1 - d_t) * weights_t,   d_t = min(decay, (1 + t) / (10 + t))

The warm-up d_t lets a short step's average forget the init quickly (t counts optimizer steps in this
step). Every floating-point entry of the model's state_dict is averaged (the trained BatchNorms'
running statistics too); integer buffers (num_batches_tracked) are the live model's. The update is a
fused in-place lerp on the weights' own device: no host sync per iteration.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn


def ema_decay_at(decay: float, updates: int) -> float:
    """d_t for the `updates`-th update (1-based): the warm-up min(decay, (1 + t) / (10 + t))."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def _averaged(model: nn.Module) -> dict[str, Tensor]:
    return {name: value for name, value in model.state_dict().items() if value.is_floating_point()}


class WeightAverage:
    """EMA of `model`'s floating-point state; `decay` in (0, 1). Shapes and devices are the model's."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"params train_common.ema_decay must be in (0, 1) or null, got {decay}")
        self.decay = float(decay)
        self.names = list(_averaged(model))
        self.average = [value.detach().clone() for value in _averaged(model).values()]
        self.updates = 0

    def _live(self, model: nn.Module) -> list[Tensor]:
        live = _averaged(model)
        if list(live) != self.names:
            raise ValueError("the model's floating-point state differs from the averaged one")
        return [value.detach() for value in live.values()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights in (after each optimizer step)."""
        self.updates += 1
        torch._foreach_lerp_(self.average, self._live(model), 1.0 - ema_decay_at(self.decay, self.updates))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Make the average the model's weights (a step that keeps its last weights hands it on)."""
        torch._foreach_copy_(self._live(model), self.average)

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[None]:
        """Within the block `model` holds the average; its own weights come back exactly after."""
        live = self._live(model)
        saved = [value.clone() for value in live]
        torch._foreach_copy_(live, self.average)
        try:
            yield
        finally:
            torch._foreach_copy_(live, saved)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates,
                "average": {name: value.detach().cpu() for name, value in zip(self.names, self.average)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["average"]) != self.names:
            raise ValueError("saved weight average does not match the model's state")
        for mine, saved in zip(self.average, state["average"].values()):
            mine.copy_(saved)
        self.updates = int(state["updates"])
