"""Stages train_seg, train_fusion, train_joint: one training step, run by the Prefect flow in-process.

Reads params: seed, model, train_common and the step's own section (train_seg | train_fusion |
train_joint); input data/shards and, after segmentation, the previous step's model.
Writes --out (model.safetensors, state.pt, history.json, plots/). Without PREFECT_API_URL the
flow runs against Prefect's temporary local server on 127.0.0.1; MLflow logs one child run
under the pipeline run's parent (see docs/orchestration.md). With `orchestration.dispatch:
deployment` the step runs on a worker of that deployment instead (pipeline.training.dispatch) and its
outputs come back into --out, verified by sha256.
Usage: python stages/train.py --step segmentation --params params.yaml --shards data/shards \
           --out models/segmentation [--init models/segmentation/model.safetensors]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fusionnet.io.params import load_params
from pipeline.training.dispatch import DispatchSettings, dispatch_step
from pipeline.env import wait_for_prefect_api
from pipeline.training.steps import STEPS, train_one_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", choices=STEPS, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--shards", type=Path, default=Path("data/shards"))
    parser.add_argument("--out", type=Path, required=True, help="step output dir, e.g. models/segmentation")
    parser.add_argument("--init", type=Path, default=None, help="previous step's model.safetensors")
    parser.add_argument("--nproc", type=int, default=None, help="processes (default: one per visible GPU)")
    args = parser.parse_args(argv)
    settings = DispatchSettings.from_params(load_params(args.params), str(args.params))
    wait_for_prefect_api()
    if settings.dispatch == "deployment":
        model_path = dispatch_step(args.step, args.params, args.shards, args.out, args.init, settings)
        print(f"train {args.step}: {model_path}")
        return 0
    model_path = train_one_step(
        step=args.step,
        params_path=str(args.params),
        shards_dir=str(args.shards),
        out_dir=str(args.out),
        init_checkpoint=str(args.init) if args.init else None,
        nproc_per_node=args.nproc,
    )
    print(f"train {args.step}: {model_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
