"""Evaluation of the Late Fusion CNN as in the paper's Tables 1 and 2, plus its Fig. 3 / Fig. 4 claims.

Rows (`ROWS`): the network after each training step (paper Sec. 3.4) and three baselines,
every one scored by the same metric code (fusionnet.metrics: SAD, MSE, Gradient, Connectivity)
on each region of each image, then averaged over images (paper Sec. 4):

- fgbg_only_fg / fgbg_only_bg: the segmentation-step model, alpha = F and alpha = 1 - B;
- fusion_only: the fusion-step model's alpha (paper Eq. 2);
- raw / refined: the joint-step model's alpha, and that alpha after the guided filter;
- segmentation_only, closed_form, constant_half: baselines (see fusionnet.evaluation.baselines);
- zeros: alpha = 0 everywhere (the floor for SAD-full on real photos).

Regions: composites have "band" (the trimap's unknown region: the "-25" transition band) and
"full" (whole image, the paper's "-full"); real photos have "trimap1", "trimap2" and "full". On
photos a trimap baseline is scored in each trimap's region with the matte it makes from that trimap
(`EvalSample.region_trimaps`); fusionnet.evaluation.report.photo_comparisons turns the photo table into the
ratios the project claims (model / constant 0.5, model / alpha = 0, model / segmentation only).

Claims (`ClaimCounts`), pooled over all pixels of a set: the implicit trimap (paper Fig. 3,
fusionnet.refine.implicit_trimap) against the true transition pixels (0 < alpha < 1), and the
bracketing ratio (paper Fig. 4): the share of true transition pixels with 1 - B <= alpha <= F.

The network is reached only through `Predictor` callables, so this module needs no checkpoint.
The evaluation sets (`EvalSample`, `load_composites`, `load_photos`) are fusionnet.evaluation.sets'.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from fusionnet.evaluation import baselines
from fusionnet.evaluation.claims import ClaimCounts
from fusionnet.evaluation.sets import (  # noqa: F401  (re-exported: the evaluation API)
    EvalSample, composite_regions, load_composites, load_photos, photo_files)
from fusionnet.metrics import connectivity_error, gradient_error, mse, sad
from fusionnet.refine import guided_filter, implicit_trimap
from fusionnet.train.config import STEPS

__all__ = [
    "METRICS",
    "ROWS",
    "ClaimCounts",
    "EvalSample",
    "Row",
    "SetResult",
    "composite_regions",
    "evaluate_set",
    "load_composites",
    "load_photos",
    "photo_files",
    "region_metrics",
    "rows_for_sample",
    "tune_guided_filter",
]

METRICS: dict[str, Callable[..., float]] = {
    "sad": sad,
    "mse": mse,
    "grad": gradient_error,
    "conn": connectivity_error,
}
SOURCES = STEPS  # the three training steps' checkpoints
# Fig. 3 / Fig. 4 are about the branches: after the segmentation step and in the final model
# (the fusion step leaves F and B as they were).
CLAIM_SOURCES = ("segmentation", "joint")
NetworkMaps = dict[str, np.ndarray]  # "alpha", "fg_prob", "bg_prob": (H,W) float32 in [0,1]
Predictor = Callable[[np.ndarray], NetworkMaps]  # image (H,W,3) float32 in [0,1] -> maps at its size


@dataclass(frozen=True)
class Row:
    """One line of the table: `name` is its key in metrics files, `source` the checkpoint it needs.

    source: one of SOURCES, "trimap" for the baselines that take the evaluation trimap, or "none".
    """

    name: str
    label: str
    source: str


ROWS: tuple[Row, ...] = (
    Row("fgbg_only_fg", "Ours-FG/BG-only (alpha = F)", "segmentation"),
    Row("fgbg_only_bg", "Ours-FG/BG-only (alpha = 1 - B)", "segmentation"),
    Row("fusion_only", "Ours-Fusion-only", "fusion"),
    Row("raw", "Ours-raw", "joint"),
    Row("refined", "Ours-refined (guided filter)", "joint"),
    Row("segmentation_only", "Baseline: segmentation only, (F + 1 - B) / 2", "joint"),
    Row("closed_form", "Baseline: closed-form matting (given trimap)", "trimap"),
    Row("constant_half", "Baseline: constant 0.5 in the unknown region", "trimap"),
    Row("zeros", "Baseline: alpha = 0 everywhere", "none"),
)
ROW_BY_NAME = {row.name: row for row in ROWS}


# ----------------------------------------------------------------------------- per-image mattes


@dataclass(frozen=True)
class RowSettings:
    """How the non-network rows are computed: guided filter (radius, eps), closed-form solve size."""

    gf_radius: int = 4
    gf_eps: float = 1e-3
    closed_form_max_side: int | None = 320


def rows_for_sample(
    sample: EvalSample,
    maps: Mapping[str, NetworkMaps],
    rows: Sequence[str],
    settings: RowSettings,
    notes: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """The predicted matte of every requested row for one sample: name -> (H,W) float32 in [0,1].

    maps: source -> network maps at the sample's size (only the sources the rows need).
    A closed-form solve that cannot run (trimap without foreground or background) falls back to
    the constant baseline, with a line appended to `notes`.
    """
    out: dict[str, np.ndarray] = {}
    for name in rows:
        if name == "fgbg_only_fg":
            out[name] = maps["segmentation"]["fg_prob"]
        elif name == "fgbg_only_bg":
            out[name] = 1.0 - maps["segmentation"]["bg_prob"]
        elif name == "fusion_only":
            out[name] = maps["fusion"]["alpha"]
        elif name == "raw":
            out[name] = maps["joint"]["alpha"]
        elif name == "refined":
            out[name] = guided_filter(sample.rgb, maps["joint"]["alpha"], settings.gf_radius, settings.gf_eps)
        elif name == "segmentation_only":
            out[name] = baselines.segmentation_only_alpha(maps["joint"]["fg_prob"], maps["joint"]["bg_prob"])
        elif name == "closed_form":
            try:
                out[name] = baselines.closed_form_alpha(sample.image, sample.trimap, settings.closed_form_max_side)
            except ValueError as exc:
                out[name] = baselines.constant_alpha(sample.trimap)
                if notes is not None:
                    notes.append(f"{sample.name}: closed_form fell back to constant 0.5 ({exc})")
        elif name == "constant_half":
            out[name] = baselines.constant_alpha(sample.trimap)
        elif name == "zeros":
            out[name] = np.zeros(sample.alpha.shape, np.float32)
        else:
            raise ValueError(f"unknown evaluation row {name!r}; choose from {', '.join(ROW_BY_NAME)}")
    return {k: np.clip(np.asarray(v, dtype=np.float32), 0.0, 1.0) for k, v in out.items()}


def needed_sources(rows: Iterable[str]) -> list[str]:
    """The checkpoints (SOURCES order) the rows need."""
    wanted = {ROW_BY_NAME[r].source for r in rows if r in ROW_BY_NAME}
    return [s for s in SOURCES if s in wanted]


# ----------------------------------------------------------------------------- metrics


def region_metrics(
    pred: np.ndarray, gt: np.ndarray, regions: Mapping[str, np.ndarray | None], metrics: Sequence[str] = tuple(METRICS)
) -> dict[str, dict[str, float]]:
    """{region: {metric: value}} for one matte; values in the paper's units (SAD/Grad/Conn / 1000).

    pred, gt: (H,W) float in [0,1]; MSE is NaN on an empty region (left out of the means).
    """
    return {
        region: {m: float(METRICS[m](pred, gt, mask)) for m in metrics} for region, mask in regions.items()
    }


def _metrics_job(job: tuple[np.ndarray, np.ndarray, Mapping[str, np.ndarray | None]]) -> dict:
    return region_metrics(*job)


class _MetricRunner:
    """Scores mattes as soon as they exist: in `workers` spawned processes while the network
    goes on with the next image (0 = here, at once). Spawned, not forked: the parent holds torch
    threads. Results come back in submission order."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 0:
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        self.pending: list = []

    def submit(self, job: tuple) -> None:
        self.pending.append(self.pool.submit(_metrics_job, job) if self.pool else _metrics_job(job))

    def results(self) -> list[dict]:
        try:
            return [p.result() if self.pool else p for p in self.pending]
        finally:
            if self.pool:
                self.pool.shutdown()


# ----------------------------------------------------------------------------- one evaluation set


@dataclass
class SetResult:
    """Everything measured on one set of images.

    per_image: one dict per image {"image": name, "<row>.<region>.<metric>": value};
    summary: {row: {region: {metric: mean over images}}}; claims: {source: ClaimCounts.summary()};
    kept: name -> {row or "implicit_trimap": (H,W) array} for the images asked to keep (pictures);
    notes: what did not go as asked (e.g. a closed-form solve replaced by the constant baseline).
    """

    per_image: list[dict[str, float | str]] = field(default_factory=list)
    summary: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    claims: dict[str, dict[str, float]] = field(default_factory=dict)
    kept: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def evaluate_set(
    samples: Sequence[EvalSample],
    predictors: Mapping[str, Predictor],
    rows: Sequence[str],
    settings: RowSettings,
    *,
    aliases: Mapping[str, str] | None = None,
    trimap_threshold: float = 0.95,
    workers: int = 0,
    keep: bool = False,
) -> SetResult:
    """Score every row on every sample; see the module doc for rows, regions and claims.

    predictors: source -> Predictor for each source the rows need (and each claim source);
    aliases: source -> source whose forward pass gives the same F and B (e.g. "segmentation" ->
    "fusion" when the fusion step left the branches untouched): its F/B are reused, its alpha not.
    workers: processes scoring the mattes while the network runs (0 = in this process, serially).
    keep: keep the mattes and implicit
    trimap of every image in `SetResult.kept` (for pictures; costs memory).
    """
    aliases = dict(aliases or {})
    missing = [s for s in needed_sources(rows) if s not in predictors and aliases.get(s) not in predictors]
    if missing:
        raise ValueError(f"rows {list(rows)} need checkpoints for {missing}; none was given")
    result = SetResult()
    claim_counts = {s: ClaimCounts() for s in CLAIM_SOURCES if s in predictors or aliases.get(s) in predictors}
    runner = _MetricRunner(workers)
    jobs: list[tuple[int, str]] = []  # (sample index, row) of each scoring job, in submission order
    for index, sample in enumerate(samples):
        maps = _network_maps(sample, predictors, aliases)
        for source, counts in claim_counts.items():
            counts.add(sample.alpha, maps[source]["fg_prob"], maps[source]["bg_prob"], trimap_threshold)
        mattes = rows_for_sample(sample, maps, rows, settings, result.notes)
        if keep:
            kept = dict(mattes)
            if "joint" in maps:
                kept["implicit_trimap"] = implicit_trimap(
                    maps["joint"]["fg_prob"], maps["joint"]["bg_prob"], trimap_threshold
                )
            result.kept[sample.name] = kept
        for row in rows:
            for regions, matte in _scoring_jobs(sample, row, mattes[row], settings, result.notes):
                runner.submit((matte, sample.alpha, regions))
                jobs.append((index, row))
    merged: dict[tuple[int, str], dict] = {}
    for key, per_region in zip(jobs, runner.results()):
        merged.setdefault(key, {}).update(per_region)
    for index, sample in enumerate(samples):
        line: dict[str, float | str] = {"image": sample.name}
        for row in rows:
            for region in sample.regions:
                for metric, value in merged[(index, row)][region].items():
                    line[f"{row}.{region}.{metric}"] = value
        result.per_image.append(line)
    result.summary = summarise(result.per_image, rows)
    result.claims = {source: counts.summary() for source, counts in claim_counts.items()}
    return result


def _scoring_jobs(
    sample: EvalSample, row: str, matte: np.ndarray, settings: RowSettings, notes: list[str]
) -> list[tuple[dict[str, np.ndarray | None], np.ndarray]]:
    """(regions, matte) pairs to score for one row: a trimap baseline is scored in each region of
    `sample.region_trimaps` with the matte it makes from that region's trimap; the rest at once."""
    if ROW_BY_NAME[row].source != "trimap" or not sample.region_trimaps:
        return [(dict(sample.regions), matte)]
    own: dict[str, np.ndarray | None] = {}
    jobs = []
    for region, mask in sample.regions.items():
        trimap = sample.region_trimaps.get(region)
        if trimap is None or trimap is sample.trimap or np.array_equal(trimap, sample.trimap):
            own[region] = mask
        else:
            other = replace(sample, trimap=trimap, region_trimaps={})
            jobs.append(({region: mask}, rows_for_sample(other, {}, [row], settings, notes)[row]))
    return ([(own, matte)] if own else []) + jobs


def _network_maps(
    sample: EvalSample, predictors: Mapping[str, Predictor], aliases: Mapping[str, str]
) -> dict[str, NetworkMaps]:
    rgb = sample.rgb
    maps = {source: predict(rgb) for source, predict in predictors.items()}
    for source, target in aliases.items():
        if source not in maps and target in maps:
            maps[source] = {"fg_prob": maps[target]["fg_prob"], "bg_prob": maps[target]["bg_prob"]}
    return maps


def summarise(per_image: Sequence[Mapping[str, float | str]], rows: Sequence[str]) -> dict:
    """{row: {region: {metric: mean over images}}} from per-image lines (NaN values left out)."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    keys = [k for k in (per_image[0] if per_image else {}) if k != "image"]
    for key in keys:
        row, region, metric = key.split(".")
        values = np.array([float(line[key]) for line in per_image], dtype=np.float64)
        finite = values[np.isfinite(values)]
        mean = float(finite.mean()) if finite.size else math.nan
        summary.setdefault(row, {}).setdefault(region, {})[metric] = mean
    return {row: summary[row] for row in rows if row in summary}


# ----------------------------------------------------------------------------- guided-filter choice


def tune_guided_filter(
    samples: Sequence[EvalSample],
    predict: Predictor,
    radii: Sequence[int],
    eps_values: Sequence[float],
    metric: str = "sad",
    region: str = "band",
) -> dict[str, object]:
    """Pick the guided filter's (radius, eps) on validation samples by the mean `metric` in `region`.

    predict: the joint model's Predictor. Ties go to the first grid point (radii, then eps order).
    Returns {"radius", "eps", "metric", "raw": mean metric of the unfiltered alpha, "best": mean at the
    chosen point, "grid": {"r<radius>_eps<eps>": mean}}.
    """
    if not samples:
        raise ValueError("tune_guided_filter: no validation samples")
    if metric not in METRICS:
        raise ValueError(f"tune_guided_filter: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    scorer = METRICS[metric]
    grid = list(itertools.product([int(r) for r in radii], [float(e) for e in eps_values]))
    if not grid:
        raise ValueError("tune_guided_filter: empty (radius, eps) grid")
    totals = np.zeros(len(grid))
    raw_total = 0.0
    for sample in samples:
        rgb, alpha = sample.rgb, predict(sample.rgb)["alpha"]
        mask = sample.regions[region]
        raw_total += scorer(alpha, sample.alpha, mask)
        for i, (radius, eps) in enumerate(grid):
            totals[i] += scorer(guided_filter(rgb, alpha, radius, eps), sample.alpha, mask)
    means = totals / len(samples)
    best = int(np.argmin(means))
    return {
        "radius": grid[best][0],
        "eps": grid[best][1],
        "metric": metric,
        "raw": raw_total / len(samples),
        "best": float(means[best]),
        "grid": {f"r{r}_eps{e:g}": float(v) for (r, e), v in zip(grid, means)},
    }


# ----------------------------------------------------------------------------- loading sets
