"""Foreground sources and the collect_foregrounds step: validation, invalid-pair reports, splits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from fusionnet.data.collect import CollectConfig, InvalidForegroundError, assign_splits, collect_foregrounds
from fusionnet.data.imagefiles import ImageFileError, read_alpha, read_rgb
from fusionnet.data.sources import cap_size, dim_candidates, folder_candidates, load_candidate
from tests.support.helpers import ALPHAMATTING, ROOT, require_shared_data

SERIAL = CollectConfig(max_side=None, workers=1, test_fraction=0.0, val_fraction=0.0)


def _save(path: Path, array: np.ndarray, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _matte(height: int, width: int) -> np.ndarray:
    alpha = np.zeros((height, width), np.uint8)
    alpha[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    alpha[height // 4 - 1, :] = 100  # a transition row
    return alpha


def _bad_folder(root: Path) -> Path:
    """image/ + alpha/ with one good pair and one of each defect."""
    _save(root / "image" / "good.png", _photo(24, 32))
    _save(root / "alpha" / "good.png", _matte(24, 32))
    _save(root / "image" / "mismatch.png", _photo(24, 32))
    _save(root / "alpha" / "mismatch.png", _matte(20, 32))
    (root / "image" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    _save(root / "alpha" / "broken.png", _matte(24, 32))
    _save(root / "image" / "empty.png", _photo(24, 32))
    _save(root / "alpha" / "empty.png", np.zeros((24, 32), np.uint8))
    _save(root / "image" / "lonely.png", _photo(24, 32))
    _save(root / "alpha" / "orphan.png", _matte(24, 32))
    return root


def test_exclude_mode_reports_each_invalid_pair_by_name(tmp_path: Path) -> None:
    root = _bad_folder(tmp_path / "src")
    result = collect_foregrounds(folder_candidates(root), tmp_path / "out", SERIAL)
    assert [r["id"] for r in result.rows] == ["good"]
    reasons = {Path(name).name: reason for name, reason in result.invalid}
    assert set(reasons) == {"mismatch.png", "broken.png", "empty.png", "lonely.png", "orphan.png"}
    assert "size mismatch" in reasons["mismatch.png"] and "32x20" in reasons["mismatch.png"]
    assert "unreadable" in reasons["broken.png"] and "broken.png" in reasons["broken.png"]
    assert "empty alpha" in reasons["empty.png"]
    assert "no alpha matte" in reasons["lonely.png"]
    assert "without a foreground image" in reasons["orphan.png"]
    report = json.loads((tmp_path / "out" / "invalid.json").read_text())
    assert sorted(Path(r["name"]).name for r in report) == sorted(reasons)
    assert sorted(p.name for p in (tmp_path / "out" / "fg").iterdir()) == ["good.png"]


def test_fail_mode_raises_naming_every_file_and_writes_nothing(tmp_path: Path) -> None:
    root = _bad_folder(tmp_path / "src")
    config = CollectConfig(max_side=None, workers=1, on_invalid="fail")
    with pytest.raises(InvalidForegroundError) as caught:
        collect_foregrounds(folder_candidates(root), tmp_path / "out", config)
    for name in ("mismatch.png", "broken.png", "empty.png", "lonely.png", "orphan.png"):
        assert name in str(caught.value)
    assert not (tmp_path / "out").exists()
    assert not any(tmp_path.glob(".out.tmp-*"))  # no half-built folder left behind


def _run_collect(tmp_path: Path, root: Path, on_invalid: str) -> subprocess.CompletedProcess:
    params = {"seed": 0,  # no composite section: collect reads none of it (foregrounds keep their size)
              "foregrounds": {"source": "folder", "on_invalid": on_invalid, "val_fraction": 0.0,
                              "test_fraction": 0.0, "synthetic": {"count": 1, "size": [32, 32]},
                              "folder": {"root": str(root), "image_dir": "image", "alpha_dir": "alpha"}}}
    params_path = tmp_path / f"params-{on_invalid}.yaml"
    params_path.write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(ROOT / "stages" / "collect_foregrounds.py"), "--params",
                           str(params_path), "--out", str(tmp_path / f"out-{on_invalid}"), "--workers", "1"],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("on_invalid", ["exclude", "fail"])
def test_stage_message_names_the_files(tmp_path: Path, on_invalid: str) -> None:
    root = _bad_folder(tmp_path / "src")
    done = _run_collect(tmp_path, root, on_invalid)
    for name in ("mismatch.png", "broken.png", "empty.png", "lonely.png", "orphan.png"):
        assert name in done.stderr
    if on_invalid == "exclude":
        assert done.returncode == 0, done.stderr
        assert "5 invalid foreground pair(s) excluded" in done.stderr
        assert pq.read_table(tmp_path / "out-exclude" / "manifest.parquet").column("id").to_pylist() == ["good"]
        stored = read_alpha(tmp_path / "out-exclude" / "alpha" / "good.png")
        np.testing.assert_array_equal(stored, _matte(24, 32))  # source size, bit-exact
    else:
        assert done.returncode == 1
        assert "on_invalid: exclude" in done.stderr  # the message says how to proceed
        assert "Traceback" not in done.stderr
        assert not (tmp_path / "out-fail").exists()


def test_exif_orientation_is_applied_before_the_size_check(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored 32 wide, displayed 32 high
    photo = _photo(24, 32)
    _save(tmp_path / "image" / "turned.png", photo, exif=exif)
    _save(tmp_path / "alpha" / "turned.png", _matte(32, 24))
    fg, alpha = load_candidate(folder_candidates(tmp_path)[0], seed=0, synthetic_size=(32, 32), max_side=None)
    assert alpha.shape == (32, 24) and fg.shape == (32, 24, 3)
    np.testing.assert_array_equal(read_rgb(tmp_path / "image" / "turned.png"), np.rot90(photo, k=-1))


def test_read_alpha_accepts_grey_rgb_and_16_bit(tmp_path: Path) -> None:
    matte = _matte(12, 16)
    _save(tmp_path / "grey_rgb.png", np.repeat(matte[..., None], 3, axis=2))
    _save(tmp_path / "sixteen.png", matte.astype(np.uint16) * 257)
    np.testing.assert_array_equal(read_alpha(tmp_path / "grey_rgb.png"), matte)
    np.testing.assert_array_equal(read_alpha(tmp_path / "sixteen.png"), matte)
    colour = np.repeat(matte[..., None], 3, axis=2)
    colour[..., 1] = 0
    _save(tmp_path / "colour.png", colour)
    with pytest.raises(ImageFileError, match="colour.png.*colour image"):
        read_alpha(tmp_path / "colour.png")


def test_splits_are_disjoint_deterministic_and_sized() -> None:
    ids = [f"fg{i:02d}" for i in range(24)]
    splits = assign_splits(ids, {}, seed=0, test_fraction=0.2, val_fraction=0.15)
    assert sorted(splits) == ids  # each foreground in exactly one split
    counts = {s: sum(v == s for v in splits.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 16, "val": 3, "test": 5}  # 5 = round(4.8), 3 = round(19 * 0.15)
    assert splits == assign_splits(list(reversed(ids)), {}, seed=0, test_fraction=0.2, val_fraction=0.15)
    assert splits != assign_splits(ids, {}, seed=1, test_fraction=0.2, val_fraction=0.15)


def test_fixed_test_split_replaces_test_fraction() -> None:
    ids = [f"t{i}" for i in range(10)] + ["x", "y"]
    splits = assign_splits(ids, {"x": "test", "y": "test"}, seed=0, test_fraction=0.5, val_fraction=0.2)
    assert {k for k, v in splits.items() if v == "test"} == {"x", "y"}
    assert sum(v == "val" for v in splits.values()) == 2


def test_dim_layout_with_name_lists(tmp_path: Path) -> None:
    root = tmp_path / "Adobe_Deep_Matting"
    for subset, folder, name in [("Training_set", "Adobe-licensed images", "a.png"),
                                 ("Training_set", "Other", "b.png"), ("Test_set", "Adobe-licensed images", "c.png")]:
        _save(root / subset / folder / "fg" / name, _photo(20, 24))
        _save(root / subset / folder / "alpha" / name, _matte(20, 24))
    _save(root / "Training_set" / "Other" / "fg" / "unlisted.png", _photo(20, 24))
    (root / "Training_set" / "training_fg_names.txt").write_text("a.png\nb.png\nmissing.png\n")
    candidates = dim_candidates(root, "fg", "alpha", {"train": "Training_set", "test": "Test_set"},
                                {"train": "Training_set/training_fg_names.txt", "test": "Test_set/none.txt"})
    by_id = {c.id: c for c in candidates}
    assert set(by_id) == {"a", "b", "c", "missing"}  # unlisted.png is not in the list: not used
    assert [by_id[k].list_index for k in ("a", "b", "missing", "c")] == [0, 1, 2, None]  # position in its list
    assert by_id["c"].split == "test" and by_id["a"].split is None and by_id["b"].split is None
    assert "training_fg_names.txt" in by_id["missing"].problem
    result = collect_foregrounds(candidates, tmp_path / "out", CollectConfig(max_side=None, workers=1))
    assert {r["id"]: r["split"] for r in result.rows}["c"] == "test"
    assert [Path(name).name for name, _ in result.invalid] == ["missing.png"]
    assert {r["id"]: r["list_index"] for r in result.rows} == {"a": 0, "b": 1, "c": None}
    manifest = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert {r["id"]: r["list_index"] for r in manifest} == {"a": 0, "b": 1, "c": None}


def test_dim_list_index_follows_the_list_not_the_file_names(tmp_path: Path) -> None:
    root = tmp_path / "dim"
    for name in ("z.png", "a.png", "m.png"):
        _save(root / "Test_set" / "fg" / name, _photo(8, 8))
        _save(root / "Test_set" / "alpha" / name, _matte(8, 8))
    _save(root / "Training_set" / "fg" / "t.png", _photo(8, 8))
    _save(root / "Training_set" / "alpha" / "t.png", _matte(8, 8))
    (root / "Test_set" / "names.txt").write_text("z.png\nm.png\na.png\nz.png\n")  # a repeat keeps the first
    candidates = dim_candidates(root, name_lists={"test": "Test_set/names.txt"})
    assert [(c.id, c.list_index, c.problem) for c in candidates] == [
        ("t", None, None), ("z", 0, None), ("m", 1, None), ("a", 2, None)]


def _edge_pair() -> tuple[np.ndarray, np.ndarray]:
    """40x60: F red where alpha > 0, junk blue where alpha = 0; a soft vertical edge at x = 30."""
    alpha = np.zeros((40, 60), np.uint8)
    alpha[:, :30] = 255
    alpha[:, 30] = 128
    fg = np.zeros((40, 60, 3), np.uint8)
    fg[alpha > 0] = (230, 20, 10)
    fg[alpha == 0] = (0, 0, 255)
    return fg, alpha


def test_cap_size_keeps_small_pairs_and_shrinks_true_f_premultiplied() -> None:
    fg, alpha = _edge_pair()
    same_fg, same_alpha = cap_size(fg, alpha, 60, premultiplied=True)
    assert same_fg is fg and same_alpha is alpha
    small_fg, small_alpha = cap_size(fg, alpha, 30, premultiplied=True)
    assert small_fg.shape == (20, 30, 3) and small_alpha.shape == (20, 30)
    expected_alpha = np.asarray(Image.fromarray(alpha.astype(np.float32)).resize((30, 20), Image.Resampling.BILINEAR))
    assert np.abs(small_alpha.astype(float) - expected_alpha).max() <= 0.5
    seen = small_alpha > 0
    assert (small_alpha[:, 15] > 0).all() and (small_alpha[:, 15] < 255).all()  # the edge column
    # true F: no junk blue bleeds into pixels the matte covers (a plain resize of F would give about 128 there)
    assert np.abs(small_fg[seen].astype(int) - (230, 20, 10)).max() <= 1
    photo_fg, photo_alpha = cap_size(fg, alpha, 30, premultiplied=False)  # a photo: resized like its alpha
    np.testing.assert_array_equal(photo_alpha, small_alpha)
    assert photo_fg[0, 15, 2] > 60  # the plain resize mixes in the blue


def test_load_candidate_caps_only_with_max_side(tmp_path: Path) -> None:
    fg, alpha = _edge_pair()
    _save(tmp_path / "dim" / "Training_set" / "fg" / "e.png", fg)
    _save(tmp_path / "dim" / "Training_set" / "alpha" / "e.png", alpha)
    _save(tmp_path / "dim" / "Test_set" / "fg" / "e2.png", fg)
    _save(tmp_path / "dim" / "Test_set" / "alpha" / "e2.png", alpha)
    candidate = dim_candidates(tmp_path / "dim")[0]
    full_fg, full_alpha = load_candidate(candidate, seed=0, synthetic_size=(8, 8))
    np.testing.assert_array_equal(full_fg, fg)
    np.testing.assert_array_equal(full_alpha, alpha)
    capped = load_candidate(candidate, seed=0, synthetic_size=(8, 8), max_side=30)
    for got, want in zip(capped, cap_size(fg, alpha, 30, premultiplied=True)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.shared_data
def test_folder_source_on_real_alphamatting_subset(tmp_path: Path) -> None:
    require_shared_data(ALPHAMATTING)
    root = tmp_path / "subset"
    for name in ("GT01.png", "GT02.png", "GT05.png"):  # links, not copies, of the shared data
        for kind in ("image", "alpha"):
            (root / kind).mkdir(parents=True, exist_ok=True)
            (root / kind / name).symlink_to(ALPHAMATTING / kind / name)
    config = CollectConfig(workers=1, test_fraction=0.0, val_fraction=0.0)  # no cap: F estimated at 800 px
    result = collect_foregrounds(folder_candidates(root), tmp_path / "out", config)
    assert [r["id"] for r in result.rows] == ["GT01", "GT02", "GT05"] and not result.invalid
    for row in result.rows:
        fg = read_rgb(tmp_path / "out" / row["fg_path"])
        alpha = read_alpha(tmp_path / "out" / row["alpha_path"])
        photo = read_rgb(root / "image" / f"{row['id']}.png").astype(np.float64)
        np.testing.assert_array_equal(alpha, read_alpha(root / "alpha" / f"{row['id']}.png"))  # source size
        assert max(alpha.shape) == 800 and fg.shape == photo.shape
        assert 0.01 < row["transition_fraction"] == pytest.approx(np.mean((alpha > 0) & (alpha < 255)))
        opaque, soft = alpha == 255, (alpha > 25) & (alpha < 230)
        # estimated F equals the photo where the object is opaque, and differs from it in the blend zone
        assert np.abs(fg[opaque] - photo[opaque]).mean() < 4.0
        assert np.abs(fg[soft] - photo[soft]).mean() > 4.0


def test_folder_source_estimates_f_from_a_photo_and_its_alpha(tmp_path: Path) -> None:
    """A photo composited from a known F over a known B: the stored F is the photo where the object is
    opaque, and in the soft edge close to the true F (the photo there is mixed with B)."""
    x = np.linspace(0.0, 1.0, 40)
    alpha = np.tile(np.clip((x - 0.3) / 0.4, 0.0, 1.0), (24, 1))  # a 16-px linear ramp across the image
    alpha8 = np.rint(alpha * 255).astype(np.uint8)
    true_f, true_b = np.array([220.0, 40.0, 30.0]), np.array([20.0, 60.0, 230.0])
    a = alpha8[..., None] / 255.0
    photo = np.rint(a * true_f + (1 - a) * true_b).astype(np.uint8)
    _save(tmp_path / "src" / "image" / "ramp.png", photo)
    _save(tmp_path / "src" / "alpha" / "ramp.png", alpha8)
    result = collect_foregrounds(folder_candidates(tmp_path / "src"), tmp_path / "out", SERIAL)
    assert [r["id"] for r in result.rows] == ["ramp"] and not result.invalid
    fg = read_rgb(tmp_path / "out" / "fg" / "ramp.png").astype(np.float64)
    np.testing.assert_array_equal(read_alpha(tmp_path / "out" / "alpha" / "ramp.png"), alpha8)
    opaque, soft = alpha8 == 255, (alpha8 > 25) & (alpha8 < 230)
    assert np.abs(fg[opaque] - photo[opaque]).max() <= 1
    assert np.abs(fg[soft] - true_f).mean() < 3.0  # the estimate recovers F ...
    assert np.abs(photo[soft] - true_f).mean() > 50.0  # ... which the photo itself is far from
