"""The evaluation: checkpoints -> Tables 1/2 rows, claims, pictures -> files (no MLflow or Prefect here).

Run as the Prefect tasks of pipeline.tasks (tune-refinement, evaluate) by the DVC stage
(stages/evaluate.py) and by the training flow, which log the record to MLflow
(pipeline.tracking.evaluation). This module computes; fusionnet.evaluation.data says which data is
scored (test-set version, held-out photos) and fusionnet.evaluation.outputs writes the compact DVC
metrics. Writes, atomically:

- metrics/table/{composites,photos}/<row>.json   the DVC metrics: the table's numbers only, e.g.
                          {"SAD-25", "MSE-25", "Grad-25", "Conn-25", "SAD-full", ...} (4 significant
                          digits; fusionnet.evaluation.outputs)
- metrics/evaluate.json   {row: {"band"|"full": {sad, mse, grad, conn}}}    (test composites, full precision)
- metrics/claims.json     {"composites"|"photos": {source: implicit-trimap IoU/recall, bracketing}}
- metrics/photos.json     {"held_out": which photos were scored, which excluded and why,
                           "rows": {row: {"trimap1"|"trimap2"|"full": {...}}}, "comparisons": the claims'
                           ratios (fusionnet.evaluation.report.photo_comparisons)} or {"skipped": reason, ...}
- metrics/details.json    guided-filter choice, image counts, seconds, provenance (checkpoint + sha256),
                          "test_set": the test composites' data version (`split_data_version`)
- reports/table.md, reports/per_image.csv, reports/per_image_photos.csv, reports/pictures/*.png

(all but metrics/table are plain DVC outputs, not metrics); pipeline.tasks logs the same as a child
run "evaluate" of the pipeline's MLflow parent run.

Real photographs are scored only when held out (fusionnet.evaluation.data.held_out_photos): a photo
that is the source file of a train or val foreground in data/foregrounds/manifest.parquet is not
scored on what the model was trained on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fusionnet.evaluation import report
from fusionnet.evaluation.config import EvalConfig
from fusionnet.evaluation.data import held_out_photos, split_data_version
from fusionnet.evaluation.outputs import photos_record, write_headline_metrics, write_table_metrics
from fusionnet.evaluation.rows import (
    ROW_BY_NAME,
    ROWS,
    SOURCES,
    RowSettings,
    evaluate_set,
    load_composites,
    load_photos,
    needed_sources,
    tune_guided_filter,
)
from fusionnet.hardware import exact_fp32
from fusionnet.inference.loading import load_model
from fusionnet.inference.matter import Matter
from fusionnet.io.hashing import file_sha256

NO_CHECKPOINT = ("trimap", "none")  # row sources that need no model file
COMPARISON_ROWS = ("raw", "segmentation_only", "constant_half", "zeros")  # always scored on photos (the claims)


# ----------------------------------------------------------------------------- checkpoints


def branches_identical(a: Path, b: Path) -> bool:
    """True when two model files hold the same encoder and decoders (every tensor outside `fusion.`).

    The fusion step trains only the fusion network (paper Sec. 3.4); when it left the branches
    untouched (BatchNorm statistics included) the segmentation model's F and B can be read off
    the fusion model's forward pass, which saves one network pass per image.
    """
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        keys_a = {k for k in fa.keys() if not k.startswith("fusion.")}
        keys_b = {k for k in fb.keys() if not k.startswith("fusion.")}
        if keys_a != keys_b or (fa.metadata() or {}).get("config") != (fb.metadata() or {}).get("config"):
            return False
        import torch

        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in sorted(keys_a))


def make_predictor(path: Path, config: EvalConfig):
    """A fusionnet.evaluation.rows Predictor running the model file at `path` (no refinement).

    Runs inside `exact_fp32()`: the tables are references, so float32 stays float32 on a GPU (no TF32)
    whatever `config.precision` (a bf16/fp16 precision still runs in its own dtype).
    """
    matter = Matter(
        load_model(path, device=config.device),
        device=config.device,
        precision=config.precision,
        max_side=config.max_side,
        refine=False,
    )

    def predict(rgb: np.ndarray) -> dict[str, np.ndarray]:
        with exact_fp32():
            result = matter(rgb)
        return {"alpha": result.raw_alpha, "fg_prob": result.fg_prob, "bg_prob": result.bg_prob}

    return predict


def provenance(rows: list[str], checkpoints: Mapping[str, Path], hashes: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """row -> {"source", "checkpoint", "sha256"} (the trimap baselines have no checkpoint)."""
    out = {}
    for row in rows:
        source = ROW_BY_NAME[row].source
        if source in checkpoints:
            out[row] = {"source": source, "checkpoint": str(checkpoints[source]), "sha256": hashes[source]}
        else:
            what = "uses the evaluation trimap" if source == "trimap" else "alpha = 0"
            out[row] = {"source": source, "checkpoint": f"none ({what})", "sha256": ""}
    return out


# ----------------------------------------------------------------------------- the run


def tune_refinement(
    params: Mapping[str, Any], joint_checkpoint: Path, composites: Path, predictor: Any = None
) -> dict[str, Any]:
    """The guided filter's radius and eps (paper Sec. 3.5) chosen on the validation composites.

    Returns {"radius", "eps", "metric", "grid", "val_images", "seconds"}; with no validation
    composites, the grid's first point (val_images 0). predictor: the joint model's, if built.
    """
    t0 = time.perf_counter()
    config = EvalConfig.from_params(params)
    val = load_composites(composites, "val", limit=config.gf_max_val_images)
    if not val:
        return {"radius": config.gf_radii[0], "eps": config.gf_eps[0], "val_images": 0,
                "seconds": round(time.perf_counter() - t0, 2)}
    predictor = predictor or make_predictor(Path(joint_checkpoint), config)
    gf = tune_guided_filter(val, predictor, config.gf_radii, config.gf_eps, config.gf_metric)
    gf["val_images"] = len(val)
    gf["seconds"] = round(time.perf_counter() - t0, 2)
    return gf


def run_evaluation(
    params: Mapping[str, Any],
    checkpoints: Mapping[str, Path],
    composites: Path,
    metrics_dir: Path = Path("metrics"),
    reports_dir: Path = Path("reports"),
    base_dir: Path = Path("."),
    foregrounds: Path | None = None,
    guided_filter: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate, write every output file, and return the record (what the files hold, plus paths).

    guided_filter: the refinement already tuned (`tune_refinement`: radius, eps, ...) for the
    "refined" rows; tuned here when None.

    checkpoints: source -> model file for the sources the configured rows need (missing ones
    drop their rows, with a note). base_dir: what a relative photos root (and a relative source
    path in the foregrounds manifest) is relative to. foregrounds: the collect_foregrounds output
    whose manifest says which photos were trained on (default: data/foregrounds beside composites);
    read only when there are photos to score.
    """
    start = time.perf_counter()
    config = EvalConfig.from_params(params)
    if config.threads:
        import torch

        torch.set_num_threads(int(config.threads))  # a shared CPU: fewer threads than cores avoids thrashing
    notes: list[str] = []
    checkpoints = {s: Path(p) for s, p in checkpoints.items() if p is not None}
    for source, path in checkpoints.items():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {source} checkpoint (train that step first)")
    rows = [r for r in config.rows if ROW_BY_NAME[r].source in (*checkpoints, *NO_CHECKPOINT)]
    dropped = [r for r in config.rows if r not in rows]
    if dropped:
        notes.append(f"rows {dropped} left out: no checkpoint for {sorted({ROW_BY_NAME[r].source for r in dropped})}")
    hashes = {s: file_sha256(p) for s, p in checkpoints.items()}

    aliases: dict[str, str] = {}
    sources = [s for s in SOURCES if s in checkpoints]
    if "segmentation" in checkpoints and "fusion" in checkpoints:
        if branches_identical(checkpoints["segmentation"], checkpoints["fusion"]):
            aliases["segmentation"] = "fusion"
            sources.remove("segmentation")
            notes.append("segmentation F/B read off the fusion model's pass (identical branch weights)")
    predictors = {s: make_predictor(checkpoints[s], config) for s in sources}
    timings: dict[str, float] = {}

    settings = RowSettings(closed_form_max_side=config.closed_form_max_side)
    gf: dict[str, Any] = {}
    photo_rows = [r.name for r in ROWS if r.name in (*config.photos_rows, *COMPARISON_ROWS)
                  and r.source in (*checkpoints, *NO_CHECKPOINT)]
    if "refined" in (*rows, *photo_rows) and "joint" in predictors:
        t0 = time.perf_counter()
        gf = dict(guided_filter) if guided_filter else tune_refinement(params, checkpoints["joint"], composites,
                                                                      predictors["joint"])
        if gf.get("val_images") == 0:
            notes.append("no validation composites: guided filter uses the first grid point")
        settings = RowSettings(gf["radius"], gf["eps"], config.closed_form_max_side)
        timings["tune_guided_filter"] = gf.get("seconds", time.perf_counter() - t0)

    t0 = time.perf_counter()
    test = load_composites(composites, "test")
    if not test:
        raise ValueError(f"{composites}: no test composites in the manifest")
    composites_result = evaluate_set(
        test, predictors, rows, settings, aliases=aliases,
        trimap_threshold=config.implicit_trimap_threshold, workers=config.workers, keep=True,
    )
    timings["composites"] = time.perf_counter() - t0
    notes.extend(composites_result.notes)
    test_set = split_data_version(composites, "test")

    photos_result, photos_skipped, held_out = None, None, None
    root = None if not config.photos_root else (base_dir / config.photos_root)
    if root is None:
        photos_skipped = "evaluate.photos.root is empty"
    elif not (root / "image").is_dir():
        photos_skipped = f"{root} is absent (no real photographs on this machine)"
    elif not photo_rows:
        photos_skipped = "no photo rows configured"
    else:
        held_out = held_out_photos(root, foregrounds or Path(composites).parent / "foregrounds", base_dir,
                                   config.photos_max_images)
        held_out["root"] = str(config.photos_root)  # as configured, not this machine's absolute path
        if not held_out["scored"]:
            photos_skipped = f"none of the {held_out['photos']} photos is held out (see held_out.excluded)"
    if photos_skipped:
        print(f"evaluate: real photographs skipped: {photos_skipped}", file=sys.stderr)
    else:
        t0 = time.perf_counter()
        photos = load_photos(root, config.photos_trimaps, config.photos_baseline_trimap,
                             names=held_out["files"])
        # only the passes the photo rows need (plus the joint model's, for the claims)
        wanted = {aliases.get(s, s) for s in [*needed_sources(photo_rows), "joint"]}
        photo_predictors = {s: p for s, p in predictors.items() if s in wanted}
        photos_result = evaluate_set(
            photos, photo_predictors, photo_rows, settings, aliases=aliases,
            trimap_threshold=config.implicit_trimap_threshold, workers=config.workers,
        )
        timings["photos"] = time.perf_counter() - t0
        notes.extend(photos_result.notes)
    timings["total"] = time.perf_counter() - start

    record = {
        "evaluate": composites_result.summary,
        "claims": {"composites": composites_result.claims, **({"photos": photos_result.claims} if photos_result else {})},
        "photos": photos_record(photos_result, photos_skipped, held_out, config.photos_trimaps),
        "details": {
            "guided_filter": gf,
            "test_set": test_set,
            "images": {"test": len(test), "photos": len(photos_result.per_image) if photos_result else 0,
                       "photos_excluded": len(held_out["excluded"]) if held_out else 0},
            "network": {"max_side": config.max_side, "precision": config.precision},
            "seconds": {k: round(v, 2) for k, v in timings.items()},
            "provenance": provenance(
                [r.name for r in ROWS if r.name in rows or (photos_result and r.name in photo_rows)], checkpoints, hashes
            ),
        },
        "notes": notes,
    }
    test_images = {sample.name: sample for sample in test}
    record["files"] = report.write_evaluation(
        record, composites_result, photos_result, test_images, config.pictures, metrics_dir, reports_dir
    )
    record["table_files"] = write_table_metrics(record, metrics_dir)  # the whole table, a plain output
    record["headline_files"] = write_headline_metrics(record, metrics_dir)  # the DVC metrics: few columns
    return record
