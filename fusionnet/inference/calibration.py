"""Calibration images for int8 (PyTorch FX `fusionnet.inference.int8` and ONNX Runtime
`fusionnet.onnx.quantize`): the same images for both, drawn the same way.

    images = calibration_images(["data/shards"], count=16)      # (H,W,3) float32 in [0,1] each

Sources are shard folders or `.parquet` shards (rows of the training composites; a folder holding
train/ and val/ shard folders gives its train rows) and image files or folders (searched recursively,
hidden names skipped). When there are more candidates than `count`, `count` are drawn reproducibly
(`seed`); only the drawn rows and files are read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from fusionnet.data.shards import row_arrays
from fusionnet.io.images import image_suffixes, load_image

DEFAULT_COUNT = 16


def _shard_files(folder: Path) -> list[Path]:
    parquet = sorted(p for p in folder.rglob("*.parquet") if not any(part.startswith(".") for part in
                                                                      p.relative_to(folder).parts))
    return [p for p in parquet if "train" in p.relative_to(folder).parts] or parquet


def _image_files(folder: Path) -> list[Path]:
    suffixes = image_suffixes()
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def calibration_candidates(sources: Iterable[str | os.PathLike]) -> list[tuple[Path, int | None]]:
    """(shard, row group) for each shard row and (image file, None) for each image, in source order.

    FileNotFoundError for a source that does not exist; ValueError for one that holds neither."""
    found: list[tuple[Path, int | None]] = []
    for source in map(Path, sources):
        if not source.exists():
            raise FileNotFoundError(f"{source}: no such shard or image file or folder")
        if source.is_dir():
            shards = _shard_files(source)
            files = [] if shards else _image_files(source)
        else:
            shards = [source] if source.suffix == ".parquet" else []
            files = [] if shards else [source]
        if not shards and not files:
            raise ValueError(f"{source}: neither shards (*.parquet) nor image files")
        for shard in shards:  # a row group is one row (fusionnet.data.shards)
            found.extend((shard, group) for group in range(pq.ParquetFile(shard).num_row_groups))
        found.extend((path, None) for path in files)
    return found


def calibration_images(sources: Iterable[str | os.PathLike], count: int = DEFAULT_COUNT, seed: int = 0,
                       max_side: int = 1024) -> list[np.ndarray]:
    """Up to `count` `(H,W,3)` float32 images in [0,1] from `sources` (see the module doc); image files
    are decoded with their longer side at most `max_side`."""
    candidates = calibration_candidates(sources)
    if len(candidates) > count:
        pick = np.random.default_rng(seed).choice(len(candidates), size=count, replace=False)
        candidates = [candidates[i] for i in sorted(pick)]
    images = []
    for path, group in candidates:
        if group is None:
            images.append(load_image(path, max_side=max_side).rgb)
        else:
            table = pq.ParquetFile(path).read_row_group(group, columns=["image", "alpha", "height", "width"])
            images.append(row_arrays(table.to_pylist()[0])[0].astype(np.float32) / 255.0)
    return images
