"""What an evaluation record becomes on disk: the compact DVC metrics table and photos.json.

The DVC metrics are only the paper's table numbers, one small JSON file per table row, so that
`dvc metrics show` prints a narrow table (a line per method, a column per region and metric)
instead of one line of every number the step produces:

- metrics/table/composites/<row>.json   {"band"|"full": {sad, mse, grad, conn}}   (band: the "-25")
- metrics/table/photos/<row>.json       {"trimap1"|"trimap2"|"full": {sad, mse, grad, conn}}
                                        (only when real photos were scored)

the same names as metrics/evaluate.json[row] (register.metric `raw.band.sad` is column `band.sad`
of composites/raw.json), rounded to 4 significant digits: full precision stays in evaluate.json and
photos.json, which the registry compares. Claims, provenance, held-out lists, guided-filter grids
and timings live in the plain (non-metric) outputs written by fusionnet.evaluation.report.write_evaluation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fusionnet.evaluation import report

TABLE_DIR = "table"  # metrics/table: the one DVC metrics entry of the evaluate stage
SIGNIFICANT_DIGITS = 4


def _rounded(value: Any) -> float | None:
    """value to SIGNIFICANT_DIGITS significant digits; None for NaN/inf/None (JSON null)."""
    if value is None or not math.isfinite(float(value)):
        return None
    return float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")


def table_row(regions: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
    """One row of evaluate.json / photos.json "rows", {region: {metric: mean}}, with every value
    rounded (`_rounded`); same keys, same order."""
    return {region: {metric: _rounded(value) for metric, value in values.items()} for region, values in regions.items()}


def table_metrics(record: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{"composites": {row: {region: {metric}}}, "photos": ... (when photos were scored)} from a record
    of pipeline.evaluation.run_evaluation."""
    out = {"composites": {row: table_row(regions) for row, regions in record["evaluate"].items()}}
    if "rows" in record["photos"]:
        out["photos"] = {row: table_row(regions) for row, regions in record["photos"]["rows"].items()}
    return out


def write_table_metrics(record: Mapping[str, Any], metrics_dir: Path) -> list[str]:
    """Write metrics_dir/table/{composites,photos}/<row>.json (`table_metrics`); returns the paths.

    The folder is replaced as a whole: built in a temp sibling, then swapped in, so a reader never
    sees half a table, and rows (or photos) of an earlier run with another configuration are gone.
    """
    metrics_dir = Path(metrics_dir)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    target = metrics_dir / TABLE_DIR
    tables = table_metrics(record)
    fresh = Path(tempfile.mkdtemp(prefix=f".{TABLE_DIR}.new.", dir=metrics_dir))
    try:
        os.chmod(fresh, 0o755)  # mkdtemp's 0700 would become the table folder's mode
        names = []
        for group, rows in tables.items():
            (fresh / group).mkdir()
            for row, regions in rows.items():
                text = json.dumps(regions, indent=2, allow_nan=False) + "\n"
                (fresh / group / f"{row}.json").write_text(text, encoding="utf-8")
                names.append(f"{group}/{row}.json")
        old = Path(tempfile.mkdtemp(prefix=f".{TABLE_DIR}.old.", dir=metrics_dir))
        if target.exists():
            os.replace(target, old / TABLE_DIR)
        try:
            os.replace(fresh, target)
        except BaseException:
            if (old / TABLE_DIR).exists():
                os.replace(old / TABLE_DIR, target)  # put the previous table back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    return [str(target / name) for name in names]


def photos_record(result, skipped: str | None, held_out: dict | None, trimaps: list[str]) -> dict[str, Any]:
    """metrics/photos.json: {"held_out": which photos were scored, which excluded and why, "rows":
    {row: {"trimap1"|"trimap2"|"full": {...}}}, "comparisons": the claims' ratios
    (fusionnet.evaluation.report.photo_comparisons)}, or {"skipped": reason[, "held_out"]}."""
    selection = {k: v for k, v in held_out.items() if k != "files"} if held_out else None
    if result is None:
        return {"skipped": skipped, **({"held_out": selection} if selection else {})}
    return {"held_out": selection, "rows": result.summary,
            "comparisons": report.photo_comparisons(result.summary, trimaps)}
