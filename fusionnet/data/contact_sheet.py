"""A contact sheet of composites so a person can see what was built: image | alpha | trimap per row."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

THUMB_HEIGHT = 160
CAPTION_HEIGHT = 14


def pick_examples(rows: Sequence[dict], n_train: int = 4, n_test: int = 2) -> list[dict]:
    """First composite of evenly spaced foregrounds: up to n_train from train/val and n_test from test."""
    picked = []
    for want, splits in ((n_train, ("train", "val")), (n_test, ("test",))):
        firsts: dict[str, dict] = {}
        for row in rows:
            if row["split"] in splits:
                firsts.setdefault(row["fg_id"], row)
        candidates = [firsts[k] for k in sorted(firsts)]
        if candidates:
            step = max(1, len(candidates) // want)
            picked += candidates[::step][:want]
    return picked


def _thumb(path: Path) -> Image.Image:
    image = Image.open(path).convert("RGB")
    width = max(1, round(image.width * THUMB_HEIGHT / image.height))
    return image.resize((width, THUMB_HEIGHT), Image.Resampling.BILINEAR)


def contact_sheet(rows: Sequence[dict], root: Path, n_train: int = 4, n_test: int = 2) -> np.ndarray:
    """(H,W,3) uint8 sheet of picked composites under `root` (paths in rows are relative to it)."""
    examples = pick_examples(rows, n_train, n_test)
    strips = []
    for row in examples:
        thumbs = [_thumb(root / row[key]) for key in ("image_path", "alpha_path", "trimap_path")]
        width = sum(t.width for t in thumbs) + 4 * (len(thumbs) - 1)
        strip = Image.new("RGB", (width, THUMB_HEIGHT + CAPTION_HEIGHT), (32, 32, 32))
        x = 0
        for thumb in thumbs:
            strip.paste(thumb, (x, CAPTION_HEIGHT))
            x += thumb.width + 4
        caption = f"{row['split']}  {row['cid']}  bg={row['bg_name']}  {row['width']}x{row['height']}"
        ImageDraw.Draw(strip).text((2, 1), caption, fill=(230, 230, 230))
        strips.append(strip)
    if not strips:
        return np.zeros((CAPTION_HEIGHT, 64, 3), np.uint8)
    sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height + 4 for s in strips)), (0, 0, 0))
    y = 0
    for strip in strips:
        sheet.paste(strip, (0, y))
        y += strip.height + 4
    return np.asarray(sheet, dtype=np.uint8)
