"""The evaluation (fusionnet.evaluate, pipeline.evaluation): rows, regions, claims, provenance, files.

Helpers `make_composites` and `make_checkpoints` build a tiny data/composites layout (data contract)
and three tiny densenet121 checkpoints; tests/test_registry.py and tests/test_serving.py reuse them.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fusionnet import metrics
from fusionnet.data.trimap import band_trimap
from fusionnet.evaluate import (
    ClaimCounts,
    EvalSample,
    RowSettings,
    composite_regions,
    evaluate_set,
    load_composites,
    load_photos,
    region_metrics,
    summarise,
    tune_guided_filter,
)
from fusionnet.refine import guided_filter

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ----------------------------------------------------------------------------- builders


def soft_blob(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H,W) uint8 alpha: an ellipse with a soft 6-px edge, randomly placed."""
    yy, xx = np.mgrid[:height, :width].astype(np.float64)
    cy, cx = height * rng.uniform(0.4, 0.6), width * rng.uniform(0.4, 0.6)
    ry, rx = height * rng.uniform(0.2, 0.3), width * rng.uniform(0.2, 0.3)
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return np.round(np.clip((1.15 - d) / 0.3, 0, 1) * 255).astype(np.uint8)


def make_composites(root: Path, n_test: int = 3, n_val: int = 2, size=(64, 80), band: int = 6, seed: int = 0) -> Path:
    """A data/composites folder per the data contract: test/ and train/ (val) images, manifest.parquet."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_test + n_val):
        split, folder = ("test", "test") if i < n_test else ("val", "train")
        h, w = size
        alpha = soft_blob(h, w, rng)
        fg = np.broadcast_to(rng.uniform(100, 255, 3), (h, w, 3))
        bg = rng.uniform(0, 255, (h, w, 3))
        a = alpha[..., None] / 255.0
        image = np.round(a * fg + (1 - a) * bg).astype(np.uint8)
        cid = f"c{i:02d}"
        paths = {}
        for kind, arr in (("image", image), ("alpha", alpha), ("trimap", band_trimap(alpha, band))):
            rel = f"{folder}/{kind}/{cid}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / rel)
            paths[kind] = rel
        lines.append(dict(cid=cid, split=split, fg_id=f"fg{i}", bg_name=f"bg{i}", width=w, height=h,
                          image_path=paths["image"], alpha_path=paths["alpha"], trimap_path=paths["trimap"]))
    pq.write_table(pa.Table.from_pylist(lines), root / "manifest.parquet")
    return root


def make_checkpoints(models: Path, seed: int = 0) -> dict[str, Path]:
    """Three tiny densenet121 model files; fusion = segmentation + a changed fusion net; joint changes all."""
    import torch

    from fusionnet.model import LateFusionNet, save

    torch.manual_seed(seed)
    model = LateFusionNet("densenet121")
    paths = {step: models / step / "model.safetensors" for step in ("segmentation", "fusion", "joint")}
    save(model, paths["segmentation"])
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.mul_(1.5)
        save(model, paths["fusion"])
        model.fg_decoder.heads[-1].bias.add_(0.5)
    save(model, paths["joint"])
    return paths


def sample_from(alpha: np.ndarray, name: str = "s", band: int = 4, seed: int = 0) -> EvalSample:
    rng = np.random.default_rng(seed)
    alpha8 = np.round(alpha * 255).astype(np.uint8)
    image = rng.integers(0, 256, alpha.shape + (3,), dtype=np.uint8)
    trimap = band_trimap(alpha8, band)
    return EvalSample(name, image, alpha8.astype(np.float32) / 255, trimap, composite_regions(trimap))


def constant_predictor(alpha: float, fg: float, bg: float):
    def predict(rgb):
        shape = rgb.shape[:2]
        return {k: np.full(shape, v, np.float32) for k, v in (("alpha", alpha), ("fg_prob", fg), ("bg_prob", bg))}

    return predict


# ----------------------------------------------------------------------------- metrics per region


def test_region_metrics_match_the_metric_functions_per_region():
    rng = np.random.default_rng(1)
    gt = np.round(rng.random((20, 24)) * 255) / 255
    pred = np.clip(gt + rng.normal(0, 0.1, gt.shape), 0, 1)
    band = rng.random(gt.shape) < 0.4
    out = region_metrics(pred, gt, {"band": band, "full": None})
    assert out["band"]["sad"] == metrics.sad(pred, gt, band)
    assert out["full"]["grad"] == metrics.gradient_error(pred, gt, None)
    assert out["band"]["conn"] == metrics.connectivity_error(pred, gt, band)
    assert out["full"]["mse"] == metrics.mse(pred, gt, None)


def test_metric_workers_give_the_in_process_numbers():
    samples = [sample_from(np.tile(np.linspace(0, 1, 20), (16, 1)), name=f"s{i}", seed=i) for i in range(3)]
    predictors = {"joint": constant_predictor(alpha=0.3, fg=0.6, bg=0.2)}
    rows = ["raw", "segmentation_only", "constant_half"]
    serial = evaluate_set(samples, predictors, rows, RowSettings(), workers=0)
    pooled = evaluate_set(samples, predictors, rows, RowSettings(), workers=2)
    assert pooled.per_image == serial.per_image and pooled.summary == serial.summary


def test_summarise_averages_over_images_and_skips_nan():
    lines = [{"image": "a", "raw.band.mse": 0.2, "raw.band.sad": 1.0},
             {"image": "b", "raw.band.mse": math.nan, "raw.band.sad": 3.0}]
    assert summarise(lines, ["raw"]) == {"raw": {"band": {"mse": 0.2, "sad": 2.0}}}


# ----------------------------------------------------------------------------- rows and provenance


def test_each_row_reads_its_own_checkpoint():
    """Constant maps that differ per source show which source every row was computed from."""
    alpha = np.zeros((24, 24))
    alpha[:, 12:] = 1.0
    alpha[:, 10:14] = [0.25, 0.5, 0.75, 1.0]
    sample = sample_from(alpha)
    predictors = {
        "segmentation": constant_predictor(alpha=0.9, fg=0.2, bg=0.7),
        "fusion": constant_predictor(alpha=0.4, fg=0.0, bg=0.0),
        "joint": constant_predictor(alpha=0.6, fg=0.3, bg=0.1),
    }
    rows = ["fgbg_only_fg", "fgbg_only_bg", "fusion_only", "raw", "segmentation_only", "constant_half"]
    result = evaluate_set([sample], predictors, rows, RowSettings())
    gt = sample.alpha.astype(np.float64)
    expected_value = {"fgbg_only_fg": 0.2, "fgbg_only_bg": 0.3, "fusion_only": 0.4, "raw": 0.6,
                      "segmentation_only": 0.5 * (0.3 + 1 - 0.1)}
    for row, value in expected_value.items():
        assert result.summary[row]["full"]["sad"] == pytest.approx(np.abs(np.float32(value) - gt).sum() / 1000, rel=1e-5), row


def test_alias_reuses_branches_but_not_alpha():
    sample = sample_from(np.tile(np.linspace(0, 1, 16), (16, 1)))
    predictors = {"fusion": constant_predictor(alpha=0.4, fg=0.2, bg=0.7)}
    result = evaluate_set([sample], predictors, ["fgbg_only_fg", "fusion_only"], RowSettings(),
                          aliases={"segmentation": "fusion"})
    gt = sample.alpha.astype(np.float64)
    assert result.summary["fgbg_only_fg"]["full"]["sad"] == pytest.approx(np.abs(np.float32(0.2) - gt).sum() / 1000, rel=1e-5)
    with pytest.raises(ValueError, match="segmentation"):
        evaluate_set([sample], {"joint": predictors["fusion"]}, ["fgbg_only_fg"], RowSettings())


def test_refined_row_is_the_guided_filter_of_raw():
    sample = sample_from(np.tile(np.linspace(0, 1, 20), (18, 1)))
    noisy = np.clip(sample.alpha + np.random.default_rng(3).normal(0, 0.2, sample.alpha.shape), 0, 1).astype(np.float32)

    def predict(rgb):
        return {"alpha": noisy, "fg_prob": noisy, "bg_prob": 1 - noisy}

    result = evaluate_set([sample], {"joint": predict}, ["raw", "refined"], RowSettings(gf_radius=2, gf_eps=1e-2), keep=True)
    np.testing.assert_array_equal(result.kept["s"]["refined"], guided_filter(sample.rgb, noisy, 2, 1e-2))
    np.testing.assert_array_equal(result.kept["s"]["raw"], noisy)


# ----------------------------------------------------------------------------- claims


def test_claim_counts_against_a_hand_count():
    gt = np.array([[0.0, 0.3, 0.6, 1.0]])
    fg = np.array([[0.1, 0.5, 0.97, 0.99]], np.float32)  # F >= 0.95 on the last two
    bg = np.array([[0.96, 0.8, 0.2, 0.0]], np.float32)   # B >= 0.95 on the first
    counts = ClaimCounts()
    counts.add(gt, fg, bg, threshold=0.95)
    # transition T = {1, 2}; implicit unknown U = {1} (pixel 2 is certain foreground); 1 - B = [.04, .2, .8, 1]
    assert (counts.transition, counts.unknown, counts.both) == (2, 1, 1)
    # pixel 1: 0.2 <= 0.3 <= 0.5 bracketed; pixel 2: 1 - B = 0.8 > 0.6: not in order, but 0.6 in [0.8, 0.97]? no
    assert counts.bracketed == 1 and counts.bracketed_either == 1
    summary = counts.summary()
    assert summary["implicit_trimap_recall"] == 0.5
    assert summary["implicit_trimap_precision"] == 1.0
    assert summary["implicit_trimap_iou"] == 0.5
    assert summary["bracketing_ratio"] == 0.5
    assert summary["implicit_unknown_fraction"] == 0.25


def test_bracketing_in_either_order():
    gt = np.array([[0.5]])
    counts = ClaimCounts()
    counts.add(gt, np.array([[0.3]], np.float32), np.array([[0.2]], np.float32), 0.95)  # F=0.3 < 0.5 < 1-B=0.8
    assert counts.bracketed == 0 and counts.bracketed_either == 1


# ----------------------------------------------------------------------------- guided-filter choice


def test_tune_guided_filter_picks_the_grid_minimum():
    rng = np.random.default_rng(5)
    samples = [sample_from(np.tile(np.linspace(0, 1, 24), (20, 1)), name=f"v{i}", seed=i) for i in range(2)]
    noisy = {s.name: np.clip(s.alpha + rng.normal(0, 0.15, s.alpha.shape), 0, 1).astype(np.float32) for s in samples}
    lookup = {s.rgb.tobytes(): noisy[s.name] for s in samples}

    def predict(rgb):
        return {"alpha": lookup[rgb.tobytes()]}

    radii, eps = [1, 3], [1e-3, 1e-1]
    chosen = tune_guided_filter(samples, predict, radii, eps)
    reference = {
        (r, e): np.mean([metrics.sad(guided_filter(s.rgb, noisy[s.name], r, e), s.alpha, s.regions["band"]) for s in samples])
        for r in radii for e in eps
    }
    best = min(reference, key=reference.get)
    assert (chosen["radius"], chosen["eps"]) == best
    assert chosen["best"] == pytest.approx(reference[best])
    assert chosen["grid"]["r1_eps0.001"] == pytest.approx(reference[(1, 1e-3)])
    assert chosen["raw"] == pytest.approx(np.mean([metrics.sad(noisy[s.name], s.alpha, s.regions["band"]) for s in samples]))


# ----------------------------------------------------------------------------- loading


def test_load_composites_reads_the_data_contract_layout(tmp_path):
    root = make_composites(tmp_path / "composites", n_test=4, n_val=2)
    test = load_composites(root, "test")
    assert [s.name for s in test] == ["c00", "c01", "c02", "c03"]
    assert test[0].image.shape == (64, 80, 3) and test[0].image.dtype == np.uint8
    assert test[0].alpha.dtype == np.float32 and 0 <= test[0].alpha.min() and test[0].alpha.max() <= 1
    np.testing.assert_array_equal(test[0].regions["band"], test[0].trimap == 128)
    assert test[0].regions["full"] is None
    assert [s.name for s in load_composites(root, "test", limit=2)] == ["c00", "c02"]
    assert [s.name for s in load_composites(root, "val")] == ["c04", "c05"]
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_composites(tmp_path / "nowhere")


def test_load_photos_regions_per_trimap(tmp_path):
    rng = np.random.default_rng(0)
    alpha = soft_blob(30, 40, rng)
    for folder, arr in (("image", rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), ("alpha", alpha),
                        ("trimap1", band_trimap(alpha, 2)), ("trimap2", band_trimap(alpha, 6))):
        (tmp_path / folder).mkdir()
        Image.fromarray(arr).save(tmp_path / folder / "GT01.png")
    (photo,) = load_photos(tmp_path)
    assert set(photo.regions) == {"trimap1", "trimap2", "full"}
    assert photo.regions["trimap1"].sum() < photo.regions["trimap2"].sum()
    np.testing.assert_array_equal(photo.trimap, band_trimap(alpha, 2))


@pytest.mark.shared_data
def test_real_photos_with_the_trimap_baselines():
    root = SHARED_DATA / "alphamatting-dev"
    if not (root / "image").is_dir():
        pytest.skip(f"{root} is absent: real photographs not available on this machine")
    photos = load_photos(root)[:2]
    result = evaluate_set(photos, {}, ["constant_half"], RowSettings())
    values = result.summary["constant_half"]
    assert set(values) == {"trimap1", "trimap2", "full"}
    # SAD sums over a region: the whole photo and trimap2's larger band contain trimap1's band
    assert values["full"]["sad"] >= values["trimap1"]["sad"] > 0
    assert values["trimap2"]["sad"] >= values["trimap1"]["sad"]


# ----------------------------------------------------------------------------- the whole step


def test_branches_identical(tiny_project):
    from pipeline.evaluation import branches_identical

    paths = tiny_project["checkpoints"]
    assert branches_identical(paths["segmentation"], paths["fusion"])  # only the fusion net differs
    assert not branches_identical(paths["fusion"], paths["joint"])     # a decoder head differs


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    """data/composites (3 test, 2 val) and the three step checkpoints, shared by the slow tests."""
    root = tmp_path_factory.mktemp("tiny")
    return {"root": root, "composites": make_composites(root / "composites"),
            "checkpoints": make_checkpoints(root / "models")}


TINY_PARAMS = {"evaluate": {"max_side": 64, "precision": "fp32", "workers": 2, "pictures": 1,
                            "guided_filter": {"radii": [1, 2], "eps": [1e-3, 1e-2], "max_val_images": 2},
                            "photos": {"root": "no-such-folder"}}}


@pytest.mark.slow
def test_run_evaluation_writes_metrics_table_pictures_with_provenance(tiny_project, tmp_path):
    from pipeline.evaluation import run_evaluation

    checkpoints = tiny_project["checkpoints"]
    record = run_evaluation(TINY_PARAMS, checkpoints, tiny_project["composites"], tmp_path / "metrics",
                            tmp_path / "reports", tmp_path)

    table = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert list(table) == ["fgbg_only_fg", "fgbg_only_bg", "fusion_only", "raw", "refined",
                           "segmentation_only", "closed_form", "constant_half"]
    for row in table.values():
        assert set(row) == {"band", "full"} and set(row["band"]) == {"sad", "mse", "grad", "conn"}
        assert all(np.isfinite(v) and v >= 0 for region in row.values() for v in region.values())
    # provenance: every network row names its checkpoint and that file's sha256
    details = json.loads((tmp_path / "metrics" / "details.json").read_text())
    sources = {"fgbg_only_fg": "segmentation", "fgbg_only_bg": "segmentation", "fusion_only": "fusion",
               "raw": "joint", "refined": "joint", "segmentation_only": "joint"}
    markdown = (tmp_path / "reports" / "table.md").read_text()
    for row, source in sources.items():
        entry = details["provenance"][row]
        assert entry["checkpoint"] == str(checkpoints[source])
        assert entry["sha256"] == hashlib.sha256(checkpoints[source].read_bytes()).hexdigest()
        assert f"| {entry['checkpoint']} | {entry['sha256']} |" in markdown
    assert details["provenance"]["closed_form"]["sha256"] == ""
    # the fusion step left the branches alone, so F/B came from the fusion model's pass
    assert any("identical branch weights" in n for n in record["notes"])
    assert details["guided_filter"]["radius"] in (1, 2) and details["guided_filter"]["val_images"] == 2
    claims = json.loads((tmp_path / "metrics" / "claims.json").read_text())
    assert set(claims["composites"]) == {"segmentation", "joint"}
    assert 0 <= claims["composites"]["joint"]["bracketing_ratio"] <= 1
    photos = json.loads((tmp_path / "metrics" / "photos.json").read_text())
    assert "absent" in photos["skipped"] and "Skipped:" in markdown
    assert "| Method | SAD-25 | MSE-25 | Grad-25 | Conn-25 | SAD-full | MSE-full | Grad-full | Conn-full |" in markdown
    csv_lines = (tmp_path / "reports" / "per_image.csv").read_text().splitlines()
    assert csv_lines[0].startswith("image,fgbg_only_fg_band_sad,") and len(csv_lines) == 1 + 3
    assert (tmp_path / "reports" / "per_image_photos.csv").read_text() == "image\n"
    pictures = sorted(p.name for p in (tmp_path / "reports" / "pictures").iterdir())
    assert len(pictures) == 2 and pictures[0].startswith("best_1_") and pictures[1].startswith("worst_1_")
    # the per-image CSV averages to the table
    column = csv_lines[0].split(",").index("raw_band_sad")
    assert np.mean([float(line.split(",")[column]) for line in csv_lines[1:]]) == pytest.approx(
        table["raw"]["band"]["sad"], rel=1e-5)


@pytest.mark.slow
def test_run_evaluation_on_photos_with_their_trimaps(tiny_project, tmp_path):
    from pipeline.evaluation import run_evaluation

    rng = np.random.default_rng(7)
    for name in ("GT01", "GT02"):
        alpha = soft_blob(40, 52, rng)
        for folder, arr in (("image", rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)), ("alpha", alpha),
                            ("trimap1", band_trimap(alpha, 2)), ("trimap2", band_trimap(alpha, 5))):
            (tmp_path / "photos" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / "photos" / folder / f"{name}.png")
    params = {"evaluate": {**TINY_PARAMS["evaluate"], "rows": ["raw", "constant_half"], "pictures": 0,
                           "photos": {"root": "photos", "rows": ["fgbg_only_fg", "raw", "constant_half"]}}}
    record = run_evaluation(params, tiny_project["checkpoints"], tiny_project["composites"], tmp_path / "metrics",
                            tmp_path / "reports", base_dir=tmp_path)
    photos = json.loads((tmp_path / "metrics" / "photos.json").read_text())
    assert list(photos) == ["fgbg_only_fg", "raw", "constant_half"]
    assert set(photos["raw"]) == {"trimap1", "trimap2", "full"}
    # the baselines take trimap1: outside its band they are exact, so the larger regions add nothing
    const = photos["constant_half"]
    assert const["trimap2"]["sad"] == pytest.approx(const["trimap1"]["sad"]) == pytest.approx(const["full"]["sad"])
    assert const["trimap1"]["sad"] > 0
    assert set(record["claims"]["photos"]) == {"segmentation", "joint"}
    assert record["details"]["images"]["photos"] == 2
    assert len((tmp_path / "reports" / "per_image_photos.csv").read_text().splitlines()) == 3
    assert "SAD-trimap1" in (tmp_path / "reports" / "table.md").read_text()


@pytest.mark.slow
def test_dvc_metrics_show_reads_the_metrics(tmp_path):
    """`dvc metrics show` / `diff` understand the nested JSON (row -> region -> metric)."""
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists():
        pytest.skip("dvc is not installed in this environment")
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    (repo / "metrics" / "evaluate.json").write_text(json.dumps({"raw": {"band": {"sad": 1.5}, "full": {"sad": 2.0}}}))
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/evaluate.json\n")
    env = {"DVC_NO_ANALYTICS": "1", "PATH": str(dvc.parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)}
    for cmd in (["git", "init", "-q"], [str(dvc), "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)
    out = subprocess.run([str(dvc), "metrics", "show", "--json"], cwd=repo, check=True, env=env,
                         capture_output=True, text=True).stdout
    (workspace,) = json.loads(out).values()  # keyed "" (no commit yet) or "workspace"
    assert workspace["data"]["metrics/evaluate.json"]["data"]["raw"]["band"]["sad"] == 1.5
    shutil.rmtree(repo)
