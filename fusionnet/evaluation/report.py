"""Evaluation reports: the paper's table layout in Markdown, per-image CSVs, picture panels, metrics JSON.

`write_evaluation` writes everything the evaluate step produces (see fusionnet/evaluation/run.py for the
list) from the record it builds and the fusionnet.evaluation.rows results.

Writers are atomic (temporary sibling + os.replace), so an interrupted evaluation never leaves a
half-written table that looks complete.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from fusionnet.evaluation.rows import ROWS, SetResult
from fusionnet.io.atomic import write_bytes_atomic

__all__ = [
    "error_colormap",
    "evaluation_markdown",
    "markdown_table",
    "photo_comparisons",
    "picture_panel",
    "write_csv",
    "write_evaluation",
    "write_png",
    "write_text",
]

METRIC_LABELS = {"sad": "SAD", "mse": "MSE", "grad": "Grad", "conn": "Conn"}
REGION_SUFFIX = {"band": "-25", "full": "-full"}


# ----------------------------------------------------------------------------- atomic writers


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """(H,W) or (H,W,3) uint8 -> PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=3)
    return write_bytes_atomic(path, buffer.getvalue())


def write_csv(path: str | os.PathLike, lines: Sequence[Mapping[str, object]], header: Sequence[str] = ()) -> Path:
    """One CSV row per mapping; columns `header` then the rest in first-seen order; floats to 6 digits."""
    columns: list[str] = list(header)
    for line in lines:
        columns.extend(k for k in line if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for line in lines:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in line.items()})
    return write_text(path, buffer.getvalue())


# ----------------------------------------------------------------------------- tables


def _fmt(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if metric == "mse" else f"{value:.3f}"  # ratios too: 3 decimals


def markdown_table(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    labels: Mapping[str, str],
    regions: Sequence[str] = ("band", "full"),
    metrics: Sequence[str] = ("sad", "mse", "grad", "conn"),
    region_names: Mapping[str, str] | None = None,
) -> str:
    """Rows = methods (summary order), columns = each metric for each region (paper Tab. 1 / 2).

    summary: {row: {region: {metric: value}}}; labels: row -> display name; region_names: region ->
    column suffix (default "-25" for "band", "-full" for "full", else the region's own name).
    """
    names = {**REGION_SUFFIX, **(region_names or {})}
    header = ["Method"] + [f"{METRIC_LABELS.get(m, m)}{names.get(r, '-' + r)}" for r in regions for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row, per_region in summary.items():
        cells = [labels.get(row, row)]
        for region in regions:
            values = per_region.get(region, {})
            cells.extend(_fmt(m, values.get(m)) for m in metrics)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def key_value_table(title_key: str, title_value: str, items: Mapping[str, object]) -> str:
    lines = [f"| {title_key} | {title_value} |", "|---|---|"]
    for key, value in items.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the photo claims

MODEL_ROWS = ("raw", "refined")
CONSTANT_HALF_MAX_RATIO = 0.75  # model SAD and MSE <= 0.75x constant 0.5's in each trimap region (>= 25% better)
ZEROS_MAX_RATIO = 0.35          # model SAD-full <= 0.35x that of alpha = 0


def _ratio(value: float | None, other: float | None) -> float:
    if value is None or other is None or not (math.isfinite(value) and math.isfinite(other)) or other <= 0:
        return math.nan
    return float(value) / float(other)


def photo_comparisons(summary: Mapping[str, Mapping[str, Mapping[str, float]]], trimap_regions: Sequence[str]) -> dict:
    """The photo claims as ratios model / baseline (lower is better) for each model row present.

    summary: the photo table {row: {region: {metric: mean}}}. Per model row ("raw", "refined"):
    - vs_constant_half: SAD and MSE ratios in each trimap region; holds when all <= 0.75;
    - vs_zeros: the SAD-full ratio; holds when <= 0.35;
    - vs_segmentation_only: SAD and MSE ratios in each trimap region and "full"; holds when every
      trimap-region ratio is < 1 (full is for information).
    A comparison whose baseline row is absent is left out; an undefined ratio (baseline 0) is NaN
    and does not hold. "holds" of the model: every comparison present holds.
    """
    def ratios(model, base, regions, metrics=("sad", "mse")):
        return {r: {m: _ratio(summary[model].get(r, {}).get(m), summary[base].get(r, {}).get(m)) for m in metrics}
                for r in regions}

    out: dict[str, dict] = {}
    for model in (m for m in MODEL_ROWS if m in summary):
        entry: dict[str, dict] = {}
        if "constant_half" in summary:
            found = ratios(model, "constant_half", trimap_regions)
            holds = all(v <= CONSTANT_HALF_MAX_RATIO for r in found.values() for v in r.values())
            entry["vs_constant_half"] = {**found, "rule": "every ratio <=", "threshold": CONSTANT_HALF_MAX_RATIO,
                                         "holds": holds}
        if "zeros" in summary:
            found = ratios(model, "zeros", ["full"], ["sad"])
            entry["vs_zeros"] = {**found, "rule": "ratio <=", "threshold": ZEROS_MAX_RATIO,
                                 "holds": found["full"]["sad"] <= ZEROS_MAX_RATIO}
        if "segmentation_only" in summary:
            found = ratios(model, "segmentation_only", [*trimap_regions, "full"])
            holds = all(found[r][m] < 1.0 for r in trimap_regions for m in ("sad", "mse"))
            entry["vs_segmentation_only"] = {**found, "rule": "every trimap-region ratio <", "threshold": 1.0,
                                             "holds": holds}
        entry["holds"] = bool(entry) and all(c["holds"] for c in entry.values())
        out[model] = entry
    return out



def comparisons_markdown(comparisons: Mapping[str, Mapping[str, Any]]) -> str:
    """| model | comparison | ratios (region metric) | rule | holds |."""
    lines = ["| Model | against | ratio model / baseline | rule | holds |", "|---|---|---|---|---|"]
    for model, entry in comparisons.items():
        for name, c in entry.items():
            if name == "holds":
                continue
            ratios = ", ".join(f"{m.upper()}-{r} {_fmt('ratio', v)}" for r, per in c.items() if isinstance(per, Mapping)
                               for m, v in per.items())
            lines.append(f"| {model} | {name[3:]} | {ratios} | {c['rule']} {c['threshold']:g} | "
                         f"{'yes' if c['holds'] else 'no'} |")
    return "\n".join(lines) + "\n"


def held_out_markdown(held_out: Mapping[str, Any]) -> str:
    """Which photos were scored and which were left out, and why."""
    scored, excluded = held_out["scored"], held_out["excluded"]
    text = (f"Held out (scored): {len(scored)} of {held_out['photos']} photos in {held_out['root']}: "
            f"{', '.join(scored) or 'none'}. Checked against {held_out['manifest']}: a photo that is the source "
            "of a train or val foreground is not scored.\n")
    if excluded:
        text += "\nExcluded:\n\n" + "".join(f"- {name}: {why}\n" for name, why in excluded.items())
    else:
        text += "\nExcluded: none.\n"
    return text


# ----------------------------------------------------------------------------- pictures


def error_colormap(error: np.ndarray) -> np.ndarray:
    """|error| in [0,1] -> (H,W,3) uint8 on a black-red-yellow-white ramp (0 = black, >= 1 = white)."""
    e = np.clip(np.asarray(error, dtype=np.float32) * 3.0, 0.0, 3.0)
    rgb = np.stack([np.clip(e, 0, 1), np.clip(e - 1, 0, 1), np.clip(e - 2, 0, 1)], axis=-1)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _gray(alpha: np.ndarray) -> np.ndarray:
    g = (np.clip(np.asarray(alpha, dtype=np.float32), 0, 1) * 255.0 + 0.5).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def picture_panel(
    image: np.ndarray,
    gt: np.ndarray,
    alpha: np.ndarray,
    implicit_trimap: np.ndarray | None,
    title: str,
    tile_side: int = 256,
) -> np.ndarray:
    """One row of tiles: input | ground truth | alpha | implicit trimap | |alpha - gt| (error map).

    image: (H,W,3) uint8; gt, alpha: (H,W) float in [0,1]; implicit_trimap: (H,W) uint8 0/128/255
    (None: a blank tile). Tiles are scaled so the longer side is `tile_side`; a caption strip on top
    names each tile and carries `title`. Returns (h, w, 3) uint8.
    """
    error = np.abs(np.asarray(alpha, np.float32) - np.asarray(gt, np.float32))
    trimap = _gray(implicit_trimap / 255.0) if implicit_trimap is not None else np.zeros_like(image)
    tiles = [
        ("input", image),
        ("ground truth", _gray(gt)),
        ("alpha", _gray(alpha)),
        ("implicit trimap", trimap),
        ("|alpha - gt|", error_colormap(error)),
    ]
    height, width = image.shape[:2]
    scale = tile_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    caption_h, gap = 30, 4
    canvas = Image.new("RGB", (len(tiles) * (size[0] + gap) - gap, size[1] + caption_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill=(0, 0, 0))
    for i, (name, tile) in enumerate(tiles):
        x = i * (size[0] + gap)
        canvas.paste(Image.fromarray(np.ascontiguousarray(tile)).resize(size, Image.Resampling.BILINEAR), (x, caption_h))
        draw.text((x + 2, 15), name, fill=(0, 0, 0))
    return np.asarray(canvas)


# ----------------------------------------------------------------------------- the evaluation's files


def _csv_lines(result: SetResult) -> list[dict[str, Any]]:
    return [{k.replace(".", "_"): v for k, v in line.items()} for line in result.per_image]


def _pictures(result: SetResult, test_images: Mapping[str, Any], count: int, out_dir: Path) -> list[Path]:
    """Worst and best `count` images by the raw row's band SAD (else the first row's)."""
    lines = result.per_image
    if not lines or count <= 0:
        return []
    key = "raw.band.sad" if "raw.band.sad" in lines[0] else next(k for k in lines[0] if k.endswith(".band.sad"))
    row = key.split(".")[0]
    ranked = sorted(lines, key=lambda line: float(line[key]))
    picks = [("best", i + 1, line) for i, line in enumerate(ranked[:count])]
    picks += [("worst", i + 1, line) for i, line in enumerate(ranked[::-1][:count])]
    written = []
    for kind, rank, line in picks:
        name = str(line["image"])
        sample, kept = test_images[name], result.kept[name]
        title = f"{kind} {rank}: {name}  {row} SAD-25 {float(line[key]):.3f}"
        panel = picture_panel(sample.image, sample.alpha, kept[row], kept.get("implicit_trimap"), title)
        written.append(write_png(out_dir / f"{kind}_{rank}_{name}.png", panel))
    return written


CLAIM_COLUMNS = {
    "implicit_trimap_recall": "recall",
    "implicit_trimap_precision": "precision",
    "implicit_trimap_iou": "IoU",
    "implicit_unknown_fraction": "unknown share",
    "true_transition_fraction": "transition share",
    "bracketing_ratio": "bracketed (1-B <= a <= F)",
    "bracketing_ratio_either_order": "bracketed (either order)",
}


def claims_table(claims: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """| set | model | implicit-trimap recall, precision, IoU, shares | bracketing ratios |."""
    header = ["Set", "Model", *CLAIM_COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(CLAIM_COLUMNS)]
    for set_name, per_source in claims.items():
        for source, values in per_source.items():
            cells = [f"{values.get(k, float('nan')):.3f}" for k in CLAIM_COLUMNS]
            lines.append("| " + " | ".join([set_name, source, *cells]) + " |")
    return "\n".join(lines) + "\n"


def evaluation_markdown(record: Mapping[str, Any]) -> str:
    """reports/table.md: the table in the paper's layout, provenance, guided filter, claims, photos."""
    labels = {r.name: r.label for r in ROWS}
    details = record["details"]
    parts = [
        "# Evaluation (layout of the paper's Tables 1 and 2)\n\n",
        f"Test composites: {details['images']['test']} images; network input longer side "
        f"{details['network']['max_side']} px ({details['network']['precision']}). "
        "SAD, Grad and Conn are divided by 1000 (the paper's units); lower is better. "
        "-25: the composite trimap's unknown region (the transition band dilated by "
        "composite.band_radius px, the paper's 25); -full: the whole image.\n\n",
        markdown_table(record["evaluate"], labels),
        "\n## Provenance\n\n",
        "| Row | checkpoint | sha256 |\n|---|---|---|\n"
        + "".join(f"| {labels[r]} | {p['checkpoint']} | {p['sha256']} |\n" for r, p in details["provenance"].items()),
    ]
    gf = details.get("guided_filter") or {}
    if gf:
        chosen = f"radius {gf['radius']}, eps {gf['eps']:g}"
        scores = f" (mean -25 {gf.get('metric', 'sad').upper()}: raw {gf['raw']:.4f}, refined {gf['best']:.4f})" if "raw" in gf else ""
        parts.append(
            f"\n## Guided filter\n\nChosen on {gf.get('val_images', 0)} validation composites: {chosen}{scores}.\n"
        )
    parts.append(
        "\n## Paper claims\n\nImplicit trimap (Fig. 3: unknown where neither F nor B reaches the threshold) "
        "against the true transition pixels (0 < alpha < 1), and the bracketing ratio (Fig. 4: share of "
        "transition pixels whose true alpha lies between 1 - B and F), pooled over all pixels.\n\n"
        + claims_table(record["claims"])
    )
    photos = record["photos"]
    parts.append("\n## Real photographs (alphamatting.com training set, whole photos, held out only)\n\n")
    if "skipped" in photos:
        parts.append(f"Skipped: {photos['skipped']}.\n")
    if photos.get("held_out"):
        parts.append(("\n" if "skipped" in photos else "") + held_out_markdown(photos["held_out"]))
    if "rows" in photos:
        regions = list(next(iter(photos["rows"].values())).keys())
        parts.append(f"\n{details['images']['photos']} photos, no compositing; regions: each user trimap's unknown "
                     "pixels (the trimap baselines are given that trimap), and the whole photo (-full).\n\n")
        parts.append(markdown_table(photos["rows"], labels, regions=regions))
        if photos.get("comparisons"):
            parts.append("\n### Claims on the held-out photos\n\n" + comparisons_markdown(photos["comparisons"]))
    seconds = details.get("seconds", {})
    if seconds:
        parts.append("\n## Time\n\n" + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + ".\n")
    if record.get("notes"):
        parts.append("\n## Notes\n\n" + "".join(f"- {n}\n" for n in record["notes"]))
    return "".join(parts)


def write_evaluation(
    record: Mapping[str, Any],
    composites_result: SetResult,
    photos_result: SetResult | None,
    test_images: Mapping[str, Any],
    pictures: int,
    metrics_dir: Path,
    reports_dir: Path,
) -> list[str]:
    """Write metrics_dir/{evaluate,claims,photos,details}.json, reports_dir/table.md, the per-image
    CSVs and `pictures` best + worst panels; returns the paths written.

    record: what fusionnet.evaluation.run.run_evaluation measured; test_images: name -> EvalSample.
    NaN (e.g. MSE over an empty region) is written as JSON null.
    """
    files = []
    for name in ("evaluate", "claims", "photos", "details"):
        text = json.dumps(_nan_to_none(record[name]), indent=2, allow_nan=False) + "\n"
        files.append(write_text(metrics_dir / f"{name}.json", text))
    files.append(write_text(reports_dir / "table.md", evaluation_markdown(record)))
    files.append(write_csv(reports_dir / "per_image.csv", _csv_lines(composites_result)))
    # always written (a DVC output): just the header when the photos were skipped
    photo_lines = _csv_lines(photos_result) if photos_result is not None else []
    files.append(write_csv(reports_dir / "per_image_photos.csv", photo_lines, header=["image"]))
    folder = reports_dir / "pictures"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # pictures of a previous run name other images
        old.unlink()
    files.extend(_pictures(composites_result, test_images, pictures, folder))
    return [str(f) for f in files]


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value
