"""DVC stage `shard_crops`: composites -> Parquet shards (train composites; val crops or whole val composites).

Reads params `seed` and `crops`; writes data/shards/{train,val}/shard-*.parquet and
data/shards/summary.json (see fusionnet.data.shards). The training crops and warm-up images are cut
afresh every epoch from the stored train composites (fusionnet.data.sampling).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


from fusionnet.data.crops import CropParams
from fusionnet.data.shards import build_shards
from fusionnet.io.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--composites", type=Path, default=Path("data/composites"))
    parser.add_argument("--out", type=Path, default=Path("data/shards"))
    parser.add_argument("--workers", type=int, default=2, help="processes cutting crops (output is the same)")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    if not isinstance(params, dict) or "seed" not in params:
        parser.error(f"{args.params}: needs top-level keys `seed` and `crops`")
    try:
        crop_params = CropParams.from_params(params)
    except ValueError as exc:
        parser.error(f"{args.params}: {exc}")

    start = time.perf_counter()
    summary = build_shards(args.composites, args.out, crop_params, int(params["seed"]), workers=args.workers)
    elapsed = time.perf_counter() - start
    print(json.dumps(summary))
    mib = (summary["train"]["bytes"] + summary["val"]["bytes"]) / 2**20
    print(f"shard_crops: {summary['train']['rows']} train composites, {summary['val']['rows']} val "
          f"{'composites (whole)' if crop_params.val_whole else 'crops'}, "
          f"{mib:.1f} MiB in {elapsed:.1f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
