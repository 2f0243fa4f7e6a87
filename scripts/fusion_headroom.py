"""How much the fusion step can win: Eq. 2's headroom over the segmentation model, on validation.

    .venv/bin/python scripts/fusion_headroom.py [--models models] [--shards data/shards] [--max-images 24]

For each model in <models>/{segmentation,fusion,joint}/model.safetensors, on the whole validation
composites at working size, in the "-25" band of each (the band validation and the test score):
- agree: share of transition pixels (0.05 < alpha < 0.95) where |F - (1 - B)| < 0.02, so Eq. 2 gives
  alpha = F whatever beta is (Eq. 3) and the fusion loss has no gradient for beta there;
- bracketed: share of transition pixels whose true alpha lies between F and 1 - B (Fig. 4);
- band SAD (/1000) of alpha = F, alpha = 1 - B, beta = 0.5 (the fusion step's start), the model's own
  beta, and the oracle beta (per pixel the beta that brings Eq. 2 closest to the truth: the best any
  fusion network could do with these F and B).
If the oracle is barely below beta = 0.5, F and B leave the fusion network nothing to blend.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fusionnet.data.dataset import ShardDataset
from fusionnet.losses import KNOWN_THRESHOLD
from fusionnet.metrics import sad, transition_band
from fusionnet.model.checkpoint import load
from fusionnet.model.geometry import pad_to_multiple
from fusionnet.train.config import STEPS
from fusionnet.train.data import open_split, val_band_radii
from fusionnet.train.validate import _CroppedOutput


@torch.no_grad()
def headroom(model_path: Path, val: ShardDataset, radii: list[int], picks: np.ndarray) -> dict[str, float]:
    """The figures above for one model on the validation rows `picks` (each with its band radius)."""
    model = load(model_path).eval()
    count = len(picks)
    sums = {k: 0.0 for k in ("F", "1-B", "beta=0.5", "model beta", "oracle beta")}
    agree = bracketed = transition = 0
    for index in picks:
        row = val[int(index)]
        image, gt = row["image"][None], row["alpha"][0].numpy().astype(np.float64)
        height, width = image.shape[-2:]
        out = _CroppedOutput(model(pad_to_multiple(image, model.stride)), height, width)
        fg, one_minus_bg = out.fg_prob[0, 0].double().numpy(), 1 - out.bg_prob[0, 0].double().numpy()
        lo, hi = np.minimum(fg, one_minus_bg), np.maximum(fg, one_minus_bg)
        trans = (gt > KNOWN_THRESHOLD) & (gt < 1 - KNOWN_THRESHOLD)  # the losses' transition region
        transition += int(trans.sum())
        agree += int((trans & (hi - lo < 0.02)).sum())
        bracketed += int((trans & (lo <= gt) & (gt <= hi)).sum())
        band = transition_band(gt, radii[int(index)])
        for name, alpha in (("F", fg), ("1-B", one_minus_bg), ("beta=0.5", (fg + one_minus_bg) / 2),
                            ("model beta", out.alpha[0, 0].double().numpy()), ("oracle beta", np.clip(gt, lo, hi))):
            sums[name] += sad(alpha, gt, band)
    result = {f"sad {k}": v / count for k, v in sums.items()}
    result.update({"agree share": agree / max(transition, 1), "bracketed share": bracketed / max(transition, 1),
                   "images": count})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models")
    parser.add_argument("--shards", default="data/shards")
    parser.add_argument("--band-radius", type=int, default=25)
    parser.add_argument("--max-images", type=int, default=24)
    args = parser.parse_args()
    val = open_split(Path(args.shards), "val")  # read once for the three models
    radii = val_band_radii(val, args.band_radius)
    count = len(val) if args.max_images is None else min(args.max_images, len(val))
    picks = np.linspace(0, len(val) - 1, count).round().astype(int)
    rows = {}
    for step in STEPS:
        path = Path(args.models) / step / "model.safetensors"
        if path.is_file():
            rows[step] = headroom(path, val, radii, picks)
    keys = list(next(iter(rows.values()))) if rows else []
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for step, r in rows.items():
        print(f"| {step} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    print(json.dumps(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
