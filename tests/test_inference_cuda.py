"""CUDA readiness of inference, checked on the CPU (a forced device resolver, recorders, spies); the tests
that need a real GPU are marked `cuda` (skipped where torch sees none).

1. compile: padded input sizes fall into a bounded set of buckets (no eager fallback after 8 sizes);
2. one device->host copy per batch of images (`fusionnet.inference.matter._to_host`);
3. a checkpoint loads straight onto its device (no CPU copy first);
4. the registered model's device is "auto" (old "cpu" models stay on CPU);
5. fp32 references run in true float32 (`fusionnet.hardware.exact_fp32`: TF32 off).
"""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from fusionnet.hardware import exact_fp32
from fusionnet.inference.matter import Matter
from fusionnet.inference.network import COMPILE_RUNGS, PreparedNetwork
from fusionnet.model import LateFusionNet, save
from tests.support.helpers import tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")

BUCKET_SIDE = 256  # rungs of 64 px: coarser than the stride (32), so buckets and stride padding differ


@pytest.fixture(scope="module")
def narrow():
    """A narrow random densenet121 LateFusionNet (fast at 64..256 px), eval mode. Shared: do not modify."""
    return tiny_net(seed=0, narrow=True)


@pytest.fixture(scope="module")
def narrow_checkpoint(narrow, tmp_path_factory):
    """`narrow` saved with serving settings fp32 / max_side 64 (no precision probe when opened)."""
    return save(narrow, tmp_path_factory.mktemp("narrow") / "narrow.safetensors",
                serving={"precision": "fp32", "max_side": 64, "refine": False})


class _Stop(Exception):
    """Raised by a spy once it has seen what the test needs, before any real CUDA call."""


@pytest.fixture
def forced_cuda(monkeypatch):
    """torch.cuda.is_available() -> True, so resolve_device("auto") gives cuda on this CPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def loads(monkeypatch):
    """The map_locations the checkpoint loader is asked for (fusionnet.inference.loading.load); it stops there."""
    asked = []

    def spy(path, map_location="cpu"):
        asked.append(torch.device(map_location))
        raise _Stop

    monkeypatch.setattr("fusionnet.inference.loading.load", spy)
    return asked


# ----------------------------------------------------------------------------- 1. compile buckets


def _padded_shapes(network: PreparedNetwork, sizes) -> set[tuple[int, int]]:
    return {network.padded_size(h, w) for h, w in sizes}


def test_compile_buckets_bound_the_padded_sizes(narrow):
    """Every size up to bucket_side: at most RUNGS**2 = 16 shapes; with the longer side at bucket_side
    (a photo larger than max_side): at most 2 * RUNGS - 1 = 7. Without compile: stride padding only."""
    compiled = PreparedNetwork(narrow, device="cpu", compile=True, bucket_side=BUCKET_SIDE)
    plain = PreparedNetwork(narrow, device="cpu")
    sides = range(1, BUCKET_SIDE + 1)
    every = _padded_shapes(compiled, [(h, w) for h in sides for w in sides])
    photos = _padded_shapes(compiled, [(s, BUCKET_SIDE) for s in sides] + [(BUCKET_SIDE, s) for s in sides])
    assert len(every) <= COMPILE_RUNGS**2 and len(photos) <= 2 * COMPILE_RUNGS - 1
    assert all(ph >= 1 and ph % 32 == 0 and pw % 32 == 0 for ph, pw in every)
    assert all(compiled.padded_size(h, w) >= (h, w) for h in (1, 31, 33, 200, 256) for w in (1, 64, 255))
    assert plain.padded_size(200, 33) == (224, 64)  # uncompiled: the next stride multiple, as before


class _Maps(NamedTuple):
    alpha: Tensor
    fg_prob: Tensor
    bg_prob: Tensor


class _ConvNet(nn.Module):
    """A stand-in for LateFusionNet that dynamo traces in a fraction of a second; one 3x3 conv, so the
    cropped output does not depend on how far the input was reflect-padded."""

    stride = 32

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: Tensor) -> _Maps:
        y = torch.sigmoid(self.conv(x))
        return _Maps(y[:, :1], y[:, 1:2], y[:, 2:])


SIZES = [(h, w) for h in (7, 40, 70, 101, 130, 170, 199, 230, 256) for w in (20, 120, 250)]  # 27 sizes, 27 stride shapes


def test_compiled_network_compiles_one_graph_per_bucket_and_never_falls_back(monkeypatch):
    """Real torch._dynamo (a counting backend instead of inductor): 27 input sizes compile one graph per
    bucket, each reused, all under the recompile limit; outputs cropped back and equal to eager."""
    import torch._dynamo
    import torch._dynamo.config as dynamo_config

    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    previous_limit = getattr(dynamo_config, limit)  # PreparedNetwork raises it: restored below
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, dynamic=None, options=None, **_: real_compile(
        model, backend=counting_backend, dynamic=dynamic))
    torch._dynamo.reset()
    try:
        net = _ConvNet().eval()
        compiled = PreparedNetwork(net, device="cpu", compile=True, bucket_side=BUCKET_SIDE)
        eager = PreparedNetwork(net, device="cpu")
        inner, seen = compiled._network, set()
        compiled._network = lambda x: (seen.add(tuple(x.shape)), inner(x))[1]
        g = torch.Generator().manual_seed(0)
        for h, w in SIZES:
            x = torch.rand(1, 3, h, w, generator=g)
            out = compiled.run_network(x)
            assert out.shape == (1, 3, h, w)
            torch.testing.assert_close(out, eager.run_network(x), rtol=0, atol=1e-6)
        # as many graphs as padded shapes (none left to eager), and the shapes bounded
        assert len(graphs) == len(seen) <= COMPILE_RUNGS**2, (len(graphs), sorted(seen))
    finally:
        setattr(dynamo_config, limit, previous_limit)
        torch._dynamo.reset()


def test_bucketed_outputs_are_cropped_and_match_the_uncompiled_network(narrow):
    """The real network behind a recorder in place of the compiled callable: it sees only bucket shapes,
    and the cropped maps match stride padding up to the padding's reach (mean |d| < 0.01)."""
    compiled = PreparedNetwork(narrow, device="cpu", compile=True, bucket_side=BUCKET_SIDE)
    plain = PreparedNetwork(narrow, device="cpu")
    seen = []
    compiled._network = lambda x: (seen.append(tuple(x.shape[-2:])), compiled.model(x))[1]
    g = torch.Generator().manual_seed(1)
    for h, w in [(1, 1), (200, 90), (97, 161), (256, 33)]:
        x = torch.rand(1, 3, h, w, generator=g)
        out, reference = compiled.run_network(x), plain.run_network(x)
        assert out.shape == reference.shape == (1, 3, h, w)
        assert (out - reference).abs().mean() < 0.01
    assert seen == [(64, 64), (256, 128), (128, 192), (256, 64)]


# ----------------------------------------------------------------------------- 2. one device->host copy


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a device tensor to the host (.cpu, .item, .tolist) made under it
    (.numpy needs a host tensor already; .to(cpu) is not told apart from uploads on a CPU machine)."""

    NAMES = ("cpu", "item", "tolist")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_host_copy_per_batch(narrow, monkeypatch):
    import fusionnet.inference.matter as matter_module

    calls = []
    real = matter_module._to_host
    monkeypatch.setattr(matter_module, "_to_host", lambda maps: (calls.append(tuple(maps.shape)), real(maps))[1])
    matter = Matter(narrow, device="cpu", precision="fp32", max_side=64, refine=True, radius=2)
    rng = np.random.default_rng(0)
    images = [rng.random((40, 50, 3), dtype=np.float32) for _ in range(3)]
    reads = _HostReads()
    with reads:
        results = [matter(image) for image in images]
    assert calls == [(1, 3, 40, 50)] * 3 and reads.count == 3  # alpha, fg_prob and bg_prob in one copy
    assert all(r.alpha.shape == r.fg_prob.shape == r.bg_prob.shape == (40, 50) for r in results)
    calls.clear()
    with _HostReads() as reads:
        matter.matte_batch(images)
    assert calls == [(3, 3, 40, 50)] and reads.count == 1


@pytest.mark.cuda
def test_one_device_to_host_memcpy_per_image_on_cuda():
    """The profiler's DtoH memcpys while matting 3 images on the GPU: exactly 3."""
    from torch.profiler import ProfilerActivity, profile

    # a fresh model: an fp32 Matter moves its model in place, and `narrow` is shared
    matter = Matter(tiny_net(seed=0, narrow=True), device="cuda", precision="fp32", max_side=64, refine=True, radius=2)
    rng = np.random.default_rng(0)
    images = [rng.random((40, 50, 3), dtype=np.float32) for _ in range(3)]
    matter(images[0])  # warm-up: cuDNN handles, kernels
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for image in images:
            matter(image)
    copies = sum(e.count for e in prof.key_averages() if "Memcpy DtoH" in e.key)
    assert copies == len(images), [(e.key, e.count) for e in prof.key_averages() if "Memcpy" in e.key]


# ----------------------------------------------------------------------------- 3. load straight onto the device


def test_open_model_loads_the_checkpoint_onto_its_device(narrow_checkpoint, forced_cuda, loads):
    from fusionnet.inference.opening import open_model

    for device in ("auto", "cuda"):
        with pytest.raises(_Stop):
            open_model(narrow_checkpoint, device=device)
    with pytest.raises(_Stop):
        open_model(narrow_checkpoint, device="auto", precision="int8")  # int8 runs on CPU only
    assert [d.type for d in loads] == ["cuda", "cuda", "cpu"]


def test_checkpoint_builds_the_module_on_the_target_device(narrow_checkpoint, monkeypatch):
    """"meta" stands in for a GPU: the module is created there and the weights read there; a CPU module
    filled from device tensors (the old GPU -> CPU -> GPU round trip) cannot copy from meta and fails."""
    from fusionnet.model import checkpoint

    asked = []
    real_load_file = checkpoint.load_file

    def load_file(path, device="cpu"):
        asked.append(device)
        return {k: v.to("meta") for k, v in real_load_file(path, device="cpu").items()}

    monkeypatch.setattr(checkpoint, "load_file", load_file)
    model = checkpoint.load(narrow_checkpoint, map_location=torch.device("meta"))
    assert asked == ["meta"]
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_a_checkpoint_on_cpu_loads_as_before(narrow, narrow_checkpoint):
    from fusionnet.model import checkpoint

    model = checkpoint.load(narrow_checkpoint)
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    for (name, a), b in zip(narrow.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- 4. the registered model's device


def _pyfunc_context(tmp_path, weights, settings: dict):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(settings))
    return SimpleNamespace(artifacts={"weights": str(weights), "settings": str(path)})


def test_registration_writes_device_auto():
    from pipeline.registry.registration import RegisterConfig, registered_settings

    settings = registered_settings(RegisterConfig(), {"guided_filter": {"radius": 2, "eps": 1e-3}})
    assert settings["device"] == "auto" and (settings["radius"], settings["eps"]) == (2, 1e-3)


def test_the_pyfunc_takes_the_gpu_when_there_is_one(tmp_path, narrow_checkpoint, forced_cuda, loads):
    from pipeline.registry.pyfunc_model import LateFusionMattingModel

    for settings in ({"device": "auto"}, {}):  # a settings.json without a device: auto too
        with pytest.raises(_Stop):
            LateFusionMattingModel().load_context(_pyfunc_context(tmp_path, narrow_checkpoint, settings))
    assert [d.type for d in loads] == ["cuda", "cuda"]


def test_an_older_cpu_model_stays_on_cpu_where_cuda_is_available(tmp_path, narrow_checkpoint, forced_cuda,
                                                                 monkeypatch):
    from fusionnet.inference import loading
    from pipeline.registry.pyfunc_model import LateFusionMattingModel, images_frame

    asked, real = [], loading.load
    monkeypatch.setattr(loading, "load", lambda path, map_location: (asked.append(map_location), real(path, map_location))[1])
    model = LateFusionMattingModel()
    model.load_context(_pyfunc_context(tmp_path, narrow_checkpoint, {"device": "cpu"}))
    assert [torch.device(d).type for d in asked] == ["cpu"] and model.device.type == "cpu"
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out = model.predict(None, images_frame([image]), params={"max_side": 48})  # a second Matter, on cpu too
    assert (out.loc[0, "height"], out.loc[0, "width"]) == (30, 40)
    assert all(m.device.type == "cpu" for m in model._matters.values())


def test_cli_and_server_default_to_auto():
    from fusionnet.cli.main import build_parser

    assert build_parser().parse_args(["matte", "x.png", "--model", "m"]).device == "auto"
    assert build_parser().parse_args(["serve", "m"]).device == "auto"


# ----------------------------------------------------------------------------- 5. true fp32 references


@pytest.fixture
def tf32_on():
    """Both TF32 flags True (as cuDNN's is by default), restored after the test."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture
def flags_in_forward(monkeypatch):
    """(matmul, cudnn) TF32 flags seen by each LateFusionNet forward."""
    seen = []
    real = LateFusionNet.forward

    def forward(self, *args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LateFusionNet, "forward", forward)
    return seen


def test_fp32_forward_runs_without_tf32_and_restores_the_flags(narrow, tf32_on, flags_in_forward):
    x = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    PreparedNetwork(narrow, device="cpu", precision="fp32").run_network(x)
    PreparedNetwork(narrow, device="cpu", precision="fp32-cl").run_network(x)  # a fast path: left as set
    assert flags_in_forward == [(False, False), (True, True)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)


def test_the_evaluation_forward_runs_without_tf32(narrow_checkpoint, tf32_on, flags_in_forward):
    from fusionnet.evaluation.config import EvalConfig
    from fusionnet.evaluation.run import make_predictor

    predict = make_predictor(narrow_checkpoint, EvalConfig(precision="fp32-cl", device="cpu", max_side=64))
    maps = predict(np.random.default_rng(0).random((30, 40, 3), dtype=np.float32))
    assert maps["alpha"].shape == (30, 40)
    assert flags_in_forward == [(False, False)]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)


def test_exact_fp32_blocks_in_two_threads_restore_only_when_both_close(tf32_on):
    entered, release, seen = threading.Event(), threading.Event(), []

    def other():
        with exact_fp32():
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    with exact_fp32():
        thread.start()
        entered.wait(10)
    seen.append(torch.backends.cudnn.allow_tf32)  # the other thread's block is still open
    release.set()
    thread.join(10)
    seen.append(torch.backends.cudnn.allow_tf32)
    assert seen == [False, True] and torch.backends.cuda.matmul.allow_tf32


@pytest.mark.cuda
def test_fp32_on_cuda_matches_the_cpu(narrow):
    """With TF32 on (cuDNN's default), the fp32 reference on the GPU still matches the CPU closely."""
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cpu = PreparedNetwork(narrow, device="cpu", precision="fp32").run_network(x)
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        gpu = PreparedNetwork(tiny_net(seed=0, narrow=True), device="cuda", precision="fp32").run_network(x).cpu()
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)
