"""Triangular cyclical learning rate (Smith, "Cyclical Learning Rates", 2017; paper Sec. 3.4).

The rate rises linearly from `base_lr` to `max_lr` over one half-cycle, falls back to `base_lr` over
the next, and repeats. It is a pure function of the global iteration, so a resumed run needs no
scheduler state.
"""

from __future__ import annotations

import math


def triangular_lr(iteration: int, base_lr: float, max_lr: float, half_cycle_iters: int) -> float:
    """LR before optimizer step `iteration` (0-based): base at 0, max at half_cycle_iters, base at 2x.

    cycle = floor(1 + it / (2 h)); x = |it / h - 2 cycle + 1|; lr = base + (max - base) * max(0, 1 - x).
    """
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    if half_cycle_iters < 1:
        raise ValueError(f"half_cycle_iters must be >= 1, got {half_cycle_iters}")
    cycle = math.floor(1 + iteration / (2 * half_cycle_iters))
    x = abs(iteration / half_cycle_iters - 2 * cycle + 1)
    return base_lr + (max_lr - base_lr) * max(0.0, 1.0 - x)


def half_cycle_iterations(half_cycle_epochs: float, iters_per_epoch: int) -> int:
    """A half-cycle given in epochs (paper's code: 2) as a whole number of iterations, at least 1."""
    return max(1, round(half_cycle_epochs * iters_per_epoch))
