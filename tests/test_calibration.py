"""One way to draw int8 calibration images (fusionnet.inference.calibration), shared by PyTorch int8
and the ONNX int8 export, which had each drawn their own."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fusionnet.data.shards import list_shards, read_shard, row_arrays
from fusionnet.inference.calibration import calibration_candidates, calibration_images
from fusionnet.onnx.common import ExportError
from fusionnet.onnx.quantize import calibration_images as onnx_calibration_images
from fusionnet.train.toy import write_toy_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("calib") / "shards", n_train=12, n_val=4, size=32, shard_rows=4)


def test_a_shard_folder_gives_its_training_rows_drawn_reproducibly(shards):
    candidates = calibration_candidates([shards])
    assert {path.parent.name for path, _ in candidates} == {"train"} and len(candidates) == 12
    first = calibration_images([shards], count=5, seed=3)
    assert len(first) == 5 and all(im.dtype == np.float32 and im.max() <= 1.0 for im in first)
    again = calibration_images([shards], count=5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    rows = [row_arrays(row)[0] for shard in list_shards(shards / "train") for row in read_shard(shard).to_pylist()]
    assert any(np.array_equal(first[0], row.astype(np.float32) / 255) for row in rows)


def test_pytorch_and_onnx_int8_calibrate_on_the_same_images(shards):
    torch_side = calibration_images([shards], count=6, seed=0)
    onnx_side = onnx_calibration_images(shards, count=6, seed=0)
    assert len(torch_side) == len(onnx_side) == 6
    assert all(np.array_equal(a, b) for a, b in zip(torch_side, onnx_side))


def test_image_folders_are_searched_recursively_and_hidden_files_skipped(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    rgb = np.zeros((20, 30, 3), np.uint8)
    for path in (tmp_path / "a" / "x.png", tmp_path / "a" / "b" / "y.jpg", tmp_path / ".hidden" / "z.png"):
        Image.fromarray(rgb).save(path)
    assert [p.name for p, _ in calibration_candidates([tmp_path])] == ["y.jpg", "x.png"]


def test_a_missing_or_empty_source_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        calibration_images([tmp_path / "nowhere"])
    with pytest.raises(ValueError, match="neither shards"):
        calibration_images([tmp_path])
    with pytest.raises(ExportError, match=r"--calibrate .*nowhere"):
        onnx_calibration_images(tmp_path / "nowhere")
