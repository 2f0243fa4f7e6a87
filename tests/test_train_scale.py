"""Training at the paper's scale on GPUs, checked on the CPU: no host sync per iteration, a loss log
that does not grow state.pt, this GPU's RNG only, cuDNN autotuning, the global batch by gradient
accumulation, the process count, DDP options. (Two processes x 1 = one x 2 accumulated, and a
2-process state resumed on one process: tests/test_train_ddp.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from fusionnet.model import LateFusionNet
from fusionnet.train import loop
from fusionnet.train.config import StepConfig
from fusionnet.train.distributed import SYNC_BUFFERS_ARG, DistContext, ddp_options
from fusionnet.train.forward import step_module
from fusionnet.train.freezing import set_train_mode
from fusionnet.train.loop import run_step
from fusionnet.train.losslog import LOSS_LOG_FILE, LossLog, LossWindow, downsample
from fusionnet.train.state import STATE_FILE, capture_rng, load_state, restore_rng
from fusionnet.train.torchsettings import training_settings
from fusionnet.train.toy import write_toy_shards
from pipeline.training.launch import processes_per_node, train_device, visible_gpus
from tests.support.helpers import tiny_train_params

NARROW = {"fpn_width": 16, "fusion_widths": [32, 16, 16, 8, 32], "decoder_max_width": 32}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_toy_shards(tmp_path_factory.mktemp("scale") / "shards", n_train=44, n_val=1, size=32)


def _cfg(iters: int, **common) -> StepConfig:
    params = tiny_train_params(epochs=1, iters=iters, narrow=True, checkpoint_every=100, **common)
    return StepConfig.from_params(params, "segmentation")


def test_state_file_does_not_grow_with_iterations(shards, tmp_path):
    sizes = {}
    for iters in (2, 22):
        run_step("segmentation", _cfg(iters), shards, tmp_path / str(iters))
        sizes[iters] = (tmp_path / str(iters) / STATE_FILE).stat().st_size
        assert len(LossLog(tmp_path / str(iters) / LOSS_LOG_FILE).read()) == iters  # log_every 1: a row each
    # 20 more iterations used to add 20 rows of loss terms (~3 KB) to every state.pt
    assert abs(sizes[22] - sizes[2]) <= 128, sizes


def test_an_iteration_makes_no_host_sync_and_the_window_is_reduced_every_log_every(shards, tmp_path, monkeypatch):
    synced: list[str] = []
    inside = [False]

    def spy(name):
        real = getattr(torch.Tensor, name)

        def wrapped(self, *args, **kwargs):
            if inside[0]:
                synced.append(name)
            return real(self, *args, **kwargs)
        return wrapped

    for name in ("item", "tolist", "cpu", "__float__", "__bool__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    iteration = loop._Trainer._train_iteration

    def watched(self, batches):
        inside[0] = True
        try:
            return iteration(self, batches)
        finally:
            inside[0] = False

    flushes = []
    flush = LossWindow.flush
    monkeypatch.setattr(loop._Trainer, "_train_iteration", watched)
    monkeypatch.setattr(LossWindow, "flush", lambda self, *a: flushes.append(self.iterations) or flush(self, *a))
    run_step("segmentation", _cfg(8, log_every=3, ema_decay=0.9), shards, tmp_path / "out")  # the EMA's update too
    assert synced == []  # a GPU runs ahead: nothing in an iteration waits for its results
    assert flushes == [3, 3, 2]  # every log_every iterations, and at the epoch's end
    rows = LossLog(tmp_path / "out" / LOSS_LOG_FILE).read()
    assert [(r["iteration"], r["iterations"]) for r in rows] == [(3, 3), (6, 3), (8, 2)]
    history = json.loads((tmp_path / "out" / "history.json").read_text())["epochs"]
    mean = sum(r["loss"] * r["iterations"] for r in rows) / 8
    assert history[0]["train_loss"] == pytest.approx(mean, rel=1e-12)  # the windows' weighted mean


def test_loss_window_means_and_nan_guard():
    window, ctx = LossWindow(), DistContext()
    for i, value in enumerate((1.0, 2.0, 6.0), start=1):
        window.add({"loss": torch.tensor(value), "grad_norm": torch.tensor(value * 2)}, i)
    assert window.flush(ctx, "fusion", 3) == {"iterations": 3, "loss": 3.0, "grad_norm": 6.0}
    assert window.flush(ctx, "fusion", 3) is None  # emptied
    window.add({"loss": torch.tensor(1.0)}, 4)
    window.add({"loss": torch.tensor(float("inf"))}, 5)
    with pytest.raises(FloatingPointError, match=r"fusion step: loss not finite \(inf\) in iterations 4-5"):
        window.flush(ctx, "fusion", 5)


def test_loss_log_truncates_on_resume_and_downsamples(tmp_path):
    log = LossLog(tmp_path / LOSS_LOG_FILE)
    log.start(0)
    for it in range(1, 11):
        log.append({"iteration": it, "epoch": 1, "lr": 0.1, "iterations": 1, "loss": float(it)})
    with (tmp_path / LOSS_LOG_FILE).open("a") as f:
        f.write('{"iteration": 11, "lo')  # a kill mid-line
    assert [r["iteration"] for r in log.read()] == list(range(1, 11))
    log.start(7)  # resumed from the checkpoint of iteration 7
    assert [r["iteration"] for r in log.read()] == list(range(1, 8))
    thinned = downsample(log.read(), 3)
    assert [(r["iteration"], r["loss"], r["iterations"]) for r in thinned] == [(3, 2.0, 3), (6, 5.0, 3), (7, 7.0, 1)]


def test_cuda_rng_state_is_this_gpus_only(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.append(("get", device)) or torch.full((8,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", device, int(state[0]))))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every visible GPU's generator"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored every GPU's generator"))
    rng = capture_rng(torch.device("cuda", 3))
    assert calls == [("get", torch.device("cuda", 3))] and rng["cuda"].shape == (8,)
    restore_rng(rng, torch.device("cuda", 0))  # rank 0's state resumed on a node with one GPU
    assert calls[-1] == ("set", torch.device("cuda", 0), 7)
    # a state written before (one generator per GPU of an 8-GPU node) resumed on 2 GPUs: each its own
    old = {**rng, "cuda": [torch.full((8,), i, dtype=torch.uint8) for i in range(8)]}
    restore_rng(old, torch.device("cuda", 1))
    assert calls[-1] == ("set", torch.device("cuda", 1), 1)
    n = len(calls)
    assert "cuda" not in capture_rng(torch.device("cpu"))
    restore_rng(rng, torch.device("cpu"))
    assert len(calls) == n  # a CPU step touches no GPU generator


def test_training_settings_turn_on_cudnn_autotuning_on_cuda_only_and_give_everything_back():
    before = (torch.backends.cudnn.benchmark, torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    with training_settings(torch.device("cuda", 0), threads=None, deterministic=True):
        assert torch.backends.cudnn.benchmark  # fixed crop sizes: autotune each convolution once
        assert not torch.are_deterministic_algorithms_enabled()  # `deterministic` is for CPU steps
    with pytest.raises(RuntimeError):
        with training_settings(torch.device("cpu"), threads=1, deterministic=True):
            assert not torch.backends.cudnn.benchmark and torch.get_num_threads() == 1
            assert torch.are_deterministic_algorithms_enabled()
            raise RuntimeError("a failing step")
    assert (torch.backends.cudnn.benchmark, torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


@pytest.mark.parametrize("step, freeze_encoder_bn, broadcast", [
    ("segmentation", False, True), ("segmentation", True, True),  # the decoders' BatchNorms still train
    ("fusion", False, True),  # the fusion network's BatchNorms train
    ("joint", False, False),  # every BatchNorm frozen: nothing to broadcast
])
def test_ddp_broadcasts_buffers_only_where_batchnorm_statistics_change(step, freeze_encoder_bn, broadcast):
    model = LateFusionNet("densenet121", pretrained=False, **NARROW)
    set_train_mode(model, step, freeze_encoder_bn)
    options = ddp_options(step_module(model, step), torch.device("cuda", 2))
    assert options == {"device_ids": [2], SYNC_BUFFERS_ARG: broadcast, "gradient_as_bucket_view": True}
    assert ddp_options(step_module(model, step), torch.device("cpu"))["device_ids"] is None


def test_global_batch_by_accumulation():
    cfg = StepConfig(step="segmentation", batch_size=2, global_batch_size=16)  # the paper: 8 GPUs x 2
    assert [cfg.accumulation(n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert StepConfig(step="segmentation", batch_size=2).accumulation(8) == 1  # unset: batch_size x processes
    with pytest.raises(ValueError, match=r"global_batch_size 16 is not a multiple of batch_size 2 x 3 processes"):
        cfg.accumulation(3)
    with pytest.raises(ValueError, match=r"global_batch_size 6 is not a multiple of batch_size 4"):
        StepConfig(step="segmentation", batch_size=4, global_batch_size=6)


def test_paper_profile_trains_with_the_papers_global_batch():
    from fusionnet.io.params import load_params
    from tests.support.helpers import ROOT

    cfg = StepConfig.from_params(load_params(ROOT / "params-paper.yaml"), "segmentation")
    assert cfg.global_batch_size == 16 and cfg.accumulation(1) == 8 and cfg.accumulation(8) == 1


@pytest.mark.parametrize("visible, count", [
    ("0,1,2,3", 4), ("0,1,-1,2", 2), ("-1", 0), ("", 0), ("1,1", 1), ("0,x,2", 1),
    ("GPU-8f1c,GPU-22ab", 2), ("MIG-3a9e", 1), (" 2 , 3 ", 2),
])
def test_visible_gpus_reads_cuda_visible_devices_as_cuda_does(visible, count):
    assert len(visible_gpus(visible)) == count


def test_process_count_follows_the_training_device(monkeypatch):
    monkeypatch.delenv("FUSIONNET_NPROC_PER_NODE", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert processes_per_node(None, "cpu") == 1  # a CPU profile on an 8-GPU node: one process, every core
    assert processes_per_node(None, "cuda") == processes_per_node(None, "auto") == 8
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,-1,2")
    assert processes_per_node(None, "cuda") == 2  # CUDA stops at the invalid entry
    monkeypatch.setenv("FUSIONNET_NPROC_PER_NODE", "3")
    assert processes_per_node(None, "cpu") == 3 and processes_per_node(5, "cpu") == 5  # asked for: given
    params = tiny_train_params()
    assert train_device(params) == "cpu"
    params["train_common"]["device"] = "gpu"
    with pytest.raises(ValueError, match="train_common.device 'gpu'"):
        train_device(params)


@pytest.mark.cuda
def test_a_cuda_step_saves_its_own_generator_and_autotunes(shards, tmp_path):
    benchmark = torch.backends.cudnn.benchmark
    seen = []
    real = loop._Trainer._train_iteration
    loop_iteration = lambda self, batches: seen.append(torch.backends.cudnn.benchmark) or real(self, batches)  # noqa: E731
    try:
        loop._Trainer._train_iteration = loop_iteration
        cfg = _cfg(4, device="cuda", precision="bf16", global_batch_size=4)
        result = run_step("segmentation", cfg, shards, tmp_path / "cuda")
    finally:
        loop._Trainer._train_iteration = real
    assert seen == [True] * 4 and torch.backends.cudnn.benchmark == benchmark
    state = load_state(tmp_path / "cuda" / STATE_FILE)
    assert isinstance(state["rng"]["cuda"], torch.Tensor) and result.iterations == 4
