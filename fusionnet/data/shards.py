"""Parquet shards of training data: format, atomic writing, listing, and building them from composites.

A shard is `shard-NNNNN.parquet` holding up to `shard_rows` rows with the columns of `SCHEMA`, one
row per Parquet row group so a reader can fetch any single row without decoding its neighbours.
image is raw uint8 H x W x 3 bytes (row-major RGB), alpha raw uint8 H x W bytes.

Two kinds of row:
- "composite": a whole training composite at working size (longer side <= crops.max_side) with
  `transition`, the flat indices (uint32) of its transition pixels, so a crop centre is one draw.
  Crops and warm-up images are cut from these afresh every epoch (`fusionnet.data.sampling`).
- "crop": a crop cut once (validation: a stable set; or a fixed training set, e.g. an overfit test).

Atomicity: a shard is streamed into `.shard-NNNNN.parquet.tmp-<pid>` in the same directory and renamed
to its final name only after the Parquet footer is written. The temp name starts with a dot and does not
end in ".parquet", so neither `glob("*.parquet")` nor `list_shards` can pick up a partial shard; a
writer that fails removes its temp file. `build_shards` also builds the whole output directory in a
temp sibling and renames it into place when complete.

Layout written by `build_shards(composites_dir, out_dir, ...)` (the `shard_crops` stage):
out_dir/train/shard-*.parquet (train composites, kind "composite"), out_dir/val/shard-*.parquet
(`per_image` plain crops of each val composite, or with crops.val_whole the whole val composites,
kind "composite"), out_dir/summary.json (row counts, bytes, the crop
sampling settings the trainer reads, and `data_version`, a sha256 over the shard files).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fusionnet.data.crops import CropParams, CropSource, fit_longer_side, sample_crop_specs, transition_pixels
from fusionnet.io.hashing import file_sha256

__all__ = [
    "SCHEMA",
    "ShardWriter",
    "write_shards",
    "list_shards",
    "read_shard",
    "row_arrays",
    "load_composite_manifest",
    "rows_for_composite",
    "build_shards",
    "sampling_settings",
    "shards_digest",
]

SCHEMA = pa.schema(
    [
        ("image", pa.binary()),  # raw uint8 (height, width, 3)
        ("alpha", pa.binary()),  # raw uint8 (height, width)
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("cid", pa.string()),  # provenance: composite id
        ("fg_id", pa.string()),
        ("bg_name", pa.string()),
        ("crop_y", pa.int32()),  # top-left of the un-rotated crop in the working image (may be < 0)
        ("crop_x", pa.int32()),
        ("crop_size", pa.int32()),  # crop side before resizing to out_size; 0 for warm-up rows
        ("angle", pa.float32()),  # degrees, counter-clockwise as displayed
        ("flipped", pa.bool_()),
        ("kind", pa.string()),  # "composite" | "crop"
        ("src_height", pa.int32()),  # working image (composite after the max_side downscale)
        ("src_width", pa.int32()),
        ("src_scale", pa.float32()),  # working size / composite size (<= 1)
        ("transition", pa.binary()),  # "composite" rows: uint32 flat indices of transition pixels; else empty
    ]
)
_COLUMNS = frozenset(SCHEMA.names)
SHARD_PATTERN = "shard-{:05d}.parquet"
_COMPOSITE_COLUMNS = ("cid", "split", "fg_id", "bg_name", "image_path", "alpha_path")


def _check_row(row: Mapping) -> None:
    """Raise ValueError when a row lacks or adds columns, or its byte lengths disagree with its shape."""
    keys = set(row)
    if keys != _COLUMNS:
        raise ValueError(
            f"shard row columns differ from SCHEMA: missing {sorted(_COLUMNS - keys)}, "
            f"extra {sorted(keys - _COLUMNS)}"
        )
    h, w = int(row["height"]), int(row["width"])
    if len(row["image"]) != h * w * 3 or len(row["alpha"]) != h * w:
        raise ValueError(
            f"shard row {row['cid']!r}: image/alpha byte lengths {len(row['image'])}/{len(row['alpha'])} "
            f"do not match height {h} x width {w}"
        )


class ShardWriter:
    """Streams rows into numbered shards of `shard_rows` rows each, atomically (see module doc).

    Use as a context manager: on an exception the shard in progress is discarded (its temp file
    removed); shards already completed stay, each being valid on its own.
    """

    def __init__(self, out_dir: str | Path, shard_rows: int, compression: str = "none") -> None:
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_rows = shard_rows
        self.compression = compression
        self.paths: list[Path] = []
        self.rows_written = 0
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._in_shard = 0

    def _open(self) -> None:
        self._final = self.out_dir / SHARD_PATTERN.format(len(self.paths))
        self._tmp = self.out_dir / f".{self._final.name}.tmp-{os.getpid()}"
        self._writer = pq.ParquetWriter(
            self._tmp,
            SCHEMA,
            compression=self.compression,
            use_dictionary=False,  # each row group holds one row: a dictionary would only add a page
            write_statistics=False,  # min/max of image bytes would copy whole images into the footer
        )

    def add(self, row: Mapping) -> None:
        """Append one row (a mapping with exactly the SCHEMA columns)."""
        _check_row(row)
        if self._writer is None:
            self._open()
        self._writer.write_table(pa.Table.from_pylist([dict(row)], schema=SCHEMA), row_group_size=1)
        self._in_shard += 1
        self.rows_written += 1
        if self._in_shard == self.shard_rows:
            self._finish()

    def _finish(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self._final)
        self.paths.append(self._final)
        self._writer, self._tmp, self._final, self._in_shard = None, None, None, 0

    def close(self) -> list[Path]:
        """Complete the last (partial) shard; returns the paths of all shards written."""
        if self._writer is not None:
            self._finish()
        return self.paths

    def abort(self) -> None:
        """Drop the shard in progress and its temp file."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._tmp.unlink(missing_ok=True)
                self._writer, self._tmp, self._final, self._in_shard = None, None, None, 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shards(
    rows: Iterable[Mapping], out_dir: str | Path, shard_rows: int, compression: str = "none"
) -> list[Path]:
    """Write an iterable of rows as shards in out_dir; returns the shard paths."""
    with ShardWriter(out_dir, shard_rows, compression) as writer:
        for row in rows:
            writer.add(row)
    return writer.paths


def list_shards(paths_or_dir: str | Path | Sequence[str | Path]) -> list[Path]:
    """Complete shards: `*.parquet` files in the given directories (sorted) and the given files.

    Hidden names (temp files of writers in progress or killed) are never returned.
    """
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    shards: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            shards += sorted(p for p in item.glob("*.parquet") if not p.name.startswith("."))
        elif item.is_file() and item.suffix == ".parquet" and not item.name.startswith("."):
            shards.append(item)
        else:
            raise FileNotFoundError(f"{item}: not a shard directory or a .parquet shard file")
    return shards


def read_shard(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a whole shard (memory-mapped) as an Arrow table."""
    return pq.read_table(path, columns=columns, memory_map=True)


def row_arrays(row: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Decode a row's bytes: -> (image (H,W,3) uint8, alpha (H,W) uint8), read-only views."""
    h, w = int(row["height"]), int(row["width"])
    image = np.frombuffer(row["image"], dtype=np.uint8).reshape(h, w, 3)
    alpha = np.frombuffer(row["alpha"], dtype=np.uint8).reshape(h, w)
    return image, alpha


def load_composite_manifest(composites_dir: str | Path) -> list[dict]:
    """Rows of composites_dir/manifest.parquet (composite contract), sorted by cid."""
    path = Path(composites_dir) / "manifest.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: composite manifest not found (run the composite stage first)")
    table = pq.read_table(path)
    missing = [c for c in _COMPOSITE_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    records = table.select(list(_COMPOSITE_COLUMNS)).to_pylist()
    bad = sorted({r["split"] for r in records} - {"train", "val", "test"})
    if bad:
        raise ValueError(f"{path}: unknown split value(s) {bad}; expected train|val|test")
    return sorted(records, key=lambda r: r["cid"])


def _read_png(path: Path, mode: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: listed in the composite manifest but missing")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except OSError as err:
        raise ValueError(f"{path}: cannot be read as an image ({err})") from err


def _rng(seed: int, cid: str, stream: int) -> np.random.Generator:
    """Generator that depends only on (seed, cid, stream): same crops whatever the order or process."""
    key = int.from_bytes(hashlib.blake2b(cid.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(key, stream)))


def rows_for_composite(
    composites_dir: str | Path, record: Mapping, params: CropParams, seed: int
) -> dict[str, list[dict]]:
    """Rows of one composite: {"train": [its composite row]}; {"val": [per_image plain crops]}, or with
    params.val_whole {"val": [its composite row]} (scored whole by validation)."""
    root = Path(composites_dir)
    image = _read_png(root / record["image_path"], "RGB")
    alpha = _read_png(root / record["alpha_path"], "L")
    if image.shape[:2] != alpha.shape:
        raise ValueError(
            f"{root / record['image_path']}: image {image.shape[:2]} and alpha {alpha.shape} differ in size"
        )
    image, alpha, scale = fit_longer_side(image, alpha, params.max_side)
    split = record["split"]
    base = {
        "cid": record["cid"],
        "fg_id": record["fg_id"],
        "bg_name": record["bg_name"],
        "src_height": alpha.shape[0],
        "src_width": alpha.shape[1],
        "src_scale": scale,
    }
    if split == "train" or params.val_whole:
        transition = transition_pixels(alpha).astype(np.uint32)
        return {split: [dict(base, image=np.ascontiguousarray(image).tobytes(), alpha=np.ascontiguousarray(alpha).tobytes(),
                               height=alpha.shape[0], width=alpha.shape[1], crop_y=0, crop_x=0, crop_size=0,
                               angle=0.0, flipped=False, kind="composite", transition=transition.tobytes())]}
    specs = sample_crop_specs(
        alpha,
        params.per_image,
        params.sizes,
        params.rotation_deg if params.augment_val else 0.0,
        params.flip and params.augment_val,
        _rng(seed, record["cid"], 0),
    )
    out: dict[str, list[dict]] = {split: []}
    source = CropSource(image, alpha, specs)
    for spec in specs:
        img, alp = source.crop(spec, params.out_size)
        crop_y, crop_x = spec.top_left
        out[split].append(
            dict(base, image=img.tobytes(), alpha=alp.tobytes(), height=img.shape[0], width=img.shape[1],
                 crop_y=crop_y, crop_x=crop_x, crop_size=spec.size, angle=spec.angle,
                 flipped=spec.flipped, kind="crop", transition=b"")
        )
    return out


def sampling_settings(params: CropParams) -> dict:
    """What the trainer needs to cut crops from the composite rows (written into summary.json)."""
    return {"sizes": list(params.sizes), "out_size": params.out_size, "warmup_size": params.warmup_size,
            "rotation_deg": params.rotation_deg, "flip": params.flip}


def shards_digest(out_dir: str | Path) -> str:
    """sha256 over the (split, name, sha256) of every shard under out_dir: the data version."""
    out_dir = Path(out_dir)
    outer = hashlib.sha256()
    for path in sorted(out_dir.glob("*/*.parquet")):
        outer.update(f"{path.parent.name}/{path.name}:{file_sha256(path)}\n".encode())
    return outer.hexdigest()


def _rows_task(args: tuple) -> dict[str, list[dict]]:
    return rows_for_composite(*args)


def _ordered_map(fn: Callable, tasks: Sequence, workers: int) -> Iterator:
    """map(fn, tasks) in order, over `workers` processes with a bounded number of tasks in flight."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    # spawn, not fork: the caller may hold threads (torch, Prefect) that fork would copy mid-state
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        todo = iter(tasks)
        pending = deque(pool.submit(fn, t) for t in islice(todo, 4 * workers))
        while pending:
            result = pending.popleft().result()
            for task in islice(todo, 1):
                pending.append(pool.submit(fn, task))
            yield result


def build_shards(
    composites_dir: str | Path,
    out_dir: str | Path,
    params: CropParams,
    seed: int,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Store every train composite and the val crops of composites_dir as shards under out_dir (layout above).

    The output is identical for any `workers`. Returns the summary also written to summary.json:
    {"train"|"val": {"rows", "shards", "bytes"}, "composites": {"train": int, "val": int},
    "sampling": sampling_settings(params), "data_version": shards_digest(out_dir),
    "working_max_side": params.max_side} (the scale the model trained at: its serving max_side).
    """
    composites_dir, out_dir = Path(composites_dir), Path(out_dir)
    records = [r for r in load_composite_manifest(composites_dir) if r["split"] in ("train", "val")]
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    writers = {k: ShardWriter(tmp_dir / k, params.shard_rows, params.compression) for k in ("train", "val")}
    try:
        tasks = [(composites_dir, r, params, seed) for r in records]
        for done, rows in enumerate(_ordered_map(_rows_task, tasks, workers), start=1):
            for kind, kind_rows in rows.items():
                for row in kind_rows:
                    writers[kind].add(row)
            if progress is not None:
                progress(done, len(tasks))
        for writer in writers.values():
            writer.close()
        summary = {k: {"rows": w.rows_written, "shards": len(w.paths),
                       "bytes": sum(p.stat().st_size for p in w.paths)} for k, w in writers.items()}
        summary["composites"] = {s: sum(r["split"] == s for r in records) for s in ("train", "val")}
        summary["sampling"] = sampling_settings(params)
        summary["data_version"] = shards_digest(tmp_dir)
        summary["working_max_side"] = params.max_side  # the trained model's serving max_side (fusionnet.train.data)
        (tmp_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return summary


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished directory src to dst, replacing any previous dst."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
