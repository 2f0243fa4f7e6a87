"""train_common.ema_decay: a step validates, keeps and hands on an exponential moving average of its
weights (fusionnet.train.averaging), and a crashed step resumes to the same average."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fusionnet import model as fmodel
from fusionnet.data.dataset import ShardDataset
from fusionnet.train import data as tdata
from fusionnet.train.averaging import WeightAverage, ema_decay_at
from fusionnet.train.config import StepConfig
from fusionnet.train.loop import run_step
from fusionnet.train.state import STATE_FILE, load_state
from fusionnet.train.toy import write_toy_shards
from fusionnet.train.validate import validate
from tests.support.helpers import tiny_train_params
from tests.test_train_resume import CrashAfter, assert_same_weights


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("ema") / "shards", n_train=8, n_val=2, size=64, seed=3)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(value)


def test_the_average_follows_the_decay_and_its_warm_up():
    assert [ema_decay_at(0.9, t) for t in (1, 2, 8, 80)] == pytest.approx([2 / 11, 3 / 12, 9 / 18, 0.9])
    model = _net()
    _set(model, 1.0)
    average = WeightAverage(model, decay=0.9)
    assert "1.num_batches_tracked" not in average.names and "1.running_var" in average.names
    expected = 1.0
    for t, value in enumerate((3.0, -2.0, 5.0), start=1):
        _set(model, value)
        average.update(model)
        d = ema_decay_at(0.9, t)
        expected = d * expected + (1 - d) * value
    assert all(torch.allclose(a, torch.full_like(a, expected)) for a in average.average)
    assert average.updates == 3


def test_the_average_is_swapped_in_and_the_live_weights_come_back_exactly():
    model = _net()
    live = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.5)
    _set(model, 2.0)
    average.update(model)
    _set(model, 4.0)
    now = {k: v.clone() for k, v in model.state_dict().items()}
    with average.swapped_into(model):
        inside = model.state_dict()
        assert all(torch.equal(inside[n], a) for n, a in zip(average.names, average.average))
        assert not torch.equal(inside["0.weight"], now["0.weight"])
    assert all(torch.equal(model.state_dict()[k], now[k]) for k in now)
    assert not torch.equal(now["0.weight"], live["0.weight"])


def test_the_average_round_trips_through_a_state_and_refuses_another_model():
    model = _net()
    average = WeightAverage(model, decay=0.5)
    _set(model, 3.0)
    average.update(model)
    again = WeightAverage(_net(), decay=0.5)
    again.load_state_dict(average.state_dict())
    assert again.updates == 1 and all(torch.equal(a, b) for a, b in zip(again.average, average.average))
    with pytest.raises(ValueError, match="does not match"):
        WeightAverage(nn.Linear(3, 2), 0.5).load_state_dict(average.state_dict())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_ema_decay_is_checked(decay):
    params = tiny_train_params(ema_decay=decay)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        StepConfig.from_params(params, "segmentation")
    assert StepConfig.from_params(tiny_train_params(), "segmentation").ema_decay is None


def _validated(path: Path, shards: Path, cfg: StepConfig) -> float:
    model = fmodel.load(path).eval()
    loader = tdata.val_loader(ShardDataset(shards / "val"), 2, None)
    return validate(model, loader, torch.device("cpu"), nullcontext, cfg.val_band_radius).val_sad


def _params(keep: str) -> dict:
    return tiny_train_params(epochs=2, iters=3, val_max_images=None, val_every=None, keep=keep, ema_decay=0.8)


def test_a_step_validates_and_hands_on_the_average_not_its_last_weights(shards, tmp_path):
    cfg = StepConfig.from_params(_params("last"), "segmentation")
    result = run_step("segmentation", cfg, shards, tmp_path / "seg")
    saved, state = load_file(str(result.model_path)), load_state(tmp_path / "seg" / STATE_FILE)
    assert state["ema"]["updates"] == 6
    assert all(torch.equal(saved[k], v) for k, v in state["ema"]["average"].items())
    # the same run without the average: the same training, whose last weights are not what was saved
    plain = run_step("segmentation", cfg.replace(ema_decay=None), shards, tmp_path / "plain")
    last = load_file(str(plain.model_path))
    trained = [k for k in last if not torch.equal(last[k], load_file(str(result.model_path))[k])]
    assert len(trained) > len(last) // 2
    history = json.loads(result.history_path.read_text())
    assert _validated(result.model_path, shards, cfg) == pytest.approx(history["validations"][-1]["val_sad"], rel=1e-6)
    assert history["validations"][-1]["val_sad"] != json.loads(plain.history_path.read_text())["validations"][-1]["val_sad"]


def test_keep_best_keeps_the_best_validated_average(shards, tmp_path):
    cfg = StepConfig.from_params(_params("best"), "segmentation")
    result = run_step("segmentation", cfg, shards, tmp_path / "seg")
    history = json.loads(result.history_path.read_text())
    best = min(history["validations"], key=lambda v: v["val_sad"])
    assert history["kept"]["iteration"] == best["iteration"]
    assert _validated(result.model_path, shards, cfg) == pytest.approx(best["val_sad"], rel=1e-6)


def test_a_crashed_step_resumes_to_the_same_average(shards, tmp_path):
    cfg = StepConfig.from_params(_params("last"), "segmentation")
    reference = run_step("segmentation", cfg, shards, tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        run_step("segmentation", cfg, shards, tmp_path / "crashed", logger=CrashAfter(4))
    assert load_state(tmp_path / "crashed" / STATE_FILE)["iteration"] == 3
    resumed = run_step("segmentation", cfg, shards, tmp_path / "crashed")
    assert_same_weights(reference.model_path, resumed.model_path)
