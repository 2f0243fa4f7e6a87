"""Which data an evaluation scores: the test composites' data version and the held-out real photos.

`split_data_version` names the test set (metrics/details.json "test_set"; the registry compares two
models only when their versions are equal). `held_out_photos` lists the real photos that may be
scored: a photo that is the source file of a train or val foreground in
data/foregrounds/manifest.parquet is excluded (`photo_exclusions`), so a model trained with
`foregrounds.source: folder` on the same photos is not scored on what it was trained on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusionnet.data.collect import SPLITS, read_manifest
from fusionnet.data.sources import SOURCES as SOURCE_KINDS, safe_id
from fusionnet.evaluation.rows import photo_files
from fusionnet.io.hashing import file_sha256

SEEN_SPLITS = ("train", "val")


def split_data_version(composites: str | os.PathLike, split: str = "test") -> dict[str, Any]:
    """The data version of one split of data/composites: {"version": "sha256:<hex>", "split", "images"}.

    sha256 over, per composite in cid order, its cid and the sha256 of its image, alpha and trimap
    files: it depends only on the split's data, not on the manifest's row order, file paths, other
    splits or timestamps. Two evaluations are comparable only when their versions are equal.
    """
    import pyarrow.parquet as pq

    root = Path(composites)
    manifest = root / "manifest.parquet"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no composites manifest (run the `composite` stage first)")
    table = pq.read_table(manifest)
    needed = {"cid", "split", "image_path", "alpha_path", "trimap_path"}
    if not needed <= set(table.column_names):
        raise ValueError(f"{manifest}: missing column(s) {sorted(needed - set(table.column_names))}")
    lines = sorted((r for r in table.to_pylist() if r["split"] == split), key=lambda r: r["cid"])
    if not lines:
        raise ValueError(f"{manifest}: no {split} composites")
    digest = hashlib.sha256(f"fusionnet composites {split}\n".encode())
    for line in lines:
        files = []
        for key in ("image_path", "alpha_path", "trimap_path"):
            path = root / line[key]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {manifest} ({line['cid']}) but missing")
            files.append(file_sha256(path))
        digest.update(f"{line['cid']} {' '.join(files)}\n".encode())
    return {"version": f"sha256:{digest.hexdigest()}", "split": split, "images": len(lines)}


def _source_file(row: Mapping[str, Any]) -> str | None:
    """The file a foreground came from, when the manifest records it (a `source_path` column, or a
    path in `source` instead of the source kind); None for the current manifest (kind only)."""
    path = row.get("source_path") or (row["source"] if row["source"] not in SOURCE_KINDS else None)
    return str(path) if path else None


def photo_exclusions(photos: list[Path], foregrounds: str | os.PathLike, base_dir: Path = Path(".")) -> dict[str, str]:
    """Photo file name -> why it must not be scored: it is the source of a train or val foreground.

    Reads foregrounds/manifest.parquet (fusionnet.data.collect: id, split, source, ...). A row that
    records its source file matches the photo with the same resolved path (a relative path is taken
    from base_dir). A row that does not (today's manifest records the source kind only) matches by
    root + name: a foreground from a file source ("folder", "dim") whose id is the photo's file stem
    made into an id the way collect_foregrounds makes it (fusionnet.data.sources.safe_id). Synthetic
    foregrounds and test-split foregrounds never exclude a photo.
    """
    manifest = Path(foregrounds) / "manifest.parquet"
    rows = read_manifest(foregrounds)  # FileNotFoundError naming the manifest
    if not rows:
        raise ValueError(f"{manifest}: no foregrounds listed")
    missing = {"id", "split", "source"} - set(rows[0])
    if missing:
        raise ValueError(f"{manifest}: not a foregrounds manifest (no column {', '.join(sorted(missing))})")
    bad = sorted({str(r["split"]) for r in rows} - set(SPLITS))
    if bad:
        raise ValueError(f"{manifest}: unknown split(s) {bad}; expected {', '.join(SPLITS)}")
    by_path, by_name = {}, {}
    for row in (r for r in rows if r["split"] in SEEN_SPLITS):
        source = _source_file(row)
        if source is not None:
            by_path[(base_dir / source).resolve()] = (row, source)
        elif row["source"] != "synthetic":
            by_name[row["id"]] = row
    out = {}
    for photo in photos:
        if (hit := by_path.get(photo.resolve())) is not None:
            row, source = hit
            out[photo.name] = f"source of {row['split']} foreground {row['id']} ({source})"
        elif (row := by_name.get(safe_id(photo.stem))) is not None:
            out[photo.name] = (f"{row['split']} foreground {row['id']} (source {row['source']}) has this photo's name "
                               f"({manifest} records no source paths)")
    return out


def held_out_photos(root: Path, foregrounds: Path, base_dir: Path, limit: int | None = None) -> dict[str, Any]:
    """Which photos under root/image are scored: {"root", "manifest", "photos": count, "n_scored",
    "scored": [stem], "excluded": {stem: reason}, "files": [file name scored]}. Excluded: the source
    of a train or val foreground (`photo_exclusions`), or beyond evaluate.photos.max_images (`limit`)."""
    files = photo_files(root)
    reasons = {Path(name).stem: why for name, why in photo_exclusions(files, foregrounds, base_dir).items()}
    kept = [p for p in files if p.stem not in reasons]
    for path in kept[limit:] if limit is not None else []:
        reasons[path.stem] = f"beyond evaluate.photos.max_images ({limit})"
    kept = kept[:limit]
    excluded = {p.stem: reasons[p.stem] for p in files if p.stem in reasons}
    return {"root": str(root), "manifest": str(Path(foregrounds) / "manifest.parquet"), "photos": len(files),
            "n_scored": len(kept), "scored": [p.stem for p in kept], "excluded": excluded,
            "files": [p.name for p in kept]}
