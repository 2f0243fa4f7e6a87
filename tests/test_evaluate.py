"""The evaluation (fusionnet.evaluation.rows, fusionnet.evaluation.run): rows, regions, claims, provenance, files.

Helpers `make_composites` and `make_checkpoints` build a tiny data/composites layout (data contract)
and three tiny densenet121 checkpoints; tests/test_registry.py and tests/test_serving.py reuse them.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fusionnet import metrics
from fusionnet.data.trimap import band_trimap
from fusionnet.evaluation.rows import (
    ClaimCounts,
    EvalSample,
    RowSettings,
    composite_regions,
    evaluate_set,
    load_composites,
    load_photos,
    photo_files,
    region_metrics,
    summarise,
    tune_guided_filter,
)
from fusionnet.evaluation.report import photo_comparisons
from fusionnet.refine import guided_filter


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


def make_photos(root: Path, names=("GT01", "GT02", "GT03"), size=(40, 52), seed: int = 7) -> Path:
    """An alphamatting.com-style folder: image/, alpha/, trimap1/ (2-px band), trimap2/ (5-px band)."""
    rng = np.random.default_rng(seed)
    for name in names:
        alpha = soft_blob(*size, rng)
        for folder, arr in (("image", rng.integers(0, 256, size + (3,), dtype=np.uint8)), ("alpha", alpha),
                            ("trimap1", band_trimap(alpha, 2)), ("trimap2", band_trimap(alpha, 5))):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / folder / f"{name}.png")
    return root


def make_foregrounds(root: Path, rows: list[dict]) -> Path:
    """data/foregrounds/manifest.parquet with the given rows (id, split, source[, source_path])."""
    root.mkdir(parents=True, exist_ok=True)
    full = [{"width": 10, "height": 10, "transition_fraction": 0.1, "fg_path": f"fg/{r['id']}.png",
             "alpha_path": f"alpha/{r['id']}.png", **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(full), root / "manifest.parquet")
    return root


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


def test_zeros_row_and_trimap_baselines_per_region_trimap():
    """alpha = 0 scores sum(gt); constant 0.5 is given each region's own trimap, "full" the sample's."""
    alpha = np.zeros((24, 30))
    alpha[:, 15:] = 1.0
    alpha[:, 11:19] = np.linspace(0.1, 0.9, 8)
    a8 = np.round(alpha * 255).astype(np.uint8)
    narrow, wide = band_trimap(a8, 1), band_trimap(a8, 4)
    gt = a8.astype(np.float32) / 255
    regions = {"trimap1": narrow == 128, "trimap2": wide == 128, "full": None}
    sample = EvalSample("p", np.zeros(alpha.shape + (3,), np.uint8), gt, narrow, regions,
                        region_trimaps={"trimap1": narrow, "trimap2": wide})
    result = evaluate_set([sample], {}, ["constant_half", "zeros"], RowSettings(), workers=0)
    half = result.summary["constant_half"]
    g = gt.astype(np.float64)
    assert half["trimap2"]["sad"] == pytest.approx(np.abs(0.5 - g)[wide == 128].sum() / 1000, rel=1e-6)
    assert half["trimap1"]["sad"] == pytest.approx(np.abs(0.5 - g)[narrow == 128].sum() / 1000, rel=1e-6)
    assert half["trimap2"]["sad"] > half["trimap1"]["sad"]  # not the narrow trimap's matte scored in the wide band
    assert half["full"]["sad"] == pytest.approx(half["trimap1"]["sad"], rel=1e-6)  # full: the sample's trimap
    assert result.summary["zeros"]["full"]["sad"] == pytest.approx(g.sum() / 1000, rel=1e-6)
    assert result.summary["zeros"]["trimap2"]["mse"] == pytest.approx((g[wide == 128] ** 2).mean(), rel=1e-6)


def test_photo_comparisons_ratios_and_verdicts():
    def row(t1_sad, t1_mse, t2_sad, t2_mse, full_sad):
        return {"trimap1": {"sad": t1_sad, "mse": t1_mse}, "trimap2": {"sad": t2_sad, "mse": t2_mse},
                "full": {"sad": full_sad, "mse": 0.01}}

    summary = {"raw": row(3.0, 0.03, 6.0, 0.02, 7.0), "refined": row(3.9, 0.03, 6.0, 0.02, 7.0),
               "segmentation_only": row(4.0, 0.05, 6.5, 0.03, 8.0), "constant_half": row(4.0, 0.04, 8.0, 0.04, 8.0),
               "zeros": row(5.0, 0.3, 9.0, 0.3, 20.0)}
    out = photo_comparisons(summary, ["trimap1", "trimap2"])
    raw = out["raw"]
    assert raw["vs_constant_half"]["trimap1"] == {"sad": pytest.approx(0.75), "mse": pytest.approx(0.75)}
    assert raw["vs_constant_half"]["trimap2"]["mse"] == pytest.approx(0.5)
    assert raw["vs_constant_half"]["holds"] is True                      # 0.75 is exactly 25% better
    assert raw["vs_zeros"]["full"]["sad"] == pytest.approx(0.35) and raw["vs_zeros"]["holds"] is True
    assert raw["vs_segmentation_only"]["trimap1"]["mse"] == pytest.approx(0.6)
    assert raw["vs_segmentation_only"]["holds"] is True and raw["holds"] is True
    refined = out["refined"]  # SAD-trimap1 3.9 / 4.0: not 25% better than constant 0.5, but beats seg-only
    assert refined["vs_constant_half"]["holds"] is False and refined["vs_segmentation_only"]["holds"] is True
    assert refined["holds"] is False
    summary["segmentation_only"]["trimap2"]["mse"] = 0.019  # raw: lower SAD but higher MSE there
    assert photo_comparisons(summary, ["trimap1", "trimap2"])["raw"]["vs_segmentation_only"]["holds"] is False
    # a ratio to a zero baseline is undefined and never holds; absent baselines are left out
    summary["zeros"]["full"]["sad"] = 0.0
    assert math.isnan(photo_comparisons(summary, ["trimap1"])["raw"]["vs_zeros"]["full"]["sad"])
    assert photo_comparisons(summary, ["trimap1"])["raw"]["vs_zeros"]["holds"] is False
    assert set(photo_comparisons({"raw": summary["raw"]}, ["trimap1"])["raw"]) == {"holds"}


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


def test_load_photos_reads_only_the_named_photos(tmp_path):
    root = make_photos(tmp_path / "photos")
    (root / "image" / "GT02.png").write_bytes(b"not a png")  # reading it would fail
    assert [p.name for p in photo_files(root)] == ["GT01.png", "GT02.png", "GT03.png"]
    photos = load_photos(root, names=["GT01.png", "GT03.png"])
    assert [p.name for p in photos] == ["GT01", "GT03"]
    assert set(photos[0].region_trimaps) == {"trimap1", "trimap2"}
    with pytest.raises(FileNotFoundError, match="image"):
        photo_files(tmp_path / "nowhere")


def test_test_set_version_depends_only_on_the_test_data(tmp_path):
    from fusionnet.evaluation.run import split_data_version

    a = make_composites(tmp_path / "a", n_test=3, n_val=2)
    b = make_composites(tmp_path / "b", n_test=3, n_val=2)
    version = split_data_version(a)
    assert version["version"].startswith("sha256:") and len(version["version"]) == 7 + 64
    assert (version["split"], version["images"]) == ("test", 3)
    assert split_data_version(b) == version                       # same data elsewhere: same version
    table = pq.read_table(b / "manifest.parquet").to_pylist()
    pq.write_table(pa.Table.from_pylist(table[::-1]), b / "manifest.parquet")
    assert split_data_version(b) == version                       # row order does not matter
    Image.fromarray(np.zeros((64, 80), np.uint8)).save(b / "train" / "alpha" / "c04.png")
    assert split_data_version(b) == version                       # a validation file is not the test set
    assert split_data_version(b, "val") != split_data_version(a, "val")
    alpha = np.asarray(Image.open(b / "test" / "alpha" / "c01.png")).copy()
    alpha[0, 0] ^= 1
    Image.fromarray(alpha).save(b / "test" / "alpha" / "c01.png")
    assert split_data_version(b)["version"] != version["version"]  # one test pixel changes the version
    assert split_data_version(make_composites(tmp_path / "c", n_test=2, n_val=2)) != version
    (b / "test" / "trimap" / "c02.png").unlink()
    with pytest.raises(FileNotFoundError, match="c02.png"):
        split_data_version(b)
    with pytest.raises(FileNotFoundError, match="manifest"):
        split_data_version(tmp_path / "nowhere")


def test_photo_exclusions_match_train_and_val_sources(tmp_path):
    from fusionnet.evaluation.data import photo_exclusions

    root = make_photos(tmp_path / "photos", names=("GT01", "GT02", "GT03", "GT04"))
    files = photo_files(root)
    # today's manifest: the source kind only, so names are matched (ids are the file stems)
    by_name = make_foregrounds(tmp_path / "fg-names", [
        {"id": "GT01", "split": "train", "source": "folder"}, {"id": "GT02", "split": "val", "source": "folder"},
        {"id": "GT03", "split": "test", "source": "folder"}, {"id": "syn-00000", "split": "train", "source": "synthetic"}])
    excluded = photo_exclusions(files, by_name)
    assert sorted(excluded) == ["GT01.png", "GT02.png"]          # the test-split foreground stays held out
    assert "train foreground GT01" in excluded["GT01.png"] and "val foreground GT02" in excluded["GT02.png"]
    # synthetic profile: nothing is excluded
    synthetic = make_foregrounds(tmp_path / "fg-syn", [{"id": f"syn-{i:05d}", "split": s, "source": "synthetic"}
                                                       for i, s in enumerate(["train", "val", "test"])])
    assert photo_exclusions(files, synthetic) == {}
    # a manifest with source paths: resolved paths are matched (relative ones from base_dir)
    other = make_photos(tmp_path / "elsewhere", names=("GT04",))
    by_path = make_foregrounds(tmp_path / "fg-paths", [
        {"id": "a", "split": "train", "source": "folder", "source_path": "photos/image/GT03.png"},
        {"id": "GT04", "split": "train", "source": "folder", "source_path": str(other / "image" / "GT04.png")}])
    excluded = photo_exclusions(files, by_path, base_dir=tmp_path)
    assert list(excluded) == ["GT03.png"] and "photos/image/GT03.png" in excluded["GT03.png"]
    (tmp_path / "link").symlink_to(root)  # the same files reached another way: matched by resolved path
    assert list(photo_exclusions(photo_files(tmp_path / "link"), by_path, base_dir=tmp_path)) == ["GT03.png"]
    # bad input names the file
    with pytest.raises(FileNotFoundError, match="nowhere/manifest.parquet"):
        photo_exclusions(files, tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": "x", "split": "train"}]), tmp_path / "bad" / "manifest.parquet")
    with pytest.raises(ValueError, match=r"bad/manifest.parquet.*source"):
        photo_exclusions(files, tmp_path / "bad")
    make_foregrounds(tmp_path / "bad2", [{"id": "x", "split": "training", "source": "folder"}])
    with pytest.raises(ValueError, match=r"bad2/manifest.parquet.*training"):
        photo_exclusions(files, tmp_path / "bad2")


@pytest.mark.shared_data
def test_real_photos_with_the_trimap_baselines(shared_data):
    root = shared_data / "alphamatting-dev"
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
    from fusionnet.evaluation.run import branches_identical

    paths = tiny_project["checkpoints"]
    assert branches_identical(paths["segmentation"], paths["fusion"])  # only the fusion net differs
    assert not branches_identical(paths["fusion"], paths["joint"])     # a decoder head differs


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    """data/composites (3 test, 2 val) and the three step checkpoints, shared by the slow tests."""
    root = tmp_path_factory.mktemp("tiny")
    return {"root": root, "composites": make_composites(root / "composites"),
            "checkpoints": make_checkpoints(root / "models")}


TINY_PARAMS = {"crops": {"max_side": 64},  # the working scale
               "evaluate": {"precision": "fp32", "workers": 2, "pictures": 1,
                            "guided_filter": {"radii": [1, 2], "eps": [1e-3, 1e-2], "max_val_images": 2},
                            "photos": {"root": "no-such-folder"}}}


def reference_table(composites: Path, checkpoints: dict[str, Path], max_side: int) -> dict:
    """SAD and MSE of four rows on the test composites, from the PNGs and plain numpy.

    constant_half is 0.5 where the trimap is 128 and the trimap's 0/1 elsewhere; the network rows take
    each step's model through the inference API (no refinement), so the table's own scoring path
    (regions, per-image metrics, averaging, which checkpoint a row reads) is what is checked.
    """
    from fusionnet.inference.loading import load_model
    from fusionnet.inference.matter import Matter

    manifest = [r for r in pq.read_table(composites / "manifest.parquet").to_pylist() if r["split"] == "test"]

    def png(rel: str) -> np.ndarray:
        return np.asarray(Image.open(composites / rel), np.float64)

    matters = {step: Matter(load_model(checkpoints[step], device="cpu"), device="cpu", precision="fp32",
                            max_side=max_side, refine=False) for step in ("segmentation", "fusion", "joint")}
    totals: dict = {}
    for line in manifest:
        gt, trimap = png(line["alpha_path"]) / 255, png(line["trimap_path"])
        rgb = png(line["image_path"]).astype(np.float32) / 255
        band = trimap == 128
        nets = {step: matter(rgb) for step, matter in matters.items()}
        preds = {"constant_half": np.where(band, 0.5, trimap / 255),
                 "raw": nets["joint"].raw_alpha, "fusion_only": nets["fusion"].raw_alpha,
                 "fgbg_only_fg": nets["segmentation"].fg_prob}
        for row, pred in preds.items():
            err = np.asarray(pred, np.float64) - gt
            for region, mask in (("band", band), ("full", np.ones_like(band))):
                values = totals.setdefault(row, {}).setdefault(region, {"sad": 0.0, "mse": 0.0})
                values["sad"] += np.abs(err[mask]).sum() / 1000 / len(manifest)
                values["mse"] += (err[mask] ** 2).mean() / len(manifest)
    return totals


@pytest.mark.slow
def test_run_evaluation_writes_metrics_table_pictures_with_provenance(tiny_project, tmp_path):
    from fusionnet.evaluation.run import run_evaluation

    checkpoints = tiny_project["checkpoints"]
    record = run_evaluation(TINY_PARAMS, checkpoints, tiny_project["composites"], tmp_path / "metrics",
                            tmp_path / "reports", tmp_path)

    table = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())
    assert list(table) == ["fgbg_only_fg", "fgbg_only_bg", "fusion_only", "raw", "refined",
                           "segmentation_only", "closed_form", "constant_half"]
    for row in table.values():
        assert set(row) == {"band", "full"} and set(row["band"]) == {"sad", "mse", "grad", "conn"}
        assert all(np.isfinite(v) and v >= 0 for region in row.values() for v in region.values())
    # the numbers themselves, recomputed here from the files on disk (SAD/1000 and MSE by hand)
    expected = reference_table(tiny_project["composites"], checkpoints, max_side=TINY_PARAMS["crops"]["max_side"])
    for row, regions in expected.items():
        for region, values in regions.items():
            for metric, value in values.items():
                assert table[row][region][metric] == pytest.approx(value, rel=1e-4, abs=1e-9), (row, region, metric)
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
    # the test set's data version, from the test composites themselves
    from fusionnet.evaluation.run import split_data_version

    assert details["test_set"] == split_data_version(tiny_project["composites"])
    assert details["test_set"]["images"] == 3
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
def test_run_evaluation_scores_only_held_out_photos(tiny_project, tmp_path):
    """Photos that are the source of train/val foregrounds are not scored (not even read), and say so."""
    from fusionnet.evaluation.run import run_evaluation

    make_photos(tmp_path / "photos", names=("GT01", "GT02", "GT03", "GT04"))
    (tmp_path / "photos" / "image" / "GT01.png").write_bytes(b"trained on: reading it would fail")
    foregrounds = make_foregrounds(tmp_path / "foregrounds", [
        {"id": "GT01", "split": "train", "source": "folder"}, {"id": "GT03", "split": "val", "source": "folder"},
        {"id": "GT04", "split": "test", "source": "folder"}])
    params = {"crops": TINY_PARAMS["crops"], "evaluate": {**TINY_PARAMS["evaluate"], "rows": ["raw", "constant_half"], "pictures": 0,
                           "photos": {"root": "photos", "rows": ["fgbg_only_fg", "raw", "constant_half"]}}}
    record = run_evaluation(params, tiny_project["checkpoints"], tiny_project["composites"], tmp_path / "metrics",
                            tmp_path / "reports", base_dir=tmp_path, foregrounds=foregrounds)
    photos = json.loads((tmp_path / "metrics" / "photos.json").read_text())
    held_out = photos["held_out"]
    assert held_out["scored"] == ["GT02", "GT04"] and (held_out["photos"], held_out["n_scored"]) == (4, 2)
    assert held_out["root"] == "photos"  # as configured, not this machine's absolute path
    assert list(held_out["excluded"]) == ["GT01", "GT03"]
    assert "train foreground GT01" in held_out["excluded"]["GT01"] and "val" in held_out["excluded"]["GT03"]
    assert held_out["manifest"] == str(foregrounds / "manifest.parquet")
    per_image = (tmp_path / "reports" / "per_image_photos.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in per_image[1:]] == ["GT02", "GT04"]
    # the configured rows plus the ones the claims need, in table order
    rows = photos["rows"]
    assert list(rows) == ["fgbg_only_fg", "raw", "segmentation_only", "constant_half", "zeros"]
    assert set(rows["raw"]) == {"trimap1", "trimap2", "full"}
    # constant 0.5 is given each trimap in its own region; "full" uses trimap1 (exact outside its band)
    const = rows["constant_half"]
    assert const["trimap2"]["sad"] > const["trimap1"]["sad"] > 0
    assert const["full"]["sad"] == pytest.approx(const["trimap1"]["sad"])
    gts = [np.asarray(Image.open(tmp_path / "photos" / "alpha" / f"{n}.png"), np.float64) / 255 for n in ("GT02", "GT04")]
    assert rows["zeros"]["full"]["sad"] == pytest.approx(np.mean([g.sum() for g in gts]) / 1000, rel=1e-5)
    # the comparisons are the table's ratios
    raw = photos["comparisons"]["raw"]
    assert raw["vs_constant_half"]["trimap2"]["sad"] == pytest.approx(rows["raw"]["trimap2"]["sad"] / const["trimap2"]["sad"])
    assert raw["vs_zeros"]["full"]["sad"] == pytest.approx(rows["raw"]["full"]["sad"] / rows["zeros"]["full"]["sad"])
    assert raw["vs_zeros"]["holds"] == (raw["vs_zeros"]["full"]["sad"] <= 0.35)
    assert raw["vs_segmentation_only"]["trimap1"]["mse"] == pytest.approx(
        rows["raw"]["trimap1"]["mse"] / rows["segmentation_only"]["trimap1"]["mse"])
    assert set(record["claims"]["photos"]) == {"segmentation", "joint"}
    details = json.loads((tmp_path / "metrics" / "details.json").read_text())
    assert details["images"]["photos"] == 2 and details["images"]["photos_excluded"] == 2
    table = (tmp_path / "reports" / "table.md").read_text()
    assert "SAD-trimap1" in table and "Held out (scored): 2 of 4 photos in photos: GT02, GT04." in table
    assert "- GT01: train foreground GT01" in table and "Claims on the held-out photos" in table

    # the synthetic profile: every photo is held out; a missing manifest is an error naming it
    (tmp_path / "photos" / "image" / "GT01.png").unlink()
    synthetic = make_foregrounds(tmp_path / "fg-syn", [{"id": "syn-00000", "split": "train", "source": "synthetic"}])
    run_evaluation(params, tiny_project["checkpoints"], tiny_project["composites"], tmp_path / "m2",
                   tmp_path / "r2", base_dir=tmp_path, foregrounds=synthetic)
    held_out = json.loads((tmp_path / "m2" / "photos.json").read_text())["held_out"]
    assert held_out["scored"] == ["GT02", "GT03", "GT04"] and held_out["excluded"] == {}
    with pytest.raises(FileNotFoundError, match="no-foregrounds/manifest.parquet"):
        run_evaluation(params, tiny_project["checkpoints"], tiny_project["composites"], tmp_path / "m3",
                       tmp_path / "r3", base_dir=tmp_path, foregrounds=tmp_path / "no-foregrounds")
