"""CLI: one training step. Also runs under `torchrun --nproc_per_node N -m fusionnet.train ...`.

    python -m fusionnet.train --step segmentation --params params.yaml --shards data/shards \
        --out models/segmentation
    python -m fusionnet.train --step fusion --params params.yaml --shards data/shards \
        --init models/segmentation/model.safetensors --out models/fusion
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from fusionnet.train.config import DEVICES, PRECISIONS, STEPS, StepConfig
from fusionnet.train.loop import run_step
from fusionnet.train.tracking import PrintLogger


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusionnet.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", choices=STEPS, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--shards", type=Path, default=Path("data/shards"), help="dir with train/, val/, summary.json")
    parser.add_argument("--out", type=Path, required=True, help="step output dir, e.g. models/segmentation")
    parser.add_argument("--init", type=Path, default=None, help="previous step's model.safetensors")
    parser.add_argument("--device", choices=DEVICES, default=None, help="override train_common.device")
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help="override train_common.precision")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing out/state.pt")
    parser.add_argument("--quiet", action="store_true", help="no logger lines (params, validations, images); FUSIONNET_PROGRESS=off also hides the progress bar/lines")
    args = parser.parse_args(argv)

    if not args.params.is_file():
        parser.error(f"{args.params}: no such params file")
    try:
        params = yaml.safe_load(args.params.read_text())
    except yaml.YAMLError as exc:  # one line naming the file, not a parser traceback
        parser.error(f"{args.params}: not valid YAML ({' '.join(str(exc).split())})")
    if not isinstance(params, dict):
        parser.error(f"{args.params}: expected a mapping of params sections, got {type(params).__name__}")
    try:
        cfg = StepConfig.from_params(params, args.step)
    except ValueError as exc:
        parser.error(f"{args.params}: {exc}")
    overrides = {k: v for k, v in (("device", args.device), ("precision", args.precision)) if v is not None}
    if overrides:
        cfg = cfg.replace(**overrides)
    result = run_step(args.step, cfg, args.shards, args.out, init_checkpoint=args.init,
                      logger=None if args.quiet else PrintLogger(prefix=f"{args.step} "), resume=not args.no_resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    initial = result.initial_val.get("val_sad", float("nan"))
    final = result.history[-1]["val_sad"] if result.history else float("nan")
    print(f"{args.step}: {result.model_path} | val SAD {initial:.4f} -> {final:.4f} | "
          f"{result.samples_per_s:.2f} samples/s, data wait {result.data_wait_fraction:.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
