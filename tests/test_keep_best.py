"""Validation on whole val composites (crops.val_whole) and keeping a step's best validated weights."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from fusionnet import model as fmodel
from fusionnet.data.dataset import ShardDataset
from fusionnet.data.shards import shards_digest, write_shards
from fusionnet.metrics import sad, transition_band
from fusionnet.model import LateFusionNet
from fusionnet.train import data as tdata
from fusionnet.train.config import StepConfig
from fusionnet.train.loop import run_step
from fusionnet.train.toy import write_toy_shards
from fusionnet.train.validate import validate

TINY = {"backbone": "densenet121", "pretrained": False, "input_norm": "imagenet", "fpn_width": 16, "fusion_widths": [16, 16]}


def params(**common) -> dict:
    step = {"epochs": 2, "max_iters_per_epoch": 3, "base_lr": 5e-3, "max_lr": 2e-2, "half_cycle_epochs": 1}
    return {
        "seed": 7, "model": TINY,
        "train_common": {"device": "cpu", "precision": "fp32", "channels_last": False, "threads": 1, "batch_size": 2,
                         "num_workers": 0, "checkpoint_every": 2, "val_max_images": None, "visual_count": 2,
                         "val_every": 1, "keep": "best", **common},
        "train_seg": step, "train_fusion": step, "train_joint": step,
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("whole") / "shards", n_train=8, n_val=3, size=64, seed=3, whole_val=True)


def test_whole_val_composites_are_padded_and_scored_at_their_own_size(shards):
    torch.manual_seed(0)
    model = LateFusionNet(**TINY).eval()
    val = ShardDataset(shards / "val")
    loader = tdata.val_loader(val, batch_size=2, max_images=None)
    assert loader.batch_size == 1  # whole composites differ in size
    result = validate(model, loader, torch.device("cpu"), nullcontext, band_radius=5, visual_count=2)
    expected = []
    for i in range(len(val)):
        sample = val[i]
        image, gt = sample["image"][None], sample["alpha"][0].numpy().astype(np.float64)
        assert image.shape[-2:] == (72, 88)  # not multiples of 32
        padded = torch.nn.functional.pad(image, (0, 96 - 88, 0, 96 - 72), mode="reflect")
        with torch.no_grad():
            alpha = model(padded).alpha[0, 0, :72, :88].double().numpy()
        expected.append(sad(alpha, gt, transition_band(gt, 5)))
    assert result.val_images == 3
    assert result.val_sad == pytest.approx(float(np.mean(expected)), rel=1e-6)
    assert result.visuals["alpha"].shape == (2, 72, 88)


def test_keep_best_saves_the_lowest_validated_weights(shards, tmp_path):
    cfg = StepConfig.from_params(params(), "segmentation")
    result = run_step("segmentation", cfg, shards, tmp_path / "seg")
    history = json.loads(result.history_path.read_text())
    validations = history["validations"]
    assert [v["iteration"] for v in validations] == list(range(7))  # init, then every iteration
    best = min(validations, key=lambda v: v["val_sad"])
    assert history["kept"]["iteration"] == best["iteration"]
    assert history["kept"]["improved_on_init"] is (best["iteration"] > 0)
    # the saved file holds those weights: validating it again gives the recorded best score
    model = fmodel.load(result.model_path).eval()
    loader = tdata.val_loader(ShardDataset(shards / "val"), 2, None)
    again = validate(model, loader, torch.device("cpu"), nullcontext, cfg.val_band_radius)
    assert again.val_sad == pytest.approx(best["val_sad"], rel=1e-6)


def inverted_train(shards: Path, out: Path) -> Path:
    """A copy of `shards` whose training alpha is 1 - alpha: training that can only hurt validation."""
    rows = [r for path in sorted((shards / "train").glob("*.parquet")) for r in pq.read_table(path).to_pylist()]
    for r in rows:
        r["alpha"] = (255 - np.frombuffer(r["alpha"], np.uint8)).tobytes()
    write_shards(rows, out / "train", shard_rows=8)
    shutil.copytree(shards / "val", out / "val")
    summary = json.loads((shards / "summary.json").read_text())
    summary["data_version"] = shards_digest(out)
    (out / "summary.json").write_text(json.dumps(summary))
    return out


@pytest.fixture(scope="module")
def last_segmentation(shards, tmp_path_factory):
    """The paper's default: a segmentation step that keeps its last weights, validated at epoch ends only."""
    cfg = StepConfig.from_params(params(keep="last", val_every=None), "segmentation")
    return run_step("segmentation", cfg, shards, tmp_path_factory.mktemp("last") / "seg")


def test_a_step_that_never_beats_its_init_hands_the_init_on(shards, last_segmentation, tmp_path):
    seg = last_segmentation  # any trained init will do: one step run shared with the test below
    bad = inverted_train(shards, tmp_path / "inverted")
    joint = run_step("joint", StepConfig.from_params(params(), "joint"), bad, tmp_path / "joint", init_checkpoint=seg.model_path)
    history = json.loads(joint.history_path.read_text())
    assert min(v["val_sad"] for v in history["validations"][1:]) > history["validations"][0]["val_sad"]
    assert history["kept"] == {**history["validations"][0], "improved_on_init": False}
    init, kept = load_file(str(seg.model_path)), load_file(str(joint.model_path))
    assert all(torch.equal(init[k], kept[k]) for k in init)


def test_keep_last_is_the_paper_default(last_segmentation):
    assert StepConfig(step="segmentation").keep == "last"
    result = last_segmentation
    history = json.loads(result.history_path.read_text())
    assert [v["iteration"] for v in history["validations"]] == [0, 3, 6]  # init and epoch ends
    assert history["kept"]["iteration"] == 6 and history["kept"]["improved_on_init"] is None


def test_keep_and_val_every_are_checked():
    with pytest.raises(ValueError, match="keep 'first'"):
        StepConfig.from_params(params(keep="first"), "segmentation")
    with pytest.raises(ValueError, match="val_every must be >= 1"):
        StepConfig.from_params(params(val_every=0), "segmentation")


def test_whole_composites_get_the_test_band_at_working_size(shards, tmp_path):
    """A composite shrunk by src_scale 0.4 to working size: the test's 25 px band is 10 px there."""
    rows = [r for path in sorted((shards / "val").glob("*.parquet")) for r in pq.read_table(path).to_pylist()]
    for r in rows:
        r["src_scale"] = 0.4
    write_shards(rows, tmp_path / "val", shard_rows=8)
    assert tdata.val_band_radii(ShardDataset(tmp_path / "val"), 25) == [10, 10, 10]
    crops = write_toy_shards(tmp_path / "crops", n_train=4, n_val=2, size=64)
    assert tdata.val_band_radii(ShardDataset(crops / "val"), 25) == [25, 25]  # crops keep the radius
