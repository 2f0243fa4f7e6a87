"""Stage collect_foregrounds: validate and normalise every foreground into data/foregrounds/.

Reads params: seed, foregrounds.* (nothing else). Foregrounds are stored at their source size, so the
composite stage can composite at full size and downscale image and alpha together; the optional
foregrounds.max_side (default null = no cap) only caps enormous files, before F estimation.
Usage: python stages/collect_foregrounds.py --params params.yaml --out data/foregrounds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from fusionnet.data.collect import CollectConfig, InvalidForegroundError, collect_foregrounds, invalid_message
from fusionnet.data.sources import candidates_from_params
from fusionnet.io.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path("data/foregrounds"))
    parser.add_argument("--workers", type=int, default=2, help="worker processes (does not change the output)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    params = load_params(args.params)
    section = params["foregrounds"]
    config = CollectConfig.from_params(params, workers=args.workers)
    # data roots in params.yaml are relative to the project root, where params.yaml lives
    candidates = candidates_from_params(section, args.params.resolve().parent)
    try:
        result = collect_foregrounds(candidates, args.out, config)
    except InvalidForegroundError as err:
        print(err, file=sys.stderr)
        return 1
    if result.invalid:
        print(invalid_message(result.invalid, excluded=True), file=sys.stderr)
    counts = result.split_counts()
    print(f"collect_foregrounds: {len(result.rows)} foregrounds from source '{section.get('source')}' "
          f"(train {counts['train']}, val {counts['val']}, test {counts['test']}; "
          f"{len(result.invalid)} invalid) -> {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
