"""One way to open a model: `fusionnet matte`, `fusionnet serve` and the pyfunc take a model's serving
settings from the caller, else the model file's header, else a downloaded MLflow model's settings.json,
else the defaults, so one file or URI mattes the same way in each (issue 24)."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fusionnet.cli.main import main as fusionnet
from fusionnet.inference.matter import Matter
from fusionnet.inference.opening import SERVING_DEFAULTS, open_model, stored_settings
from fusionnet.model import read_metadata, save
from fusionnet.server import main as server
from tests.support.helpers import tiny_net

HEADER = {"max_side": 64, "precision": "fp32", "refine": False, "radius": 3, "eps": 0.01}


@pytest.fixture(scope="module")
def model():
    return tiny_net(seed=2, narrow=True)


@pytest.fixture(scope="module")
def with_header(tmp_path_factory, model):
    return save(model, tmp_path_factory.mktemp("opening") / "served.safetensors", serving=HEADER)


def mlflow_layout(folder, model, settings):
    """The folder a `models:/` URI downloads to: MLmodel beside artifacts/{weights, settings.json}."""
    (folder / "artifacts").mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors: {}\n")
    (folder / "artifacts" / "settings.json").write_text(json.dumps(settings))
    return save(model, folder / "artifacts" / "model.safetensors")


def test_the_header_carries_the_settings_and_the_caller_overrides_them_key_by_key(with_header):
    assert json.loads(read_metadata(with_header)["serving"]) == HEADER
    opened = open_model(with_header, device="cpu")
    assert opened.settings == HEADER
    assert set(opened.settings_from.values()) == {f"{with_header} (header serving)"}
    assert (opened.matter.max_side, opened.matter.refine, opened.matter.radius, opened.matter.eps) == (64, False, 3, 0.01)
    assert opened.matter.precision == "fp32"
    opened = open_model(with_header, device="cpu", max_side=96, refine=None)
    assert opened.settings["max_side"] == 96 and opened.settings_from["max_side"] == "command line"
    assert opened.settings["refine"] is False and opened.settings_from["refine"].endswith("(header serving)")


def test_a_file_without_settings_gets_the_defaults(tmp_path, model):
    plain = save(model, tmp_path / "plain.safetensors")
    assert stored_settings(plain) == ({}, None)
    opened = open_model(plain, device="cpu", precision="fp32")
    assert opened.settings == SERVING_DEFAULTS | {"precision": "fp32"}
    assert opened.settings_from["max_side"] == "default"


def test_a_downloaded_mlflow_model_brings_its_settings_json_and_a_header_wins_over_it(tmp_path, model):
    registered = {"max_side": 48, "precision": "fp32", "refine": True, "radius": 2, "eps": 0.001, "device": "cpu"}
    weights = mlflow_layout(tmp_path / "pulled", model, registered)
    settings, source = stored_settings(weights)
    assert settings == {k: registered[k] for k in SERVING_DEFAULTS} and source.endswith("settings.json")
    # the same settings.json outside an MLflow model folder is not taken
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "settings.json").write_text(json.dumps(registered))
    assert stored_settings(save(model, loose / "model.safetensors")) == ({}, None)
    save(model, weights, serving=HEADER)
    assert stored_settings(weights)[0] == HEADER


@pytest.mark.parametrize("bad", [{"max_side": 0}, {"precision": "fp8"}, {"refine": "yes"}, {"eps": -1}])
def test_a_bad_stored_setting_is_an_error_naming_the_file_and_the_key(tmp_path, model, bad):
    path = save(model, tmp_path / "bad.safetensors", serving=bad)
    with pytest.raises(ValueError, match=rf"bad\.safetensors.*{next(iter(bad))}="):
        open_model(path, device="cpu")


def test_matte_and_serve_treat_one_file_the_same(with_header, model, tmp_path, capsys):
    """`fusionnet matte` uses the header's settings (it used to ignore a model's stored settings) and
    says where they came from; `fusionnet serve` of the same file reports the same ones."""
    rgb = np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    assert fusionnet(["matte", str(tmp_path / "photo.png"), "--model", str(with_header), "--out",
                      str(tmp_path / "out"), "--device", "cpu", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "max_side=64" in err and "header serving" in err
    alpha = np.asarray(Image.open(tmp_path / "out" / "photo_alpha.png"), np.int32)
    expected = Matter(model, device="cpu", precision="fp32", max_side=64, refine=False)(rgb).alpha
    assert np.abs(alpha - np.round(expected * 255)).max() <= 1
    default_side = Matter(model, device="cpu", precision="fp32", max_side=800, refine=False)(rgb).alpha
    assert np.abs(expected - default_side).max() > 0.01  # the setting is observable in the output

    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    httpd = SimpleNamespace()
    service = server._load_service(parser.parse_args([str(with_header), "--threads", "1"]), httpd)
    try:
        health = httpd.health_info
        assert {k: health[k] for k in ("max_side", "refine", "radius", "eps", "precision")} == HEADER
        assert health["model"]["settings_from"]["max_side"].endswith("(header serving)")
    finally:
        service.close()


def test_a_header_and_a_registry_settings_json_apply_key_by_key(tmp_path, model):
    """Training writes max_side into the file; registration adds the tuned guided filter beside it
    (settings.json) without touching the file: both apply (the header used to hide settings.json)."""
    registered = {"max_side": 800, "precision": "fp32", "refine": True, "radius": 2, "eps": 0.001}
    weights = mlflow_layout(tmp_path / "pulled", model, registered)
    save(model, weights, serving={"max_side": 96})
    settings, source = stored_settings(weights)
    assert settings == registered | {"max_side": 96} and source == f"{weights} (header serving)"
    opened = open_model(weights, device="cpu")
    assert (opened.matter.max_side, opened.matter.radius, opened.matter.eps) == (96, 2, 0.001)
    assert opened.settings_from["max_side"] == f"{weights} (header serving)"
    assert opened.settings_from["radius"] == str(weights.parent / "settings.json")


def test_training_writes_its_working_scale_into_the_model_file(tmp_path):
    """A model trained on shards whose composites were shrunk to max_side N is served at N by default."""
    from fusionnet.train.config import StepConfig
    from fusionnet.train.loop import run_step
    from fusionnet.train.toy import write_toy_shards
    from tests.test_keep_best import params

    shards = write_toy_shards(tmp_path / "shards", n_train=4, n_val=2, size=64, seed=1)
    assert json.loads((shards / "summary.json").read_text())["working_max_side"] == 96
    cfg = StepConfig.from_params(params(keep="last", val_every=None) | {"train_seg": {
        "epochs": 1, "max_iters_per_epoch": 1, "base_lr": 5e-3, "max_lr": 2e-2, "half_cycle_epochs": 1}}, "segmentation")
    result = run_step("segmentation", cfg, shards, tmp_path / "seg")
    assert json.loads(read_metadata(result.model_path)["serving"]) == {"max_side": 96}
    assert open_model(result.model_path, device="cpu").settings["max_side"] == 96
