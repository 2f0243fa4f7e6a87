"""DIM's background pairing: foreground i of a DIM name list gets background list entries i*n .. i*n+n-1.

DIM's Composition-1k script pairs test_fg_names[i] with test_bg_names[i*20 + j], j < 20, and its training
script training_fg_names[i] with training_bg_names[i*100 + j]: consecutive, in list order, no shuffling.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from fusionnet.data.backgrounds import Background, BackgroundList, background_lists_from_params
from fusionnet.data.composite import composite_downscaled, dim_list_assignment
from fusionnet.data.imagefiles import read_alpha, read_rgb
from tests.support.helpers import ROOT



def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _matte(height: int, width: int, seed: int) -> np.ndarray:
    alpha = np.zeros((height, width), np.uint8)
    alpha[2:-2, 3:-3] = 255
    alpha[1, :] = 40 + 30 * seed  # a soft row, different per foreground
    return alpha


def _colour(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _dim_tree(tmp: Path) -> dict:
    """A tiny DIM layout (fg/alpha PNGs + name lists, in an order that is not alphabetical) and
    COCO/VOC-like background folders with their name lists; returns the params for both stages."""
    dim = tmp / "Adobe_Deep_Matting"
    sizes = {"z": (20, 24), "a": (18, 26), "m": (16, 30), "t2": (22, 20), "t1": (14, 18)}
    for k, (name, (h, w)) in enumerate(sizes.items()):
        subset = "Training_set/Other" if name.startswith("t") else "Test_set/Adobe-licensed images"
        _save(dim / subset / "fg" / f"{name}.png", _colour(h, w, k))
        _save(dim / subset / "alpha" / f"{name}.png", np.zeros((h, w), np.uint8) if name == "a" else _matte(h, w, k))
    (dim / "Test_set" / "test_fg_names.txt").write_text("z.png\na.png\nm.png\n")   # a.png: empty alpha, excluded
    (dim / "Training_set" / "training_fg_names.txt").write_text("t2.png\nt1.png\n")
    for k in range(7):
        _save(tmp / "voc" / f"v{k}.png", _colour(12 + k, 15 + k, 100 + k))  # smaller than the fgs: DIM upscale
    for k in range(5):
        _save(tmp / "coco" / "train2014" / f"c{k}.png", _colour(30, 30, 200 + k))
    (tmp / "voc_names.txt").write_text("v5.png\nv1.png\nv3.png\nv0.png\nv3.png\nv2.png\n")  # v3 twice, v4/v6 unused
    (tmp / "coco_names.txt").write_text("train2014/c3.png\ntrain2014/c0.png\ntrain2014/c2.png\ntrain2014/c1.png\n")
    # the shipped foregrounds section with source dim and the root relative to params.yaml, as a user sets it
    foregrounds = yaml.safe_load((ROOT / "params.yaml").read_text())["foregrounds"]
    foregrounds.update(source="dim", on_invalid="exclude", val_fraction=0.5)
    foregrounds["dim"]["root"] = dim.name
    return {"seed": 0,
            "foregrounds": foregrounds,
            "composite": {"backgrounds": {"source": "folder", "folder": str(tmp / "coco"),
                                          "train_list": str(tmp / "coco_names.txt"), "test_folder": str(tmp / "voc"),
                                          "test_list": str(tmp / "voc_names.txt")},
                          "bg_per_fg": 2, "bg_per_test_fg": 2, "band_radius": 2, "max_side": 640}}


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    """A stage script run from the checkout, as DVC runs it (one worker)."""
    return subprocess.run([sys.executable, str(ROOT / "stages" / script), *args, "--workers", "1"],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("dimpair")
    params = _dim_tree(tmp)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    for script, args in (("collect_foregrounds.py", ["--out", str(tmp / "fg")]),
                         ("composite.py", ["--foregrounds", str(tmp / "fg"), "--out", str(tmp / "comp")])):
        done = _run(script, "--params", str(tmp / "params.yaml"), *args)
        assert done.returncode == 0, done.stderr
        (tmp / f"{script}.log").write_text(done.stdout + done.stderr)
    return tmp, params


def test_collect_stage_stores_each_dim_pair_at_its_source_pixels(built: tuple[Path, dict]) -> None:
    """The dim branch through the stage: the relative root is found beside params.yaml (the stage runs
    from the checkout), pairs are stored bit-exact, the empty matte is excluded by name."""
    tmp, _ = built
    dim = tmp / "Adobe_Deep_Matting"
    rows = {r["id"]: r for r in pq.read_table(tmp / "fg" / "manifest.parquet").to_pylist()}
    assert sorted(rows) == ["m", "t1", "t2", "z"] and {r["source"] for r in rows.values()} == {"dim"}
    for fg_id, row in rows.items():
        subset = "Training_set/Other" if fg_id.startswith("t") else "Test_set/Adobe-licensed images"
        source_fg, source_alpha = read_rgb(dim / subset / "fg" / f"{fg_id}.png"), read_alpha(dim / subset / "alpha" / f"{fg_id}.png")
        np.testing.assert_array_equal(read_rgb(tmp / "fg" / row["fg_path"]), source_fg)
        np.testing.assert_array_equal(read_alpha(tmp / "fg" / row["alpha_path"]), source_alpha)
        assert (row["height"], row["width"]) == source_alpha.shape
    invalid = json.loads((tmp / "fg" / "invalid.json").read_text())
    assert [Path(i["name"]).name for i in invalid] == ["a.png"] and "empty alpha" in invalid[0]["reason"]
    log = (tmp / "collect_foregrounds.py.log").read_text()
    assert "a.png: empty alpha" in log
    assert "4 foregrounds from source 'dim' (train 1, val 1, test 2; 1 invalid)" in log


def test_each_foreground_gets_its_consecutive_block_of_the_list_in_order(built: tuple[Path, dict]) -> None:
    tmp, _ = built
    fg_rows = {r["id"]: r for r in pq.read_table(tmp / "fg" / "manifest.parquet").to_pylist()}
    assert {k: (r["split"] == "test", r["list_index"]) for k, r in fg_rows.items()} == {
        "z": (True, 0), "m": (True, 2), "t2": (False, 0), "t1": (False, 1)}  # a.png excluded: m keeps index 2
    assert {r["split"] for k, r in fg_rows.items() if k.startswith("t")} == {"train", "val"}  # val is paired too
    rows = pq.read_table(tmp / "comp" / "manifest.parquet").to_pylist()
    pairs = {(r["fg_id"], int(r["cid"].rsplit("-", 1)[1])): r["bg_name"] for r in rows}
    assert pairs == {("z", 0): "v5.png", ("z", 1): "v1.png",          # test fg 0 -> voc list [0, 2)
                     ("m", 0): "v3.png", ("m", 1): "v2.png",          # test fg 2 -> voc list [4, 6)
                     ("t2", 0): "train2014/c3.png", ("t2", 1): "train2014/c0.png",   # train fg 0 -> [0, 2)
                     ("t1", 0): "train2014/c2.png", ("t1", 1): "train2014/c1.png"}   # train fg 1 -> [2, 4)


def test_stored_images_use_the_paired_backgrounds(built: tuple[Path, dict]) -> None:
    tmp, _ = built
    fg_rows = {r["id"]: r for r in pq.read_table(tmp / "fg" / "manifest.parquet").to_pylist()}
    for row in pq.read_table(tmp / "comp" / "manifest.parquet").to_pylist():
        folder = tmp / ("voc" if row["split"] == "test" else "coco")
        fg_row = fg_rows[row["fg_id"]]
        fg, alpha = read_rgb(tmp / "fg" / fg_row["fg_path"]), read_alpha(tmp / "fg" / fg_row["alpha_path"])
        expected = composite_downscaled(fg, alpha, read_rgb(folder / row["bg_name"]), 640)
        np.testing.assert_array_equal(read_rgb(tmp / "comp" / row["image_path"]), expected)


def test_too_short_a_list_fails_the_stage_naming_the_list(built: tuple[Path, dict]) -> None:
    tmp, params = built
    params = copy.deepcopy(params)
    (tmp / "short_names.txt").write_text("v5.png\nv1.png\nv3.png\nv0.png\nv3.png\n")  # m (index 2) needs entry 5
    params["composite"]["backgrounds"]["test_list"] = str(tmp / "short_names.txt")
    (tmp / "short.yaml").write_text(yaml.safe_dump(params))
    done = _run("composite.py", "--params", str(tmp / "short.yaml"), "--foregrounds", str(tmp / "fg"),
                "--out", str(tmp / "comp-short"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "short_names.txt" in done.stderr and "entries 4..5" in done.stderr and "lists 5" in done.stderr
    assert not (tmp / "comp-short").exists()


def test_lists_keep_order_and_repeats(built: tuple[Path, dict]) -> None:
    tmp, params = built
    lists = background_lists_from_params(params["composite"], tmp)
    assert [b.name for b in lists["test"].items] == ["v5.png", "v1.png", "v3.png", "v0.png", "v3.png", "v2.png"]
    assert lists["test"].path == tmp / "voc_names.txt" and len(lists["train"].items) == 4
    no_list = dict(params["composite"], backgrounds=dict(params["composite"]["backgrounds"], test_list=None))
    assert set(background_lists_from_params(no_list, tmp)) == {"train"}


def test_pairing_rejects_foregrounds_without_a_list_position() -> None:
    listed = BackgroundList(Path("lists/test_bg_names.txt"), tuple(Background(f"b{k}") for k in range(4)))
    rows = [{"id": "x", "source": "dim", "list_index": 1}]
    assert [b.name for b in dim_list_assignment(rows, listed, 2)["x"]] == ["b2", "b3"]
    with pytest.raises(ValueError, match=r"test_bg_names.txt.*y \(source 'dim'\) has none"):
        dim_list_assignment(rows + [{"id": "y", "source": "dim", "list_index": None}], listed, 2)
    with pytest.raises(ValueError, match=r"test_bg_names.txt: lists 4 backgrounds.*entries 4..5"):
        dim_list_assignment([{"id": "x", "source": "dim", "list_index": 2}], listed, 2)
