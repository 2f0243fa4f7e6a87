"""A step's loss terms: summed on the device, reduced and checked every few iterations, kept in a JSONL file.

`LossWindow` adds each iteration's loss terms (and gradient norm) to a tensor on the training device,
so an iteration needs no host sync (a GPU runs ahead of Python); `flush` all-reduces the window over
the DDP ranks, copies it to the host once, checks it is finite (the NaN guard: at most `log_every`
iterations late) and returns the window's means. The trainer flushes every `log_every` iterations,
before every checkpoint and at every epoch end, so a checkpoint never holds a half-summed window.

`LossLog` is `loss_log.jsonl` beside state.pt: one row per flush {"iteration" (the window's last),
"epoch", "lr", "iterations" (in the window), "loss", "loss_*", "grad_norm"}. Appending keeps state.pt
the same size whatever the iteration count (300k rows pickled into every checkpoint took seconds);
a resumed step truncates the file to its checkpoint's iteration, so it ends as an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from fusionnet.io.atomic import write_text_atomic
from fusionnet.train.distributed import DistContext, all_reduce_mean

LOSS_LOG_FILE = "loss_log.jsonl"


class LossWindow:
    """Sums of named scalar terms over the iterations since the last flush, on their device."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sums: Tensor | None = None
        self.iterations = 0
        self.first_iteration = 0

    def add(self, terms: dict[str, Tensor], iteration: int) -> None:
        """One iteration's terms (0-dim tensors, any float dtype, on the training device). No host sync."""
        values = torch.stack([t.detach().float() for t in terms.values()])
        if self.sums is None:
            self.names, self.sums, self.first_iteration = list(terms), values.clone(), iteration
        else:
            self.sums += values
        self.iterations += 1

    def flush(self, ctx: DistContext, step: str, last_iteration: int) -> dict[str, float] | None:
        """The window's means over its iterations and every rank (one device->host copy), then empty;
        None when empty. Raises FloatingPointError naming the iterations when a term is not finite."""
        if self.sums is None:
            return None
        means = all_reduce_mean(self.sums / self.iterations, ctx).cpu().tolist()
        row = dict(zip(self.names, means))
        first, count = self.first_iteration, self.iterations
        self.__init__()
        bad = [k for k, v in row.items() if not math.isfinite(v)]
        if bad:
            span = f"iteration {last_iteration}" if count == 1 else f"iterations {first}-{last_iteration}"
            raise FloatingPointError(f"{step} step: {', '.join(bad)} not finite ({row[bad[0]]}) in {span}; "
                                     "lower the train lr (max_lr) or use fp32")
        return {"iterations": count, **row}


class LossLog:
    """`loss_log.jsonl` of one step (written by the main process only)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def start(self, upto_iteration: int) -> None:
        """Keep the rows up to `upto_iteration` (0: none) and drop the rest, e.g. rows a killed run
        wrote after its last checkpoint, or a half-written last line."""
        kept = [row for row in self.read() if row["iteration"] <= upto_iteration] if upto_iteration > 0 else []
        write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")

    def read(self, max_rows: int | None = None) -> list[dict[str, Any]]:
        """Every complete row in order; with max_rows, at most that many: consecutive rows merged
        into their mean (iteration and epoch: the last's), for plots of long runs."""
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a kill
                continue
        return downsample(rows, max_rows) if max_rows else rows


def downsample(rows: Sequence[dict[str, Any]], max_rows: int) -> list[dict[str, Any]]:
    """At most `max_rows` rows: runs of consecutive rows averaged (numeric keys), keeping the last
    row's iteration and epoch."""
    if len(rows) <= max_rows:
        return list(rows)
    group = math.ceil(len(rows) / max_rows)
    out = []
    for start in range(0, len(rows), group):
        chunk = rows[start : start + group]
        merged = {k: sum(r[k] for r in chunk) / len(chunk) for k in chunk[0] if k not in ("iteration", "epoch", "iterations")}
        merged.update(iteration=chunk[-1]["iteration"], epoch=chunk[-1]["epoch"],
                      iterations=sum(r.get("iterations", 1) for r in chunk))
        out.append(merged)
    return out
