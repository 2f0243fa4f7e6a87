"""The evaluation sets: test composites (data/composites) and real photographs with ground truth.

`EvalSample` is one image with its alpha, the trimap the trimap-based baselines get, and its regions
(fusionnet.evaluation.rows scores each row in each region). Composites have "band" (the trimap's unknown
region, the "-25" band) and "full"; photos one region per trimap folder and "full".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusionnet.data.imagefiles import IMAGE_SUFFIXES, read_alpha, read_rgb
from fusionnet.metrics import unknown_mask

__all__ = ["EvalSample", "composite_regions", "load_composites", "load_photos", "photo_files"]


@dataclass(frozen=True)
class EvalSample:
    """One evaluation image.

    image: (H,W,3) uint8 RGB; alpha: (H,W) float32 in [0,1] ground truth; trimap: (H,W) uint8
    0/128/255, the one given to the trimap-based baselines; regions: name -> (H,W) bool mask, or
    None for the whole image; region_trimaps: region -> the trimap the trimap-based baselines get
    when scored in that region (photos: each trimap's own region), other regions use `trimap`.
    """

    name: str
    image: np.ndarray
    alpha: np.ndarray
    trimap: np.ndarray
    regions: Mapping[str, np.ndarray | None]
    region_trimaps: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def rgb(self) -> np.ndarray:
        """(H,W,3) float32 in [0,1]."""
        return self.image.astype(np.float32) / 255.0


def composite_regions(trimap: np.ndarray) -> dict[str, np.ndarray | None]:
    """The composites' two regions: "band" (trimap == 128, the "-25" band) and "full"."""
    return {"band": unknown_mask(trimap), "full": None}


def load_composites(composites_dir: str | Path, split: str = "test", limit: int | None = None) -> list[EvalSample]:
    """Composites of one split from data/composites (manifest.parquet; paths relative to the dir).

    limit: at most this many, spread evenly over the split's cids in sorted order.
    """
    import pyarrow.parquet as pq

    root = Path(composites_dir)
    manifest = root / "manifest.parquet"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no composites manifest (run the `composite` stage first)")
    lines = sorted((r for r in pq.read_table(manifest).to_pylist() if r["split"] == split), key=lambda r: r["cid"])
    if limit is not None and len(lines) > limit:
        step = len(lines) / limit
        lines = [lines[int(i * step)] for i in range(limit)]
    samples = []
    for line in lines:
        image = read_rgb(root / line["image_path"])
        alpha = read_alpha(root / line["alpha_path"])
        trimap = read_alpha(root / line["trimap_path"])
        if image.shape[:2] != alpha.shape or alpha.shape != trimap.shape:
            raise ValueError(f"{root / line['image_path']}: image, alpha and trimap sizes differ")
        samples.append(
            EvalSample(line["cid"], image, alpha.astype(np.float32) / 255.0, trimap, composite_regions(trimap))
        )
    return samples


def photo_files(root: str | Path) -> list[Path]:
    """The photographs of an alphamatting.com-style folder: root/image/*, sorted by name."""
    folder = Path(root) / "image"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no image folder of real photographs")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_photos(
    root: str | Path,
    trimaps: Sequence[str] = ("trimap1", "trimap2"),
    baseline_trimap: str = "trimap1",
    limit: int | None = None,
    names: Sequence[str] | None = None,
) -> list[EvalSample]:
    """Real photographs laid out as alphamatting.com's: image/, alpha/, and one folder per trimap.

    Regions: one per trimap folder (its unknown pixels) and "full"; the trimap-based baselines get
    each trimap in its own region and `baseline_trimap` on "full". Files are matched by name; an
    image without alpha or trimaps is an error. names: only these image file names (None = all);
    limit: the first `limit` of those in name order (None = all). Other photos are not read.
    """
    root = Path(root)
    if baseline_trimap not in trimaps:
        raise ValueError(f"load_photos: baseline_trimap {baseline_trimap!r} is not one of {list(trimaps)}")
    images = photo_files(root)
    if names is not None:
        wanted = set(names)
        images = [p for p in images if p.name in wanted]
    images = images[:limit]
    samples = []
    for path in images:
        image = read_rgb(path)
        alpha = read_alpha(root / "alpha" / path.name)
        tris = {name: read_alpha(root / name / path.name) for name in trimaps}
        for name, tri in [("alpha", alpha), *tris.items()]:
            if tri.shape != image.shape[:2]:
                raise ValueError(f"{root / name / path.name}: size {tri.shape} != image size {image.shape[:2]}")
        regions: dict[str, np.ndarray | None] = {name: unknown_mask(tri) for name, tri in tris.items()}
        regions["full"] = None
        samples.append(EvalSample(path.stem, image, alpha.astype(np.float32) / 255.0, tris[baseline_trimap],
                                  regions, region_trimaps=tris))
    return samples
