"""Compositing (DIM recipe), trimaps, background assignment, and both data stages end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from fusionnet.data.backgrounds import Background, backgrounds_from_params, builtin_background, folder_backgrounds
from fusionnet.data.composite import (CompositeConfig, assign_backgrounds, build_composites, composite_downscaled,
                                      composite_image, downscale_alpha, fit_background, fitted_background_size,
                                      split_background_pools)
from fusionnet.data.imagefiles import read_alpha, read_rgb
from fusionnet.data.trimap import band_trimap

ROOT = Path(__file__).resolve().parents[1]


def _pattern(height: int, width: int) -> np.ndarray:
    """A background where every pixel is distinguishable by position."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([yy % 256, xx % 256, (yy * 7 + xx * 3) % 256], axis=-1).astype(np.uint8)


# --- DIM background fit: ratio = max(fg_w/bg_w, fg_h/bg_h); ratio > 1 -> bicubic resize with ceil; top-left crop
@pytest.mark.parametrize(("bg_hw", "fg_hw", "resized_hw"), [
    ((400, 200), (300, 400), (800, 400)),    # narrower than fg: ratio = 400/200 = 2
    ((100, 150), (300, 200), (300, 450)),    # smaller in both: ratio = max(200/150, 300/100) = 3
    ((70, 90), (100, 100), (100, 129)),      # ratio = 100/70: width ceil(90 * 100/70) = ceil(128.57) = 129
    ((300, 300), (320, 320), (320, 320)),    # float noise 300 * (320/300) must not add a pixel
    ((500, 600), (300, 200), (500, 600)),    # larger: kept as is
    ((240, 320), (240, 320), (240, 320)),    # equal: kept
])
def test_fitted_background_size(bg_hw: tuple, fg_hw: tuple, resized_hw: tuple) -> None:
    assert fitted_background_size(bg_hw, fg_hw) == resized_hw


def test_fit_background_smaller_is_upscaled_then_cropped_top_left() -> None:
    bg = _pattern(100, 150)
    fitted = fit_background(bg, (300, 200))
    assert fitted.shape == (300, 200, 3)
    resized = np.asarray(Image.fromarray(bg).resize((450, 300), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(fitted, resized[:300, :200])
    assert not np.array_equal(fitted, resized[:300, 125:325])  # a centred crop would differ


def test_fit_background_larger_is_cropped_top_left_without_resampling() -> None:
    bg = _pattern(500, 600)
    np.testing.assert_array_equal(fit_background(bg, (300, 200)), bg[:300, :200])


# --- compositing: I = alpha*F + (1-alpha)*B in float, then 8-bit rounding
def _slow_composite(fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray) -> np.ndarray:
    out = np.zeros_like(fg)
    for y in range(fg.shape[0]):
        for x in range(fg.shape[1]):
            a = int(alpha[y, x]) / 255.0
            for c in range(3):
                out[y, x, c] = round(a * int(fg[y, x, c]) + (1.0 - a) * int(bg[y, x, c]))
    return out


def test_composite_matches_the_formula() -> None:
    rng = np.random.default_rng(0)
    fg, bg = (rng.integers(0, 256, (17, 23, 3), dtype=np.uint8) for _ in range(2))
    alpha = rng.integers(0, 256, (17, 23), dtype=np.uint8)
    alpha[0], alpha[1] = 0, 255
    image = composite_image(fg, alpha, bg)
    np.testing.assert_array_equal(image, _slow_composite(fg, alpha, bg))
    np.testing.assert_array_equal(image[0], bg[0])
    np.testing.assert_array_equal(image[1], fg[1])
    exact = alpha[..., None] / 255.0 * fg + (1 - alpha[..., None] / 255.0) * bg
    assert np.any(image != np.floor(exact).astype(np.uint8))  # rounded, not truncated


def test_composite_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        composite_image(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8), np.zeros((4, 4, 3), np.uint8))


# --- size: composite at the foreground's full size, then shrink image and alpha with one filter
def _edge_foreground() -> tuple[np.ndarray, np.ndarray]:
    """60x90 foreground: a red disk with a soft rim and thin strands; F is junk blue where alpha = 0
    (as in real DIM foregrounds, whose colours outside the matte are arbitrary)."""
    yy, xx = np.mgrid[0:60, 0:90].astype(np.float64)
    radius = np.hypot(yy - 30, xx - 40)
    alpha = np.clip((24 - radius) / 3.0, 0, 1)               # 3 px soft rim
    alpha[5:55, 70:72] = 0.6                                 # a semi-transparent strand
    alpha[20:40, 80] = 0.3                                   # a sub-pixel wisp
    alpha = np.rint(alpha * 255).astype(np.uint8)
    fg = np.where((alpha > 0)[..., None], np.array([220, 40, 30]), np.array([0, 0, 255])).astype(np.uint8)
    fg[..., 1] += (yy.astype(np.uint8) * 2)  # some texture inside the object
    return fg, alpha


def _shrink(values: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """PIL antialiased bilinear on float32, channel by channel: the filter the issue asks for, written out."""
    def one(channel: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(channel.astype(np.float32)).resize((hw[1], hw[0]), Image.Resampling.BILINEAR))
    return one(values) if values.ndim == 2 else np.stack([one(values[..., c]) for c in range(values.shape[2])], -1)


def _build_one(tmp: Path, fg: np.ndarray, alpha: np.ndarray, bg: np.ndarray, max_side: int) -> tuple[dict, Path]:
    """Run build_composites on one train foreground over one folder background; returns (row, out dir)."""
    for kind, array in (("fg", fg), ("alpha", alpha)):
        (tmp / "fgs" / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp / "fgs" / kind / "obj.png")
    (tmp / "bgs").mkdir(exist_ok=True)
    Image.fromarray(bg).save(tmp / "bgs" / "bg.png")
    row = {"id": "obj", "split": "train", "source": "dim", "list_index": None, "fg_path": "fg/obj.png",
           "alpha_path": "alpha/obj.png"}
    config = CompositeConfig(bg_per_fg=1, bg_per_test_fg=1, band_radius=3, max_side=max_side, workers=1)
    rows, _ = build_composites([row], tmp / "fgs", folder_backgrounds(tmp / "bgs"), None, tmp / "out", config)
    assert len(rows) == 1
    return rows[0], tmp / "out"


def test_stored_composite_is_the_full_size_composite_shrunk_with_the_alpha_filter(tmp_path: Path) -> None:
    fg, alpha = _edge_foreground()
    bg = _pattern(40, 50) * np.uint8(3)  # smaller than the fg: DIM fit upscales it (ratio 1.8) at full size
    row, out = _build_one(tmp_path, fg, alpha, bg, max_side=45)
    image, stored_alpha = read_rgb(out / row["image_path"]), read_alpha(out / row["alpha_path"])
    assert image.shape == (30, 45, 3) and stored_alpha.shape == (30, 45) and (row["height"], row["width"]) == (30, 45)
    # expected, written out: fit B at 60x90 (bicubic to 72x90, top-left crop), I in float, shrink I and alpha alike
    fitted = np.asarray(Image.fromarray(bg).resize((90, 72), Image.Resampling.BICUBIC))[:60, :90]
    a = alpha[..., None] / 255.0
    full = a * fg + (1 - a) * fitted
    expected = np.clip(np.rint(_shrink(full, (30, 45))), 0, 255)
    expected_alpha = np.clip(np.rint(_shrink(alpha.astype(np.float64), (30, 45))), 0, 255)
    assert np.abs(image.astype(int) - expected).max() <= 1  # rounding only
    assert np.abs(stored_alpha.astype(int) - expected_alpha).max() <= 1
    np.testing.assert_array_equal(read_alpha(out / row["trimap_path"]), band_trimap(stored_alpha, 3))


def test_shrinking_f_and_alpha_before_compositing_differs_at_the_edges(tmp_path: Path) -> None:
    fg, alpha = _edge_foreground()
    bg = np.full((60, 90, 3), (20, 200, 60), np.uint8)  # flat: any difference comes from F and alpha, not from B
    row, out = _build_one(tmp_path, fg, alpha, bg, max_side=45)
    image = read_rgb(out / row["image_path"]).astype(int)
    # the old recipe: F shrunk with Lanczos, alpha with bilinear, then composited at 30x45
    small_fg = np.asarray(Image.fromarray(fg).resize((45, 30), Image.Resampling.LANCZOS))
    small_alpha = np.asarray(Image.fromarray(alpha).resize((45, 30), Image.Resampling.BILINEAR))
    old = composite_image(small_fg, small_alpha, bg[:30, :45]).astype(int)
    stored_alpha = read_alpha(out / row["alpha_path"])
    edge = (stored_alpha > 0) & (stored_alpha < 255)
    error = np.abs(image - old).max(axis=2)
    assert edge.sum() > 20
    assert error[edge].max() >= 20 and error[edge].mean() > 5  # junk F colour bleeds in; rounding alone gives <= 1
    inner = np.zeros_like(edge)
    inner[10:20, 15:25] = True  # inside the opaque disk (centre (15, 20), radius 12 at 30x45), away from its rim
    assert (stored_alpha[inner] == 255).all() and error[inner].max() <= 1
    far = np.zeros_like(edge)
    far[:, 43:] = True  # right of every strand: pure background
    assert (stored_alpha[far] == 0).all() and error[far].max() == 0


# --- trimap: unknown = transition (0 < alpha < 1) dilated by a disk of band_radius
def _slow_band(alpha: np.ndarray, radius: int) -> np.ndarray:
    transition = np.argwhere((alpha > 0) & (alpha < 255))
    band = np.zeros(alpha.shape, bool)
    for y in range(alpha.shape[0]):
        for x in range(alpha.shape[1]):
            if len(transition):
                band[y, x] = np.min((transition[:, 0] - y) ** 2 + (transition[:, 1] - x) ** 2) <= radius**2
    return band


@pytest.mark.parametrize("radius", [0, 1, 5])
def test_trimap_band_is_the_dilated_transition(radius: int) -> None:
    alpha = np.zeros((30, 40), np.uint8)
    alpha[8:22, 10:30] = 255
    alpha[8, 10:30] = 90  # a soft top edge
    alpha[15, 33] = 40    # an isolated wisp
    trimap = band_trimap(alpha, radius)
    band = _slow_band(alpha, radius)
    np.testing.assert_array_equal(trimap == 128, band)
    np.testing.assert_array_equal(trimap[~band], np.where(alpha[~band] == 255, 255, 0))
    assert set(np.unique(trimap)) <= {0, 128, 255}


def test_trimap_without_transition_has_no_unknown() -> None:
    alpha = np.zeros((10, 10), np.uint8)
    alpha[2:6, 2:6] = 255
    np.testing.assert_array_equal(band_trimap(alpha, 25), alpha)


# --- background pools and assignment
def _names(n: int) -> list[Background]:
    return [Background(name=f"bg{i:03d}") for i in range(n)]


def test_test_backgrounds_are_disjoint_when_enough_exist() -> None:
    pools = split_background_pools(_names(48), None, n_test_fg=5, bg_per_fg=4, bg_per_test_fg=2, seed=0)
    assert pools.disjoint and len(pools.test) == 10 and len(pools.train) == 38
    assert not {b.name for b in pools.train} & {b.name for b in pools.test}
    small = split_background_pools(_names(5), None, n_test_fg=5, bg_per_fg=4, bg_per_test_fg=2, seed=0)
    assert not small.disjoint and len(small.train) == len(small.test) == 5  # too few: overlap, reported
    capped = split_background_pools(_names(8), None, n_test_fg=5, bg_per_fg=4, bg_per_test_fg=2, seed=0)
    assert len(capped.test) == 4 and len(capped.train) == 4  # test pool capped to leave bg_per_fg for train


def test_folder_backgrounds_with_dim_style_lists_and_test_folder(tmp_path: Path) -> None:
    for folder, names in (("coco", ["a.jpg", "b.png", "sub/c.png", "unlisted.png"]), ("voc", ["v1.jpg", "v2.jpg"])):
        for name in names:
            (tmp_path / folder / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_pattern(12, 16)).save(tmp_path / folder / name)
    (tmp_path / "train_names.txt").write_text("a.jpg\nsub/c.png\n")
    section = {"backgrounds": {"source": "folder", "folder": "coco", "train_list": "train_names.txt",
                               "test_folder": "voc"}}
    main, test = backgrounds_from_params(section, seed=0, base_dir=tmp_path)
    assert [b.name for b in main] == ["a.jpg", "sub/c.png"] and [b.name for b in test] == ["v1.jpg", "v2.jpg"]
    np.testing.assert_array_equal(main[1].load(), _pattern(12, 16))
    pools = split_background_pools(main, test, n_test_fg=3, bg_per_fg=2, bg_per_test_fg=2, seed=0)
    assert pools.disjoint and pools.test == test
    assert not split_background_pools(main, main, 3, 2, 2, 0).disjoint
    (tmp_path / "train_names.txt").write_text("a.jpg\nnope.jpg\n")
    with pytest.raises(FileNotFoundError, match="train_names.txt.*nope.jpg"):
        backgrounds_from_params(section, seed=0, base_dir=tmp_path)


def test_assignment_is_distinct_per_foreground_even_and_deterministic() -> None:
    fg_ids = [f"fg{i}" for i in range(10)]
    assigned = assign_backgrounds(fg_ids, _names(12), per_fg=4, seed=3)
    assert all(len({b.name for b in bgs}) == 4 for bgs in assigned.values())
    uses = np.bincount([int(b.name[2:]) for bgs in assigned.values() for b in bgs], minlength=12)
    assert uses.max() - uses.min() <= 1  # 40 uses over 12 backgrounds
    assert assigned == assign_backgrounds(list(reversed(fg_ids)), _names(12), per_fg=4, seed=3)
    assert assigned != assign_backgrounds(fg_ids, _names(12), per_fg=4, seed=4)
    with pytest.raises(ValueError, match="only 3"):
        assign_backgrounds(fg_ids, _names(3), per_fg=4, seed=0)


# --- both stages end to end, as subprocesses on tiny params
def _stage(script: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("stages")
    params = {"seed": 0,
              "foregrounds": {"source": "synthetic", "on_invalid": "exclude", "val_fraction": 0.2,
                              "test_fraction": 0.25, "synthetic": {"count": 8, "size": [64, 80]}},
              "composite": {"backgrounds": {"source": "builtin", "count": 10}, "bg_per_fg": 2, "bg_per_test_fg": 2,
                            "band_radius": 5, "max_side": 40}}  # 64x80 foregrounds: composites shrink to 32x40
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    p = str(tmp / "params.yaml")
    _stage("collect_foregrounds.py", "--params", p, "--out", str(tmp / "foregrounds"))
    _stage("composite.py", "--params", p, "--foregrounds", str(tmp / "foregrounds"), "--out", str(tmp / "composites"))
    _stage("composite.py", "--params", p, "--foregrounds", str(tmp / "foregrounds"), "--out",
           str(tmp / "composites-serial"), "--workers", "1")
    return tmp, params


def test_collect_stage_outputs(built: tuple[Path, dict]) -> None:
    tmp, _ = built
    table = pq.read_table(tmp / "foregrounds" / "manifest.parquet")
    assert table.column_names == ["id", "split", "source", "width", "height", "transition_fraction", "fg_path",
                                  "alpha_path", "list_index"]
    rows = table.to_pylist()
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    for row in rows:
        fg = Image.open(tmp / "foregrounds" / row["fg_path"])
        alpha = Image.open(tmp / "foregrounds" / row["alpha_path"])
        assert (fg.mode, alpha.mode) == ("RGB", "L") and fg.size == alpha.size == (80, 64) == (row["width"],
                                                                                                 row["height"])
        values = np.asarray(alpha)
        assert row["transition_fraction"] == pytest.approx(np.mean((values > 0) & (values < 255)))
        assert row["source"] == "synthetic" and row["list_index"] is None


def test_composite_stage_outputs(built: tuple[Path, dict]) -> None:
    tmp, params = built
    out = tmp / "composites"
    table = pq.read_table(out / "manifest.parquet")
    assert table.column_names == ["cid", "split", "fg_id", "bg_name", "width", "height", "image_path", "alpha_path",
                                  "trimap_path"]
    rows = table.to_pylist()
    fg_rows = {r["id"]: r for r in pq.read_table(tmp / "foregrounds" / "manifest.parquet").to_pylist()}
    n_test = sum(r["split"] == "test" for r in fg_rows.values())
    assert len(rows) == 2 * len(fg_rows)
    train_bgs, test_bgs = set(), set()
    for row in rows:
        fg_row = fg_rows[row["fg_id"]]
        assert row["split"] == fg_row["split"]
        assert row["image_path"].startswith("test/" if row["split"] == "test" else "train/")
        (test_bgs if row["split"] == "test" else train_bgs).add(row["bg_name"])
        image, alpha = read_rgb(out / row["image_path"]), read_alpha(out / row["alpha_path"])
        trimap = read_alpha(out / row["trimap_path"])
        assert image.shape == (32, 40, 3) and (row["height"], row["width"]) == (32, 40)
        full_alpha = read_alpha(tmp / "foregrounds" / fg_row["alpha_path"])
        np.testing.assert_array_equal(alpha, downscale_alpha(full_alpha, 40))
        np.testing.assert_array_equal(trimap, band_trimap(alpha, 5))  # from the shrunk alpha
        # recompute the composite from its parts: builtin background index is in its name
        bg = builtin_background(0, int(row["bg_name"].split("/")[1].split("-")[0]))
        fg = read_rgb(tmp / "foregrounds" / fg_row["fg_path"])
        np.testing.assert_array_equal(image, composite_downscaled(fg, full_alpha, bg, 40))
        full = composite_image(fg, full_alpha, fit_background(bg, full_alpha.shape))  # at 64x80
        np.testing.assert_array_equal(composite_downscaled(fg, full_alpha, bg, None), full)
    per_fg = {}
    for row in rows:
        per_fg.setdefault(row["fg_id"], []).append(row["bg_name"])
    assert all(len(set(names)) == 2 for names in per_fg.values())  # distinct backgrounds per foreground
    assert len(test_bgs) == 2 * n_test and not train_bgs & test_bgs  # 10 backgrounds: enough to keep apart
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.mode == "RGB" and sheet.width >= 3 * 100 and sheet.height >= 4 * 100


def test_dvc_params_lists_name_exactly_what_the_data_stages_read() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["collect_foregrounds"]["params"] == ["seed", "foregrounds"]  # no composite key: F kept full size
    assert stages["composite"]["params"] == ["seed", "composite"]


def test_composite_stage_does_not_depend_on_worker_count(built: tuple[Path, dict]) -> None:
    tmp, _ = built
    parallel, serial = tmp / "composites", tmp / "composites-serial"
    assert pq.read_table(parallel / "manifest.parquet").equals(pq.read_table(serial / "manifest.parquet"))
    for path in sorted(parallel.rglob("*.png")):
        np.testing.assert_array_equal(np.asarray(Image.open(path)),
                                      np.asarray(Image.open(serial / path.relative_to(parallel))))
