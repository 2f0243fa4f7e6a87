"""What a training step reports: the logger protocol it calls (rank 0 only) and its result.

The library never imports MLflow: the pipeline passes an object with these three methods.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from tqdm import tqdm


class TrainLogger(Protocol):
    def log_params(self, params: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, png_path: Path, artifact_name: str) -> None: ...


class PrintLogger:
    """A TrainLogger that prints one line per call (the CLI's default), through tqdm.write so that a
    progress bar on the terminal stays intact.

    iterations: also print the per-iteration calls (only "train/..." keys); off by default since the
    step's progress bar or plain lines (fusionnet.train.progress) already show the loss and lr.
    """

    def __init__(self, stream: TextIO | None = None, prefix: str = "", iterations: bool = False):
        self.stream = stream or sys.stdout
        self.prefix = prefix
        self.iterations = iterations

    def log_params(self, params: dict) -> None:
        self._print(f"{self.prefix}params {params}")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.iterations and metrics and all(k.startswith("train/") for k in metrics):
            return
        text = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        self._print(f"{self.prefix}[{step}] {text}")

    def log_image(self, png_path: Path, artifact_name: str) -> None:
        self._print(f"{self.prefix}image {artifact_name} -> {png_path}")

    def _print(self, line: str) -> None:
        tqdm.write(line, file=self.stream)
        self.stream.flush()


def _fmt(value: float) -> str:
    if isinstance(value, float) and not math.isnan(value) and value != 0 and abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class StepResult:
    """Outcome of `run_step` (the same on every rank).

    history: per-epoch dicts {"epoch" (1-based), "val_sad", "val_mse", "val_images", "train_loss",
    "samples_per_s", "data_wait_fraction", "iterations", "lr", "epoch_s", "val_s"}.
    initial_val: {"val_sad", "val_mse", "val_images", "val_s"} of the model before this step's first update.
    samples_per_s: training samples (all ranks) per second of training-loop time;
    data_wait_fraction: share of that time spent waiting for the next batch.
    """

    step: str
    out_dir: Path
    model_path: Path
    history_path: Path
    history: list[dict[str, Any]]
    initial_val: dict[str, float]
    samples_per_s: float
    data_wait_fraction: float
    iterations: int
    train_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_state(cls, step: str, out_dir: Path, model_file: str, history_file: str, state: dict[str, Any]) -> "StepResult":
        """From the trainer's state (its "history", "initial_val", "totals" and "iteration")."""
        totals = state["totals"]
        return cls(
            step=step, out_dir=out_dir, model_path=out_dir / model_file, history_path=out_dir / history_file,
            history=list(state["history"]), initial_val=dict(state["initial_val"] or {}),
            samples_per_s=totals["samples"] / totals["train_s"] if totals["train_s"] else math.nan,
            data_wait_fraction=totals["wait_s"] / totals["train_s"] if totals["train_s"] else math.nan,
            iterations=state["iteration"], train_s=totals["train_s"],
        )
