"""Process-wide torch settings a training step needs, applied for the step and given back after it.

- threads: `train_common.threads` intra-op threads (None: torch's default);
- CPU + `deterministic`: deterministic algorithms (exact kill-and-resume), without NaN-filling new
  tensors (a debugging aid, on by default, that costs ~6% of a CPU step);
- CUDA: `cudnn.benchmark` on: a step's shapes are fixed (crops of one size, whole batches only), so
  cuDNN's autotuner picks each convolution's fastest algorithm once and reuses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def training_settings(device: torch.device, threads: int | None, deterministic: bool) -> Iterator[None]:
    """Apply the settings above for the body; restore the caller's on exit (also on an error)."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark)
    try:
        if threads:
            torch.set_num_threads(threads)
        if device.type == "cpu" and deterministic:
            torch.use_deterministic_algorithms(True)
            torch.utils.deterministic.fill_uninitialized_memory = False
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]
        torch.backends.cudnn.benchmark = saved[3]
