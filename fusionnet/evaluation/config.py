"""The `evaluate:` section of params.yaml as one dataclass, parsed once per process (`EvalConfig.from_params`).

The network runs at the working scale, crops.max_side (`fusionnet.data.crops.working_scale`): the
scale it was trained at."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fusionnet.data.crops import CropParams, refuse_moved_scale, working_scale
from fusionnet.evaluation.rows import ROW_BY_NAME, ROWS


@dataclass
class EvalConfig:
    """The `evaluate:` section of params.yaml (see the comments there)."""

    rows: list[str] = field(default_factory=lambda: [r.name for r in ROWS if r.source != "none"])  # zeros: a photo row
    max_side: int = CropParams.__dataclass_fields__["max_side"].default  # from crops.max_side: see from_params
    precision: str = "auto"  # fastest measured here (fusionnet.inference.precision); params.yaml sets fp32 for the tables
    device: str = "cpu"
    threads: int | None = 1
    workers: int = 1
    implicit_trimap_threshold: float = 0.95
    closed_form_max_side: int | None = 160
    gf_radii: list[int] = field(default_factory=lambda: [2, 4, 8])
    gf_eps: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])
    gf_metric: str = "sad"
    gf_max_val_images: int = 6
    pictures: int = 2
    photos_root: str | None = "../shared/data/alphamatting-dev"
    photos_trimaps: list[str] = field(default_factory=lambda: ["trimap1", "trimap2"])
    photos_baseline_trimap: str = "trimap1"
    photos_rows: list[str] = field(default_factory=lambda: ["raw", "refined", "constant_half"])
    photos_max_images: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "EvalConfig":
        section = dict(params.get("evaluate") or {})
        refuse_moved_scale(section, "evaluate")
        gf = dict(section.pop("guided_filter", None) or {})
        photos = dict(section.pop("photos", None) or {})
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key not in cls.__dataclass_fields__:
                raise ValueError(f"params evaluate.{key}: unknown key")
            values[key] = value
        for prefix, sub in (("gf_", gf), ("photos_", photos)):
            for key, value in sub.items():
                name = prefix + key
                if name not in cls.__dataclass_fields__:
                    raise ValueError(f"params evaluate.{'guided_filter' if prefix == 'gf_' else 'photos'}.{key}: unknown key")
                values[name] = value
        config = cls(**values, max_side=working_scale(params))
        for name in (*config.rows, *config.photos_rows):
            if name not in ROW_BY_NAME:
                raise ValueError(f"params evaluate: unknown row {name!r}; choose from {', '.join(ROW_BY_NAME)}")
        return config
