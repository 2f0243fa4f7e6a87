"""Parquet shards: byte-exact round trip, atomic writes, build_shards and the shard_crops stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from fusionnet.data.crops import CropParams
from fusionnet.data.dataset import ShardDataset
from fusionnet.data.shards import (
    SCHEMA,
    build_shards,
    list_shards,
    read_shard,
    row_arrays,
    shards_digest,
    write_shards,
)
from tests.support.helpers import ROOT, poll
from tests.test_crops import make_composites_dir



def random_row(rng: np.random.Generator, i: int, h: int = 6, w: int = 5) -> dict:
    return dict(
        image=rng.integers(0, 256, h * w * 3, dtype=np.uint8).tobytes(),
        alpha=rng.integers(0, 256, h * w, dtype=np.uint8).tobytes(),
        height=h, width=w, cid=f"c{i}", fg_id=f"f{i}", bg_name=f"b{i}.jpg", crop_y=-i, crop_x=i,
        crop_size=10 + i, angle=float(i) / 4, flipped=bool(i % 2), kind="crop", src_height=40, src_width=50,
        src_scale=1.0, transition=np.arange(i, dtype=np.uint32).tobytes(),
    )


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_round_trip_is_byte_exact(tmp_path, compression):
    rng = np.random.default_rng(0)
    rows = [random_row(rng, i, h=6 + i, w=5 + 2 * i) for i in range(7)]
    paths = write_shards(iter(rows), tmp_path, shard_rows=3, compression=compression)
    assert [p.name for p in paths] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert list_shards(tmp_path) == paths
    read = [r for p in paths for r in read_shard(p).to_pylist()]
    assert read == rows  # every column, images and alphas byte for byte
    assert read_shard(paths[0]).schema.equals(SCHEMA)
    dataset = ShardDataset(tmp_path)
    for i, row in enumerate(rows):
        image, alpha = dataset.read_arrays(i)
        assert np.array_equal(image, row_arrays(row)[0]) and np.array_equal(alpha, row_arrays(row)[1])


def test_bad_rows_are_rejected_with_the_problem_named(tmp_path):
    rng = np.random.default_rng(1)
    row = random_row(rng, 0)
    with pytest.raises(ValueError, match=r"missing \['kind'\]"):
        write_shards([{k: v for k, v in row.items() if k != "kind"}], tmp_path, 4)
    with pytest.raises(ValueError, match="'c0'.*do not match height 6 x width 5"):
        write_shards([dict(row, alpha=b"\x00" * 7)], tmp_path, 4)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left


def test_failure_mid_shard_leaves_only_complete_shards(tmp_path):
    rng = np.random.default_rng(2)

    def rows_then_failure():
        for i in range(5):
            yield random_row(rng, i)
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_shards(rows_then_failure(), tmp_path, shard_rows=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.parquet"]  # rows 3-4 dropped, no temp
    assert len(ShardDataset(tmp_path)) == 3


def test_killed_writer_leaves_no_visible_shard(tmp_path):
    """A writer killed mid-shard leaves only its hidden temp file, which no reader picks up.

    The child's rows fill shards 0 and 1 and start shard 2, then the row source blocks on its stdin,
    which the test never writes: the kill lands mid-shard 2 on a machine of any speed (no race).
    """
    out, blocked = tmp_path / "out", tmp_path / "blocked"
    script = textwrap.dedent(
        f"""
        import sys, numpy as np
        from pathlib import Path
        from fusionnet.data.shards import write_shards
        from tests.test_shards import random_row
        rng = np.random.default_rng(0)
        def rows():
            for i in range(5):  # shard_rows=2: rows 0-3 complete shards 0 and 1, row 4 is in shard 2
                yield random_row(rng, i)
            Path({str(blocked)!r}).write_text("row 4 written")
            sys.stdin.read()  # until the test kills us
            yield random_row(rng, 5)
        write_shards(rows(), {str(out)!r}, shard_rows=2)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdin=subprocess.PIPE)
    try:
        poll(blocked.exists, 120, "the writer blocked in shard 2", child)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stdin.close()
    temps = [p for p in out.iterdir() if ".tmp-" in p.name]
    assert [p.name for p in temps] == [f".shard-00002.parquet.tmp-{child.pid}"]
    complete = sorted(p.name for p in out.glob("*.parquet"))
    assert complete == ["shard-00000.parquet", "shard-00001.parquet"]  # the half-written shard 2 is not visible
    assert [p.name for p in list_shards(out)] == complete
    assert len(ShardDataset(out)) == 4
    with pytest.raises(FileNotFoundError):
        list_shards(temps[0])


def tiny_params(**overrides) -> CropParams:
    base = dict(sizes=(16, 24), out_size=16, per_image=3, warmup_size=20, rotation_deg=15.0, shard_rows=4)
    return CropParams(**{**base, **overrides})


def test_build_shards_layout_summary_and_determinism(tmp_path):
    composites = make_composites_dir(tmp_path / "composites", {"train": 3, "val": 2, "test": 2})
    summary = build_shards(composites, tmp_path / "a", tiny_params(), seed=3, workers=1)
    sizes = {k: sum(p.stat().st_size for p in list_shards(tmp_path / "a" / k)) for k in ("train", "val")}
    assert summary == {
        "train": {"rows": 3, "shards": 1, "bytes": sizes["train"]}, "val": {"rows": 6, "shards": 2, "bytes": sizes["val"]},
        "composites": {"train": 3, "val": 2},
        "sampling": {"sizes": [16, 24], "out_size": 16, "warmup_size": 20, "rotation_deg": 15.0, "flip": True},
        "data_version": shards_digest(tmp_path / "a"),
        "working_max_side": tiny_params().max_side,  # the trained model's serving max_side
    }
    assert json.loads((tmp_path / "a" / "summary.json").read_text()) == summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "composites"]  # no temp dir left
    assert not (tmp_path / "a" / "warmup").exists()  # warm-up images are cut from the train composites
    build_shards(composites, tmp_path / "b", tiny_params(), seed=3, workers=2)
    build_shards(composites, tmp_path / "c", tiny_params(), seed=4, workers=1)
    for kind in ("train", "val"):
        a, b, c = ([r for p in list_shards(tmp_path / d / kind) for r in read_shard(p).to_pylist()] for d in "abc")
        assert a == b, f"{kind}: output depends on the number of workers"
        assert {r["kind"] for r in a} == {"composite" if kind == "train" else "crop"}
        assert not any(r["cid"].startswith("test") for r in a)
        if kind == "val":
            assert all(r["height"] == r["width"] == 16 for r in a)
            assert a != c, "a different seed gives different val crops"
        else:  # whole composites with their transition-pixel index
            assert a == c
            for r in a:
                _, alpha = row_arrays(r)
                flat = np.frombuffer(r["transition"], dtype=np.uint32)
                assert np.array_equal(flat, np.flatnonzero((alpha > 0) & (alpha < 255)))
    # a rebuild replaces the previous output completely
    build_shards(composites, tmp_path / "a", tiny_params(shard_rows=100), seed=3, workers=1)
    assert [p.name for p in list_shards(tmp_path / "a" / "val")] == ["shard-00000.parquet"]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["data_version"] == shards_digest(tmp_path / "a")
    assert shards_digest(tmp_path / "a") != summary["data_version"]


def test_build_shards_downscales_to_max_side(tmp_path):
    composites = make_composites_dir(tmp_path / "composites", {"train": 1}, size=(40, 80))
    build_shards(composites, tmp_path / "s", tiny_params(max_side=40), seed=0, workers=1)
    row = read_shard(list_shards(tmp_path / "s" / "train")[0]).to_pylist()[0]
    assert (row["src_height"], row["src_width"]) == (20, 40) and row["src_scale"] == pytest.approx(0.5)


def test_build_shards_bad_input_names_the_file_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.parquet"):
        build_shards(tmp_path / "nope", tmp_path / "out", tiny_params(), seed=0)
    composites = make_composites_dir(tmp_path / "composites", {"train": 2})
    missing = sorted((composites / "image").glob("*.png"))[1]
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=missing.name):
        build_shards(composites, tmp_path / "out", tiny_params(), seed=0, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["composites"]


def test_shard_crops_stage_runs_end_to_end(tmp_path):
    composites = make_composites_dir(tmp_path / "data" / "composites", {"train": 2, "val": 1, "test": 1})
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["crops"].update(sizes=[16, 24], out_size=16, per_image=2, warmup_size=24, shard_rows=3, val_whole=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "shard_crops.py"), "--params", "params.yaml",
         "--composites", "data/composites", "--out", "data/shards", "--workers", "2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "data" / "shards" / "summary.json").read_text())
    assert summary["train"]["rows"] == 2 and summary["val"]["rows"] == 2
    assert summary["sampling"]["warmup_size"] == 24
    sample = ShardDataset(tmp_path / "data" / "shards" / "val")[0]
    assert sample["image"].shape == (3, 16, 16)
    # val_whole: the val composite is stored whole, at working size, like a training composite
    params["crops"]["val_whole"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "shard_crops.py"), "--params", "params.yaml",
         "--composites", "data/composites", "--out", "data/shards"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "1 val composites (whole)" in result.stderr
    val = ShardDataset(tmp_path / "data" / "shards" / "val")
    assert len(val) == 1 and val.column("kind") == ["composite"]
    train = ShardDataset(tmp_path / "data" / "shards" / "train")
    assert val[0]["image"].shape == train[0]["image"].shape  # same working size as the training composites
    # a bad params key fails with the key named
    params["crops"]["sizez"] = [3]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "shard_crops.py"), "--params", "params.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "sizez" in result.stderr
    assert composites.exists()
