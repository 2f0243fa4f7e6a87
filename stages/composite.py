"""Stage composite: composite every foreground over backgrounds into data/composites/ (DIM recipe).

Reads params: seed, composite.* (nothing else); input data/foregrounds (from collect_foregrounds, whose
manifest carries each DIM foreground's position in its name list, for DIM's background pairing).
Composites at the foreground's stored size, then downscales image and alpha together to composite.max_side.
Writes train/ and test/ (image, alpha, trimap PNGs), manifest.parquet and contact_sheet.png.
Usage: python stages/composite.py --params params.yaml --foregrounds data/foregrounds --out data/composites
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


from fusionnet.data.backgrounds import background_lists_from_params, backgrounds_from_params
from fusionnet.data.collect import read_manifest
from fusionnet.data.composite import CompositeConfig, build_composites
from fusionnet.io.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--foregrounds", type=Path, default=Path("data/foregrounds"))
    parser.add_argument("--out", type=Path, default=Path("data/composites"))
    parser.add_argument("--workers", type=int, default=2, help="worker processes (does not change the output)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    params = load_params(args.params)
    section = params["composite"]
    config = CompositeConfig.from_params(params, workers=args.workers)
    seed = config.seed
    foregrounds = read_manifest(args.foregrounds)
    backgrounds, test_backgrounds = backgrounds_from_params(section, seed, args.params.resolve().parent)
    listed = background_lists_from_params(section, args.params.resolve().parent)
    try:
        rows, pools = build_composites(foregrounds, args.foregrounds, backgrounds, test_backgrounds, args.out, config,
                                       listed)
    except ValueError as err:  # bad pairing input or a bad file: the message names it
        print(f"composite: error: {err}", file=sys.stderr)
        return 1
    if not pools.disjoint:
        print(f"composite: warning: some test composites use backgrounds that train/val composites also use "
              f"({len(backgrounds)} backgrounds for bg_per_fg + bg_per_test_fg = "
              f"{config.bg_per_fg + config.bg_per_test_fg}, or train and test name lists that overlap)",
              file=sys.stderr)
    paired = [group for group in ("train", "test") if group in listed
              and any(r["source"] == "dim" and (r["split"] == "test") == (group == "test") for r in foregrounds)]
    if paired:
        print(f"composite: DIM pairing (foreground i of its name list -> list entries i*n..i*n+n-1) for "
              f"{' and '.join(paired)} from {', '.join(str(listed[g].path) for g in paired)}")
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    print(f"composite: {len(rows)} composites (train {counts['train']}, val {counts['val']}, test {counts['test']}) "
          f"from {len(foregrounds)} foregrounds; background pools train {len(pools.train)}, test {len(pools.test)} "
          f"(disjoint: {pools.disjoint}) -> {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
