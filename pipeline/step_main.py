"""One training step in one process: `python -m pipeline.step_main` (under torchrun: one per GPU).

The Prefect task runs this as a subprocess so that a hard crash (a signal, an OOM kill) ends only
this process; the retried task resumes from out_dir/state.pt. Rank 0 logs to the MLflow child run
given by --mlflow-run-id and writes the StepResult as JSON to --result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  (applies the offline switches before mlflow is imported)
import yaml
from fusionnet.checkpoint import atomic_write_path
from fusionnet.train import STEPS, StepConfig, run_step


def _jsonable(result: Any) -> dict[str, Any]:
    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(vars(result))
    return json.loads(json.dumps(data, default=str))  # Paths and numpy scalars as strings/numbers


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

    params = yaml.safe_load(args.params.read_text())
    cfg = StepConfig.from_params(params, args.step)
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    logger = None
    if is_rank0 and args.mlflow_run_id:
        from pipeline.tracking import MlflowTrainLogger

        logger = MlflowTrainLogger(args.mlflow_run_id)
    if is_rank0:
        logger = ProgressLogger(args.step, logger)
    try:
        result = run_step(args.step, cfg, args.shards, args.out, init_checkpoint=args.init, logger=logger, resume=True)
    finally:
        if logger is not None:
            logger.flush()  # what the step logged before a crash stays in the run
    if is_rank0 and args.result is not None:
        tmp = atomic_write_path(args.result)
        tmp.write_text(json.dumps(_jsonable(result), indent=1))
        os.replace(tmp, args.result)
    return 0


class ProgressLogger:
    """Forwards to `inner` (MLflow) and prints a line every `every` iterations and per epoch,
    so a person watching `dvc repro` sees the step move."""

    def __init__(self, step: str, inner=None, every: int = 10):
        self.step, self.inner, self.every = step, inner, every

    def log_params(self, params: dict) -> None:
        if self.inner is not None:
            self.inner.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.inner is not None:
            self.inner.log_metrics(metrics, step)
        per_epoch = any(k.startswith("val") for k in metrics)
        if per_epoch or step % self.every == 0:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"[{self.step}] {'validation' if per_epoch else 'iteration'} @ iteration {step}: {text}", flush=True)

    def log_image(self, png_path: Path, artifact_name: str) -> None:
        if self.inner is not None:
            self.inner.log_image(png_path, artifact_name)

    def flush(self) -> None:
        if self.inner is not None and hasattr(self.inner, "flush"):
            self.inner.flush()


if __name__ == "__main__":
    sys.exit(main())
