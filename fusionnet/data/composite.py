"""Compositing in the Deep Image Matting recipe: fit a background, then I = alpha*F + (1-alpha)*B.

Size: the background is fitted to the foreground at the foreground's stored (full) size and I is
computed there, in float; only then are I and alpha downscaled together, with the one filter of
`imagefiles.RESIZE_FILTER` (antialiased bilinear, never overshoots), so the longer side is at most
composite.max_side; the trimap is computed from the downscaled alpha. Shrinking F and alpha before
compositing (with different filters) would break I = alpha*F + (1-alpha)*B at the edges.

Training set: each train/val foreground over `bg_per_fg` distinct backgrounds (paper: 100).
Test set (Composition-1k style): each test foreground over `bg_per_test_fg` distinct backgrounds
(paper: 20), every composite with a "-25" trimap (unknown = transition band dilated by band_radius).
The "-full" evaluation needs no file: it is mask=None in fusionnet.metrics.

Background assignment rule (deterministic for the seed):
1. Pools. With an explicit test pool (composite.backgrounds.test_folder / test_list) the test set
   draws from it and train/val from the main pool. Otherwise the backgrounds are shuffled and the
   test pool takes the first k = min(n_test_fg * bg_per_test_fg, N - bg_per_fg) of them, at least
   bg_per_test_fg; train/val take the rest. So test backgrounds are distinct from train backgrounds
   whenever N >= bg_per_fg + bg_per_test_fg; with fewer, both pools are all N backgrounds
   (overlap, reported by `BackgroundPools.disjoint`).
2. Within a pool (shuffled again), foreground number i in id order gets pool[(i*b + j) mod P] for
   j < b: b distinct backgrounds per foreground (needs P >= b) and even use of the pool.
3. DIM pairing (replaces 1-2 for a split group): when the foregrounds are from the `dim` source and
   the group's ordered name list is given (composite.backgrounds.test_list for test, train_list for
   train/val), foreground number i of its DIM name list (manifest list_index) gets list entries
   i*b .. i*b + b - 1 in list order, as DIM's compositing scripts do (Composition-1k: test fg i with
   test_bg_names[i*20 + j]; training: training_bg_names[i*100 + j]). No shuffling; repeats in the
   list are kept.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fusionnet.data.backgrounds import Background, BackgroundList
from fusionnet.data.contact_sheet import contact_sheet
from fusionnet.data.imagefiles import (atomic_output_dir, max_side_size, read_alpha, read_rgb, resize_float, to_uint8,
                                       write_png)
from fusionnet.data.trimap import band_trimap

MANIFEST_SCHEMA = pa.schema([("cid", pa.string()), ("split", pa.string()), ("fg_id", pa.string()),
                             ("bg_name", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
                             ("image_path", pa.string()), ("alpha_path", pa.string()), ("trimap_path", pa.string())])


def fitted_background_size(bg_hw: tuple[int, int], fg_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) the background is resized to before cropping, per the DIM rule.

    ratio = max(fg_w / bg_w, fg_h / bg_h); if ratio > 1 the background is scaled by ratio with ceil,
    else it is kept. (The -1e-9 stops float noise such as 300 * (320/300) = 320.00000000000006 from
    adding a pixel; the crop makes that pixel irrelevant anyway.)
    """
    (bg_h, bg_w), (fg_h, fg_w) = bg_hw, fg_hw
    ratio = max(fg_w / bg_w, fg_h / bg_h)
    if ratio <= 1:
        return bg_h, bg_w
    return math.ceil(bg_h * ratio - 1e-9), math.ceil(bg_w * ratio - 1e-9)


def fit_background(bg: np.ndarray, fg_hw: tuple[int, int]) -> np.ndarray:
    """DIM background fit: resize (bicubic) by fitted_background_size, crop the top-left fg-sized window.

    PIL's bicubic (a = -0.5), as DIM's compositing script; OpenCV's INTER_CUBIC (a = -0.75) is faster but
    differs by up to 25 levels on a photo (benchmarks/bench_opencv.py). bg: (Hb,Wb,3) uint8; returns
    (fg_h, fg_w, 3) uint8.
    """
    height, width = fitted_background_size(bg.shape[:2], fg_hw)
    if (height, width) != bg.shape[:2]:
        bg = np.asarray(Image.fromarray(bg).resize((width, height), Image.Resampling.BICUBIC), dtype=np.uint8)
    return np.ascontiguousarray(bg[: fg_hw[0], : fg_hw[1]])


def composite_float(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """I = alpha * F + (1 - alpha) * B in float64, values in [0, 255] (not rounded).

    fg, bg: (H,W,3) uint8; alpha: (H,W) uint8 (alpha = value / 255). Returns (H,W,3) float64.
    """
    if fg.shape != bg.shape or fg.shape[:2] != alpha.shape:
        raise ValueError(f"composite_image: shapes differ: fg {fg.shape}, alpha {alpha.shape}, bg {bg.shape}")
    a = alpha.astype(np.float64)[..., None] / 255.0
    return a * fg.astype(np.float64) + (1.0 - a) * bg.astype(np.float64)


def composite_image(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """composite_float rounded (half to even) to uint8: (H,W,3) uint8."""
    return to_uint8(composite_float(fg, alpha, bg))


def downscale_alpha(alpha: np.ndarray, max_side: int | None) -> np.ndarray:
    """(H,W) uint8 alpha shrunk (RESIZE_FILTER) so the longer side is <= max_side; unchanged if it is."""
    hw = max_side_size(alpha.shape, max_side)
    return alpha if hw == alpha.shape else to_uint8(resize_float(alpha, hw))


def composite_downscaled(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray, max_side: int | None) -> np.ndarray:
    """The stored composite: bg fitted to fg at full size, I computed there, then shrunk like alpha.

    fg (H,W,3) uint8, alpha (H,W) uint8 at the foreground's stored size; bg (Hb,Wb,3) uint8 any size.
    Returns (h,w,3) uint8 with (h,w) = max_side_size((H,W), max_side), the shape of
    downscale_alpha(alpha, max_side); I is rounded once, after resizing.
    """
    image = composite_float(fg, alpha, fit_background(bg, alpha.shape))
    hw = max_side_size(alpha.shape, max_side)
    return to_uint8(image if hw == alpha.shape else resize_float(image, hw))


@dataclass(frozen=True)
class CompositeConfig:
    seed: int = 0
    bg_per_fg: int = 4
    bg_per_test_fg: int = 2
    band_radius: int = 25
    max_side: int | None = 640  # longer side of the stored composites (after compositing at full size)
    workers: int = 2

    @classmethod
    def from_params(cls, params: Mapping[str, Any], workers: int = 2) -> "CompositeConfig":
        """seed and the `composite` section of a params.yaml mapping; absent keys take the defaults above."""
        section = params.get("composite") or {}
        defaults = cls.__dataclass_fields__
        cap = section.get("max_side", defaults["max_side"].default)
        return cls(seed=int(params.get("seed", defaults["seed"].default)),
                   bg_per_fg=int(section.get("bg_per_fg", defaults["bg_per_fg"].default)),
                   bg_per_test_fg=int(section.get("bg_per_test_fg", defaults["bg_per_test_fg"].default)),
                   band_radius=int(section.get("band_radius", defaults["band_radius"].default)),
                   max_side=None if cap is None else int(cap), workers=workers)


@dataclass(frozen=True)
class BackgroundPools:
    train: list[Background]
    test: list[Background]
    disjoint: bool


def _shuffled(items: Sequence[Background], seed: int, salt: int) -> list[Background]:
    order = np.random.default_rng([int(seed), salt]).permutation(len(items))
    return [items[k] for k in order]


def split_background_pools(backgrounds: Sequence[Background], test_backgrounds: Sequence[Background] | None,
                           n_test_fg: int, bg_per_fg: int, bg_per_test_fg: int, seed: int) -> BackgroundPools:
    """Train and test background pools, rule 1 of the module docstring."""
    if test_backgrounds is not None:
        shared = {b.path or b.name for b in backgrounds} & {b.path or b.name for b in test_backgrounds}
        return BackgroundPools(list(backgrounds), list(test_backgrounds), disjoint=not shared)
    names = sorted(backgrounds, key=lambda b: b.name)
    total = len(names)
    if total < bg_per_fg + bg_per_test_fg or n_test_fg == 0:
        return BackgroundPools(names, names, disjoint=n_test_fg == 0)
    shuffled = _shuffled(names, seed, 15485863)
    k = max(bg_per_test_fg, min(n_test_fg * bg_per_test_fg, total - bg_per_fg))
    return BackgroundPools(train=shuffled[k:], test=shuffled[:k], disjoint=True)


def assign_backgrounds(fg_ids: Sequence[str], pool: Sequence[Background], per_fg: int,
                       seed: int) -> dict[str, list[Background]]:
    """`per_fg` distinct backgrounds for each foreground, rule 2 of the module docstring."""
    if per_fg < 1:
        raise ValueError(f"backgrounds per foreground must be >= 1, got {per_fg}")
    if fg_ids and len(pool) < per_fg:
        raise ValueError(f"need {per_fg} distinct backgrounds per foreground but the pool has only {len(pool)}: "
                         f"add backgrounds (composite.backgrounds) or lower composite.bg_per_fg / bg_per_test_fg")
    order = _shuffled(sorted(pool, key=lambda b: b.name), seed, 32452843)
    return {fg_id: [order[(i * per_fg + j) % len(order)] for j in range(per_fg)]
            for i, fg_id in enumerate(sorted(fg_ids))}


def dim_list_assignment(foregrounds: Sequence[dict], listed: BackgroundList,
                        per_fg: int) -> dict[str, list[Background]]:
    """Rule 3 of the module docstring: foreground with list_index i gets listed.items[i*per_fg : (i+1)*per_fg].

    foregrounds: manifest rows (id, source, list_index). Raises ValueError, naming the list file, when a
    row has no list_index (not from a DIM name list) or the list is too short for its block.
    """
    if per_fg < 1:
        raise ValueError(f"backgrounds per foreground must be >= 1, got {per_fg}")
    out = {}
    for row in foregrounds:
        index = row.get("list_index")
        if row.get("source") != "dim" or index is None:
            raise ValueError(f"{listed.path}: DIM pairing needs every foreground's position in a DIM name list, but "
                             f"{row['id']} (source {row.get('source')!r}) has none: set foregrounds.dim.train_names / "
                             f"test_names to existing lists, or drop this background list")
        stop = (int(index) + 1) * per_fg
        if stop > len(listed.items):
            raise ValueError(f"{listed.path}: lists {len(listed.items)} backgrounds, but foreground {row['id']} "
                             f"(number {index} of its name list) needs entries {stop - per_fg}..{stop - 1} "
                             f"({per_fg} per foreground, DIM pairing)")
        out[row["id"]] = list(listed.items[stop - per_fg:stop])
    return out


def _assign_all(foregrounds: Sequence[dict], backgrounds: Sequence[Background],
                test_backgrounds: Sequence[Background] | None, listed: dict[str, BackgroundList],
                config: CompositeConfig) -> tuple[dict[str, list[Background]], BackgroundPools]:
    """Backgrounds of every foreground (rules 1-3) and the pools; `disjoint` is measured on the assignment."""
    groups = {"train": [r for r in foregrounds if r["split"] != "test"],
              "test": [r for r in foregrounds if r["split"] == "test"]}
    per_fg = {"train": config.bg_per_fg, "test": config.bg_per_test_fg}
    dim = {g: g in listed and any(r.get("source") == "dim" for r in rows) for g, rows in groups.items()}
    pools = split_background_pools(backgrounds, test_backgrounds, len(groups["test"]), config.bg_per_fg,
                                   config.bg_per_test_fg, config.seed)
    assigned: dict[str, list[Background]] = {}
    for group, salt in (("train", 0), ("test", 1)):
        rows = groups[group]
        if dim[group]:
            assigned.update(dim_list_assignment(rows, listed[group], per_fg[group]))
        else:
            pool = pools.train if group == "train" else pools.test
            assigned.update(assign_backgrounds([r["id"] for r in rows], pool, per_fg[group], config.seed + salt))
    used = {g: {b.path or b.name for r in rows for b in assigned[r["id"]]} for g, rows in groups.items()}
    train_pool = list(dict.fromkeys(listed["train"].items)) if dim["train"] else pools.train
    test_pool = list(dict.fromkeys(listed["test"].items)) if dim["test"] else pools.test
    return assigned, BackgroundPools(train_pool, test_pool, disjoint=not used["train"] & used["test"])


PREGENERATE_LIMIT = 256  # builtin backgrounds generated once up front (about 0.4 MB each) when this few


@functools.lru_cache(maxsize=64)
def _builtin(bg: Background) -> np.ndarray:
    return bg.load()


def _load_background(bg: Background, ready: dict[str, np.ndarray]) -> np.ndarray:
    if bg.name in ready:
        return ready[bg.name]
    # builtin ones are generated (worth caching); photos are re-read (may be huge)
    return _builtin(bg) if bg.path is None else bg.load()


def _generate(bg: Background) -> np.ndarray:
    return bg.load()


def _composite_foreground(job: tuple[dict, list[Background], dict, Path, Path, CompositeConfig]) -> list[dict]:
    """All composites of one foreground (trimap computed once); returns their manifest rows.

    job = (foreground manifest row, its backgrounds, {bg name: pre-generated array}, fg_root, out_dir, config).
    """
    row, backgrounds, ready, fg_root, out_dir, config = job
    fg, full_alpha = read_rgb(fg_root / row["fg_path"]), read_alpha(fg_root / row["alpha_path"])
    if fg.shape[:2] != full_alpha.shape:
        raise ValueError(f"{fg_root / row['fg_path']}: foreground is {fg.shape[1]}x{fg.shape[0]} (WxH) but its "
                         f"alpha {row['alpha_path']} is {full_alpha.shape[1]}x{full_alpha.shape[0]}: "
                         f"re-run collect_foregrounds")
    alpha = downscale_alpha(full_alpha, config.max_side)
    trimap = band_trimap(alpha, config.band_radius)
    folder = "test" if row["split"] == "test" else "train"
    rows = []
    for j, bg in enumerate(backgrounds):
        cid = f"{row['id']}-{j:03d}"
        paths = {kind: f"{folder}/{kind}/{cid}.png" for kind in ("image", "alpha", "trimap")}
        image = composite_downscaled(fg, full_alpha, _load_background(bg, ready), config.max_side)
        write_png(out_dir / paths["image"], image)
        if j == 0:
            write_png(out_dir / paths["alpha"], alpha)
            write_png(out_dir / paths["trimap"], trimap)
        else:  # same alpha and trimap for every background: copy the file instead of re-encoding it
            for kind in ("alpha", "trimap"):
                shutil.copyfile(out_dir / rows[0][f"{kind}_path"], out_dir / paths[kind])
        rows.append({"cid": cid, "split": row["split"], "fg_id": row["id"], "bg_name": bg.name,
                     "width": int(alpha.shape[1]), "height": int(alpha.shape[0]), "image_path": paths["image"],
                     "alpha_path": paths["alpha"], "trimap_path": paths["trimap"]})
    return rows


def _jobs(foregrounds: Sequence[dict], assigned: dict[str, list[Background]], ready: dict[str, np.ndarray],
          fg_root: Path, out_dir: Path, config: CompositeConfig) -> list[tuple]:
    return [(row, assigned[row["id"]], {b.name: ready[b.name] for b in assigned[row["id"]] if b.name in ready},
             fg_root, out_dir, config) for row in foregrounds]


def build_composites(foregrounds: Sequence[dict], fg_root: str | Path, backgrounds: Sequence[Background],
                     test_backgrounds: Sequence[Background] | None, out_dir: str | Path, config: CompositeConfig,
                     listed: dict[str, BackgroundList] | None = None) -> tuple[list[dict], BackgroundPools]:
    """Write data/composites (train/, test/, manifest.parquet, contact_sheet.png), replaced atomically.

    foregrounds: rows of the foregrounds manifest (id, split, source, list_index, fg_path, alpha_path
    relative to fg_root). listed: the ordered background name lists ({"train"/"test": BackgroundList},
    from backgrounds.background_lists_from_params) for DIM pairing, rule 3. Returns the composite
    manifest rows (sorted by cid) and the background pools used (disjoint: no background is used by
    both a test and a train/val composite).
    """
    fg_root = Path(fg_root)
    assigned, pools = _assign_all(foregrounds, backgrounds, test_backgrounds, listed or {}, config)
    with atomic_output_dir(out_dir) as tmp:
        for folder in ("train", "test"):
            for kind in ("image", "alpha", "trimap"):
                (tmp / folder / kind).mkdir(parents=True)
        builtin = sorted({bg for bgs in assigned.values() for bg in bgs if bg.path is None}, key=lambda b: b.name)
        if len(builtin) > PREGENERATE_LIMIT:
            builtin = []  # too many to hold: each worker generates (and caches) what it needs
        if config.workers > 1 and len(foregrounds) > 1:
            # spawn, not fork: safe when the caller has threads (Prefect tasks) or has imported torch
            with multiprocessing.get_context("spawn").Pool(min(config.workers, len(foregrounds))) as pool:
                # generate each builtin background once, not once per worker that needs it
                ready = dict(zip((b.name for b in builtin), pool.map(_generate, builtin, chunksize=4)))
                per_fg = pool.map(_composite_foreground, _jobs(foregrounds, assigned, ready, fg_root, tmp, config),
                                  chunksize=1)
        else:
            ready = {b.name: _generate(b) for b in builtin}
            per_fg = [_composite_foreground(job) for job in _jobs(foregrounds, assigned, ready, fg_root, tmp, config)]
        rows = sorted((r for rs in per_fg for r in rs), key=lambda r: r["cid"])
        pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), tmp / "manifest.parquet")
        write_png(tmp / "contact_sheet.png", contact_sheet(rows, tmp))
    return rows, pools
