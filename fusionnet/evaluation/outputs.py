"""What an evaluation record becomes on disk: the headline DVC metrics, the table, photos.json.

The DVC metrics (dvc.yaml `metrics:`) are only the headline numbers, SAD and MSE of Ours-raw and
Ours-refined, so that `dvc exp show` and `dvc metrics diff` compare experiments in a few columns
(every metric file is a column per key there):

- metrics/headline/composites.json  {"raw"|"refined": {sad25, mse25, sad, mse}}   (25: the "-25" band)
- metrics/headline/photos.json      {"photo_raw"|"photo_refined": {sad_t1, mse_t1, sad, mse}}
                                    (trimap1's region and the whole photo; only when photos were scored)

Keys differ between the two files: DVC prefixes a key two files share with the file's path.
The whole table, one small JSON file per row, is a plain output beside them, so that
`dvc metrics show metrics/table` still prints a line per method:

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

TABLE_DIR = "table"  # metrics/table: the whole table, a plain output
HEADLINE_DIR = "headline"  # metrics/headline: the evaluate stage's one DVC metrics entry
# headline file -> (record rows, {key: (region, metric)}): SAD and MSE of the two methods of the paper
HEADLINE = {
    "composites": ({"raw": "raw", "refined": "refined"},
                   {"sad25": ("band", "sad"), "mse25": ("band", "mse"), "sad": ("full", "sad"), "mse": ("full", "mse")}),
    "photos": ({"photo_raw": "raw", "photo_refined": "refined"},
               {"sad_t1": ("trimap1", "sad"), "mse_t1": ("trimap1", "mse"), "sad": ("full", "sad"), "mse": ("full", "mse")}),
}
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


def headline_metrics(record: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{"composites": {"raw"|"refined": {sad25, mse25, sad, mse}}, "photos": {"photo_raw"|...}} from a
    record of pipeline.evaluation.run_evaluation, rounded (`_rounded`); a row the run did not score
    is left out, and so is "photos" when no photo was scored."""
    tables = table_metrics(record)
    out = {}
    for group, (rows, keys) in HEADLINE.items():
        table = tables.get(group, {})
        picked = {name: {key: table[row][region][metric] for key, (region, metric) in keys.items()}
                  for name, row in rows.items() if row in table}
        if picked:
            out[group] = picked
    return out


def _replace_folder(target: Path, files: Mapping[str, Any]) -> list[str]:
    """Write {relative path: JSON data} as the folder `target`, replacing it as a whole: built in a
    temp sibling, then swapped in, so a reader never sees half of it, and files of an earlier run
    with another configuration are gone; a failure keeps the folder before it. Returns the paths."""
    target.parent.mkdir(parents=True, exist_ok=True)
    texts = {name: json.dumps(data, indent=2, allow_nan=False) + "\n" for name, data in files.items()}
    fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}.new.", dir=target.parent))
    try:
        os.chmod(fresh, 0o755)  # mkdtemp's 0700 would become the folder's mode
        for name, text in texts.items():
            if "/" in name:  # one level of subfolders (a group); a row named "a/b" is an error
                (fresh / name.split("/")[0]).mkdir(exist_ok=True)
            (fresh / name).write_text(text, encoding="utf-8")
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        if target.exists():
            os.replace(target, old / target.name)
        try:
            os.replace(fresh, target)
        except BaseException:
            if (old / target.name).exists():
                os.replace(old / target.name, target)  # put the previous folder back
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    return [str(target / name) for name in files]


def write_table_metrics(record: Mapping[str, Any], metrics_dir: Path) -> list[str]:
    """Write metrics_dir/table/{composites,photos}/<row>.json (`table_metrics`), replacing the folder
    as a whole (`_replace_folder`); returns the paths."""
    files = {f"{group}/{row}.json": regions for group, rows in table_metrics(record).items()
             for row, regions in rows.items()}
    return _replace_folder(Path(metrics_dir) / TABLE_DIR, files)


def write_headline_metrics(record: Mapping[str, Any], metrics_dir: Path) -> list[str]:
    """Write metrics_dir/headline/{composites,photos}.json (`headline_metrics`), the stage's DVC
    metrics, replacing the folder as a whole; returns the paths."""
    files = {f"{group}.json": rows for group, rows in headline_metrics(record).items()}
    return _replace_folder(Path(metrics_dir) / HEADLINE_DIR, files)


def photos_record(result, skipped: str | None, held_out: dict | None, trimaps: list[str]) -> dict[str, Any]:
    """metrics/photos.json: {"held_out": which photos were scored, which excluded and why, "rows":
    {row: {"trimap1"|"trimap2"|"full": {...}}}, "comparisons": the claims' ratios
    (fusionnet.evaluation.report.photo_comparisons)}, or {"skipped": reason[, "held_out"]}."""
    selection = {k: v for k, v in held_out.items() if k != "files"} if held_out else None
    if result is None:
        return {"skipped": skipped, **({"held_out": selection} if selection else {})}
    return {"held_out": selection, "rows": result.summary,
            "comparisons": report.photo_comparisons(result.summary, trimaps)}
