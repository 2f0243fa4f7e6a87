"""Resumable training state: state.pt, written atomically, loadable with torch.load(weights_only=True).

Holds only tensors and primitive containers (dict, list, tuple, str, int, float, bool, None), so
loading it cannot run code. Contents: model and optimizer state dicts, GradScaler state, progress
(epoch, batches consumed in it, global iteration), history so far, the per-iteration loss log,
timing accumulators and every RNG state (torch CPU, this process's GPU, numpy, python). The loss log
is not in it: it grows with the iterations (`fusionnet.train.losslog`, loss_log.jsonl beside it).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionnet.io.atomic import write_atomic

STATE_FILE = "state.pt"
STATE_FORMAT = "fusionnet.train_state.v1"


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG state as tensors / primitives; on a CUDA `device`, that GPU's generator only (a state
    saved for all 8 GPUs of one node could not be restored on a node with fewer)."""
    np_state = np.random.get_state()
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if device is not None and device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng(rng: dict[str, Any], device: torch.device | None = None) -> None:
    """Set every RNG `capture_rng` saved; the CUDA generator of `device` only (from a state of one GPU,
    or, in an older state holding one per GPU, the entry of this process's GPU when it has one)."""
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = rng.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # states written before: one per visible GPU
        index = device.index or 0
        if index >= len(cuda):
            return  # no saved generator for this GPU: it keeps its seeded state
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def save_state(path: Path, state: dict[str, Any]) -> Path:
    """torch.save to a temp sibling, then os.replace: a kill at any moment leaves the old or the new file."""
    return write_atomic(Path(path), lambda tmp: torch.save({"format": STATE_FORMAT, **state}, tmp), fsync=True)


def load_state(path: Path) -> dict[str, Any]:
    """Read a state.pt written by `save_state` (weights_only: tensors and primitives only)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign or pickled-object file: name it
        raise ValueError(f"{path}: not a readable training state ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a fusionnet training state (expected format {STATE_FORMAT!r})")
    return state
