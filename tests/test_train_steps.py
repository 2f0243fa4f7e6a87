"""run_step end to end on tiny toy shards: the three steps chained, their outputs, freezing across steps,
loss going down on a fixed batch, resuming a finished step, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusionnet import model as fmodel
from fusionnet.train.config import StepConfig
from fusionnet.train.loop import run_step
from fusionnet.train.losslog import LOSS_LOG_FILE, LossLog
from fusionnet.train.state import STATE_FILE, load_state
from fusionnet.train.toy import write_toy_shards
from tests.support.helpers import tiny_train_params


def tiny_params(**step_overrides) -> dict:
    """Narrow heads (several times faster than the paper's widths on CPU), 2 iterations a step, 2 val images."""
    params = tiny_train_params(narrow=True, val_max_images=2, visual_count=2)
    params["train_seg"].update(warmup_epochs=1, **step_overrides)
    params["train_fusion"].update(step_overrides)
    params["train_joint"].update({"max_lr": 1e-3, **step_overrides})
    return params


MODEL = tiny_params()["model"]


class RecordingLogger:
    def __init__(self):
        self.params, self.metrics, self.images = [], [], []

    def log_params(self, params):
        self.params.append(params)

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, png_path, artifact_name):
        assert Path(png_path).is_file()
        self.images.append(artifact_name)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # warm-up images at another size than the crops: the trainer resizes them to batch together
    return write_toy_shards(tmp_path_factory.mktemp("toy") / "shards", n_train=8, n_val=2, size=64)


@pytest.fixture(scope="module")
def chain(shards, tmp_path_factory):
    """segmentation -> fusion -> joint, each from the previous step's model."""
    root = tmp_path_factory.mktemp("chain")
    params = tiny_params()
    results, loggers, init = {}, {}, None
    for step in ("segmentation", "fusion", "joint"):
        loggers[step] = RecordingLogger()
        results[step] = run_step(step, StepConfig.from_params(params, step), shards, root / step, init, loggers[step])
        init = results[step].model_path
    return results, loggers


def test_each_step_writes_its_outputs(chain):
    results, loggers = chain
    for step, result in results.items():
        out = result.out_dir
        assert (out / "model.safetensors").is_file() and (out / STATE_FILE).is_file()
        assert (out / "plots" / "loss_curves.png").is_file()
        assert (out / "plots" / "val_epoch_000.png").is_file() and (out / "plots" / "val_epoch_001.png").is_file()
        history = json.loads((out / "history.json").read_text())
        assert history["finished"] and history["step"] == step
        assert set(history["initial_val"]) == {"val_sad", "val_mse", "val_images", "val_s"}
        assert history["initial_val"]["val_images"] == 2
        (epoch,) = history["epochs"]
        for key in ("epoch", "val_sad", "val_mse", "train_loss", "samples_per_s", "data_wait_fraction"):
            assert key in epoch
        assert epoch["val_sad"] > 0 and 0 <= epoch["data_wait_fraction"] < 1
        # segmentation's first epoch mixes 8 crops + 4 warm-up images, capped at 2 iterations
        assert result.iterations == 2 and result.samples_per_s > 0
        assert result.history == history["epochs"] and result.initial_val == history["initial_val"]
        fmodel.load(result.model_path)  # a valid model file
        log = loggers[step]
        assert len(log.params) == 1 and log.params[0]["step"] == step
        iteration_steps = [s for s, m in log.metrics if "train/loss" in m]
        assert iteration_steps == [1, 2]
        assert all("train/lr" in m for s, m in log.metrics if "train/loss" in m)
        assert any("val/sad" in m for _, m in log.metrics)
        assert "plots/loss_curves.png" in log.images and "plots/val_epoch_001.png" in log.images


def test_logged_learning_rates_follow_the_schedule(chain):
    results, loggers = chain
    lrs = [m["train/lr"] for _, m in loggers["segmentation"].metrics if "train/lr" in m]
    # 2 iterations per epoch, half-cycle 1 epoch = 2 iterations: base, then halfway to max
    assert lrs == pytest.approx([5e-4, 1e-3])


def test_steps_chain_and_freeze_what_they_should(chain):
    results, _ = chain
    seg, fusion, joint = (load_file(str(results[s].model_path)) for s in ("segmentation", "fusion", "joint"))
    changed = lambda a, b: {k for k in a if not torch.equal(a[k], b[k])}  # noqa: E731
    # fusion step: started from segmentation's weights, changed only the fusion network
    fusion_changes = changed(seg, fusion)
    assert fusion_changes and all(k.startswith("fusion.") for k in fusion_changes)
    # joint step: every BatchNorm (statistics and affine) exactly as the fusion step left it
    joint_changes = changed(fusion, joint)
    bn_suffixes = ("running_mean", "running_var", "num_batches_tracked")
    assert not any(k.endswith(bn_suffixes) for k in joint_changes)
    assert "encoder.stem.1.weight" not in joint_changes and "fusion.rgb.1.bias" not in joint_changes
    assert any(k.startswith("encoder.") for k in joint_changes) and any(k.startswith("fusion.") for k in joint_changes)
    # the fusion step's initial model is the segmentation step's final one: same val score
    assert results["fusion"].initial_val["val_sad"] == pytest.approx(results["segmentation"].history[-1]["val_sad"])


def test_finished_step_is_not_retrained(chain, shards):
    results, _ = chain
    seg = results["segmentation"]
    before = seg.model_path.stat().st_mtime_ns
    again = run_step("segmentation", StepConfig.from_params(tiny_params(), "segmentation"), shards, seg.out_dir)
    assert seg.model_path.stat().st_mtime_ns == before
    assert again.history == seg.history and again.iterations == seg.iterations


def test_state_file_loads_with_weights_only(chain):
    results, _ = chain
    state = load_state(results["joint"].out_dir / STATE_FILE)
    assert state["finished"] and state["iteration"] == 2 and set(state["model"]) >= {"encoder.stem.0.weight"}
    rows = LossLog(results["joint"].out_dir / LOSS_LOG_FILE).read()
    assert rows[0]["iteration"] == 1 and "loss_fusion" in rows[0] and "loss_log" not in state


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    # two fixed training crops and batch 2: every iteration sees the same batch
    shards = write_toy_shards(tmp_path / "shards", n_train=2, n_val=1, size=64, fixed=True)
    params = tiny_params(epochs=1, max_iters_per_epoch=None, base_lr=0.02, max_lr=0.02)
    params["train_common"].update(checkpoint_every=100)
    params["train_seg"]["warmup_epochs"] = 0
    cfg = StepConfig.from_params(params, "segmentation").replace(epochs=8)
    run_step("segmentation", cfg, shards, tmp_path / "seg")
    losses = [row["loss"] for row in LossLog(tmp_path / "seg" / LOSS_LOG_FILE).read()]
    assert len(losses) == 8
    assert losses[-1] < 0.8 * losses[0], losses
    assert min(losses[4:]) < min(losses[:4]), losses


def test_resume_with_other_settings_starts_afresh(shards, tmp_path):
    params = tiny_params()
    first = run_step("fusion", StepConfig.from_params(params, "fusion"), shards, tmp_path / "f")
    params["train_fusion"]["max_lr"] = 2e-3
    second = run_step("fusion", StepConfig.from_params(params, "fusion"), shards, tmp_path / "f")
    assert second.iterations == first.iterations == 2
    assert json.loads((tmp_path / "f" / "history.json").read_text())["config"]["max_lr"] == 2e-3


def test_bad_inputs_are_named(shards, tmp_path):
    cfg = StepConfig.from_params(tiny_params(), "segmentation")
    with pytest.raises(FileNotFoundError, match="nowhere/summary.json: missing"):
        run_step("segmentation", cfg, tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ValueError, match="StepConfig for step 'segmentation'"):
        run_step("joint", cfg, shards, tmp_path / "out")
    with pytest.raises(ValueError, match="fp16 needs device cuda"):
        run_step("segmentation", cfg.replace(precision="fp16"), shards, tmp_path / "out")
    odd = write_toy_shards(tmp_path / "odd", n_train=4, n_val=1, size=48)
    with pytest.raises(ValueError, match="multiples of 32"):
        run_step("segmentation", cfg, odd, tmp_path / "out")
    wrong = tmp_path / "wrong.safetensors"
    torch.manual_seed(0)
    fmodel.save(fmodel.LateFusionNet(**{**MODEL, "input_norm": "authors"}), wrong)  # only input_norm differs
    with pytest.raises(ValueError, match="does not match params model"):
        run_step("fusion", StepConfig.from_params(tiny_params(), "fusion"), shards, tmp_path / "out2", init_checkpoint=wrong)
    capped = tmp_path / "capped.safetensors"  # same but for the decoder width cap: still a different network
    fmodel.save(fmodel.LateFusionNet(**{**MODEL, "decoder_max_width": 64}), capped)
    with pytest.raises(ValueError, match="does not match params model"):
        run_step("fusion", StepConfig.from_params(tiny_params(), "fusion"), shards, tmp_path / "out3", init_checkpoint=capped)


@pytest.mark.parametrize("step, scales", [("segmentation", [0.25, 1.0]), ("fusion", [1.0]), ("joint", [0.25, 1.0])])
def test_encoder_learns_at_encoder_lr_scale_times_the_schedule(shards, tmp_path, step, scales):
    params = tiny_params(base_lr=0.01, max_lr=0.01)
    params["model"] = {**params["model"], "backbone": "efficientnet_lite0"}
    params["train_common"]["encoder_lr_scale"] = 0.25
    cfg = StepConfig.from_params(params, step)
    init = None
    if step != "segmentation":  # the fusion and joint steps start from a model file
        init = tmp_path / "init.safetensors"
        fmodel.save(fmodel.LateFusionNet(**params["model"]), init)
    run_step(step, cfg, shards, tmp_path / step, init_checkpoint=init)
    groups = load_state(tmp_path / step / STATE_FILE)["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == scales  # the fusion step trains no encoder parameter
    assert [g["lr"] for g in groups] == pytest.approx([0.01 * s for s in scales])


def test_encoder_lr_scale_zero_freezes_the_encoder_in_every_step(shards, tmp_path):
    params = tiny_params(base_lr=0.01, max_lr=0.01)
    params["train_common"]["encoder_lr_scale"] = 0.0
    init = tmp_path / "init.safetensors"
    fmodel.save(fmodel.LateFusionNet(**params["model"]), init)
    before = load_file(str(init))
    for step in ("segmentation", "joint"):
        result = run_step(step, StepConfig.from_params(params, step), shards, tmp_path / step, init_checkpoint=init)
        after = load_file(str(result.model_path))
        encoder = [k for k in before if k.startswith("encoder.")]
        assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)  # not even a tiny LR
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("fg_decoder."))
        groups = load_state(tmp_path / step / STATE_FILE)["optimizer"]["param_groups"]
        assert [g["lr_scale"] for g in groups] == [1.0]
    params["train_common"]["encoder_lr_scale"] = -0.1
    with pytest.raises(ValueError, match=r"encoder_lr_scale must be in \[0, 1\]"):
        StepConfig.from_params(params, "segmentation")
