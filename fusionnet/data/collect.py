"""The collect_foregrounds step: validate, normalise and split every foreground into one folder.

Output (data/foregrounds/): fg/<id>.png (RGB 8-bit), alpha/<id>.png (L 8-bit, same size),
manifest.parquet (id, split, source, width, height, transition_fraction, fg_path, alpha_path,
list_index) and invalid.json (every excluded pair with its reason). Foregrounds keep their source size
(compositing happens at that size; the composite stage downscales image and alpha together afterwards),
unless `max_side` caps an enormous one. list_index: position in DIM's name list, else null.
The folder is built in a temp sibling and renamed into place, so an interrupted run never leaves a
manifest that looks complete.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fusionnet.data.imagefiles import atomic_output_dir, write_png
from fusionnet.data.sources import ForegroundCandidate, InvalidForeground, load_candidate

SPLITS = ("train", "val", "test")
MANIFEST_SCHEMA = pa.schema([("id", pa.string()), ("split", pa.string()), ("source", pa.string()),
                             ("width", pa.int64()), ("height", pa.int64()), ("transition_fraction", pa.float64()),
                             ("fg_path", pa.string()), ("alpha_path", pa.string()), ("list_index", pa.int64())])


class InvalidForegroundError(RuntimeError):
    """Raised with on_invalid="fail": the message lists every invalid pair by name and reason."""


@dataclass(frozen=True)
class CollectConfig:
    """seed: split shuffle and synthetic generator; max_side: cap on the stored longer side, only for
    enormous foregrounds (params foregrounds.max_side; None = keep every foreground at its source size);
    on_invalid: "exclude" | "fail"; test_fraction of all, val_fraction of the non-test foregrounds."""

    seed: int = 0
    max_side: int | None = None
    on_invalid: str = "exclude"
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    synthetic_size: tuple[int, int] = (320, 320)
    workers: int = 2

    def __post_init__(self) -> None:
        if self.on_invalid not in ("exclude", "fail"):
            raise ValueError(f"foregrounds.on_invalid must be 'exclude' or 'fail', got {self.on_invalid!r}")
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"foregrounds.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.max_side is not None and self.max_side < 1:
            raise ValueError(f"foregrounds.max_side must be >= 1 or null, got {self.max_side}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], workers: int = 2) -> "CollectConfig":
        """seed and the `foregrounds` section of a params.yaml mapping; absent keys take the defaults above."""
        section = params.get("foregrounds") or {}
        defaults = cls.__dataclass_fields__
        cap = section.get("max_side")
        size = (section.get("synthetic") or {}).get("size", defaults["synthetic_size"].default)
        return cls(seed=int(params.get("seed", defaults["seed"].default)), max_side=None if cap is None else int(cap),
                   on_invalid=section.get("on_invalid", defaults["on_invalid"].default),
                   val_fraction=float(section.get("val_fraction", defaults["val_fraction"].default)),
                   test_fraction=float(section.get("test_fraction", defaults["test_fraction"].default)),
                   synthetic_size=tuple(int(v) for v in size), workers=workers)


@dataclass
class CollectResult:
    """rows: manifest rows of the written foregrounds; invalid: (name, reason) of each excluded pair."""

    rows: list[dict] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)

    def split_counts(self) -> dict[str, int]:
        return {s: sum(r["split"] == s for r in self.rows) for s in SPLITS}


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def assign_splits(ids: Sequence[str], fixed: dict[str, str], seed: int, test_fraction: float,
                  val_fraction: float) -> dict[str, str]:
    """Split per foreground, so no foreground is in two splits.

    Ids with a fixed split (DIM's test subset) keep it and test_fraction is then not applied. The others
    are shuffled (sorted first, so the result depends only on the id set and seed);
    round(n * test_fraction) go to test, then round(rest * val_fraction) to val, the rest to train.
    A non-zero fraction gives at least one foreground as long as one is left for train.
    """
    free = sorted(i for i in set(ids) if i not in fixed)
    order = [free[k] for k in np.random.default_rng([int(seed), 104729]).permutation(len(free))]
    use_test_fraction = "test" not in fixed.values()
    n_test = _round_half_up(len(order) * test_fraction) if use_test_fraction else 0
    if use_test_fraction and test_fraction > 0 and n_test == 0 and len(order) >= 2:
        n_test = 1
    n_val = _round_half_up((len(order) - n_test) * val_fraction)
    if val_fraction > 0 and n_val == 0 and len(order) - n_test >= 2:
        n_val = 1
    splits = dict(fixed)
    for k, fg_id in enumerate(order):
        splits[fg_id] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return splits


def transition_fraction(alpha: np.ndarray) -> float:
    """Share of pixels with 0 < alpha < 1, alpha (H,W) uint8."""
    return float(np.mean((alpha > 0) & (alpha < 255)))


def _process(job: tuple[ForegroundCandidate, str, Path, CollectConfig]) -> dict | tuple[str, str]:
    """Load, validate and write one foreground; returns its manifest row or (name, reason)."""
    candidate, split, out_dir, config = job
    try:
        fg, alpha = load_candidate(candidate, seed=config.seed, synthetic_size=config.synthetic_size,
                                   max_side=config.max_side)
    except InvalidForeground as err:
        return err.name, err.reason
    fg_rel, alpha_rel = f"fg/{candidate.id}.png", f"alpha/{candidate.id}.png"
    write_png(out_dir / fg_rel, fg)
    write_png(out_dir / alpha_rel, alpha)
    return {"id": candidate.id, "split": split, "source": candidate.source, "width": int(alpha.shape[1]),
            "height": int(alpha.shape[0]), "transition_fraction": transition_fraction(alpha),
            "fg_path": fg_rel, "alpha_path": alpha_rel, "list_index": candidate.list_index}


def invalid_message(invalid: list[tuple[str, str]], excluded: bool) -> str:
    action = "excluded" if excluded else "found (foregrounds.on_invalid: fail)"
    lines = [f"collect_foregrounds: {len(invalid)} invalid foreground pair(s) {action}:"]
    lines += [f"  - {name}: {reason}" for name, reason in invalid]
    if not excluded:
        lines.append("Fix or remove them, or set foregrounds.on_invalid: exclude to skip them.")
    return "\n".join(lines)


def collect_foregrounds(candidates: Sequence[ForegroundCandidate], out_dir: str | Path,
                        config: CollectConfig) -> CollectResult:
    """Validate and write every candidate to out_dir (replaced atomically); see the module docstring.

    Raises InvalidForegroundError (on_invalid="fail") before anything is written to out_dir, or
    ValueError when no valid foreground remains.
    """
    fixed = {c.id: c.split for c in candidates if c.split is not None}
    # splits over all candidates, invalid ones included: fixing a bad file never reshuffles the others
    splits = assign_splits([c.id for c in candidates], fixed, config.seed, config.test_fraction, config.val_fraction)
    result = CollectResult()
    with atomic_output_dir(out_dir) as tmp:
        (tmp / "fg").mkdir()
        (tmp / "alpha").mkdir()
        jobs = [(c, splits[c.id], tmp, config) for c in candidates]
        if config.workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(min(config.workers, len(jobs))) as pool:
                outcomes = pool.map(_process, jobs, chunksize=1)
        else:
            outcomes = [_process(job) for job in jobs]
        for outcome in outcomes:
            if isinstance(outcome, dict):
                result.rows.append(outcome)
            else:
                result.invalid.append(outcome)
        if result.invalid and config.on_invalid == "fail":
            raise InvalidForegroundError(invalid_message(result.invalid, excluded=False))
        if not result.rows:
            raise ValueError(f"collect_foregrounds: no valid foreground among {len(candidates)} candidate(s)")
        result.rows.sort(key=lambda r: r["id"])
        table = pa.Table.from_pylist(result.rows, schema=MANIFEST_SCHEMA)
        pq.write_table(table, tmp / "manifest.parquet")
        report = [{"name": n, "reason": r} for n, r in result.invalid]
        (tmp / "invalid.json").write_text(json.dumps(report, indent=1) + "\n")
    return result


def read_manifest(foregrounds_dir: str | Path) -> list[dict]:
    """The rows of data/foregrounds/manifest.parquet as dicts, sorted by id."""
    path = Path(foregrounds_dir) / "manifest.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the collect_foregrounds stage first")
    return sorted(pq.read_table(path).to_pylist(), key=lambda r: r["id"])
