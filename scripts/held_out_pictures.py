"""A picture of each held-out photo: input | predicted alpha | cut-out over a colour, one row each.

    .venv/bin/python scripts/held_out_pictures.py [--model models/joint/model.safetensors]
        [--photos GT02 GT07 GT09 GT16] [--out docs/photos-held-out.png] [--max-side N]

The photos come from ../shared/data/alphamatting-dev; the matte is what `fusionnet matte` gives
(opened as `fusionnet matte` opens it: the network at the model's own working scale unless --max-side,
then the guided filter at full size with the radius/eps that evaluate chose, read from
metrics/details.json when present; fp32, the evaluation's reference precision).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from fusionnet.inference.opening import open_model
from fusionnet.io.images import load_image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "alphamatting-dev"
ROW_HEIGHT = 240
COLOUR = np.array([0.20, 0.65, 0.30])  # green: a cut-out's fringe shows against it


def guided_filter_settings() -> dict:
    details = ROOT / "metrics" / "details.json"
    if details.is_file():
        chosen = json.loads(details.read_text()).get("guided_filter") or {}
        if "radius" in chosen and "eps" in chosen:
            return {"radius": int(chosen["radius"]), "eps": float(chosen["eps"])}
    return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/joint/model.safetensors")
    parser.add_argument("--photos", nargs="+", default=["GT02", "GT07", "GT09", "GT16"])
    parser.add_argument("--out", default="docs/photos-held-out.png")
    parser.add_argument("--max-side", type=int, default=None, help="network input's longer side (default: the model's)")
    args = parser.parse_args()
    if not PHOTOS.is_dir():
        raise SystemExit(f"{PHOTOS}: not there (the held-out photos live in ../shared/data)")
    opened = open_model(args.model, device="cpu", max_side=args.max_side, precision="fp32", refine=True,
                        **guided_filter_settings())
    matter = opened.matter
    rows = []
    for name in args.photos:
        rgb = load_image(PHOTOS / "image" / f"{name}.png").rgb  # (H,W,3) float [0,1]
        alpha = np.clip(matter(rgb).alpha, 0, 1)[..., None]
        cutout = alpha * rgb + (1 - alpha) * COLOUR
        row = np.hstack([rgb, np.repeat(alpha, 3, axis=2), cutout])
        scale = ROW_HEIGHT / row.shape[0]
        rows.append(cv2.resize(row.astype(np.float32), (round(row.shape[1] * scale), ROW_HEIGHT), interpolation=cv2.INTER_AREA))
    width = max(r.shape[1] for r in rows)
    grid = np.vstack([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=1.0) for r in rows])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor((grid * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR))
    print(f"{out}: {', '.join(args.photos)} (input | alpha | cut-out over green), model {args.model}, "
          f"network at {opened.settings['max_side']} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
