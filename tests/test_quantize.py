"""int8 post-training quantisation (fusionnet.inference.int8) and Matter(precision="int8")."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fusionnet.inference import int8 as quantize
from fusionnet.inference.calibration import calibration_images
from fusionnet.inference.matter import Matter
from tests.support.helpers import ALPHAMATTING, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def narrow():
    return tiny_net(seed=0, narrow=True)


def _images(count: int, side: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = []
    for i in range(count):  # a soft disc on a gradient: something like a matting input, not white noise
        disc = (((yy - 0.5) ** 2 + (xx - 0.4 - 0.05 * i) ** 2) < 0.08)[..., None]
        rgb = np.where(disc, [0.9, 0.6, 0.3], [0.1, 0.3, 0.6]) + 0.1 * rng.standard_normal((side, side, 3))
        out.append((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    return out


@torch.inference_mode()
def test_float_body_matches_the_model(narrow):
    """MattingBody runs the model's own Decoder.finest and FusionNet.features (FX-traceable): same alpha."""
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    ref = narrow(x)
    out = quantize.QuantizedNet(quantize.MattingBody(narrow), narrow.input_mean, narrow.input_scale)(x)
    for name in ("alpha", "fg_prob", "bg_prob"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=1e-6)


def _float_modules(network: nn.Module) -> set[str]:
    return {name for name, m in network.body.named_modules() if type(m) is nn.Conv2d}


@pytest.fixture(scope="module")
def calibrated(narrow, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("FUSIONNET_CACHE")
    os.environ["FUSIONNET_CACHE"] = str(cache)
    torch.set_num_threads(1)
    network, info = quantize.quantize(narrow, _images(5), held_out=2, max_side=64)
    yield network, info, cache
    if old is None:
        os.environ.pop("FUSIONNET_CACHE", None)
    else:
        os.environ["FUSIONNET_CACHE"] = old


@pytest.mark.slow  # ~25 s each on a loaded 2-core host: FX prepare + convert
@torch.inference_mode()
def test_quantize_keeps_heads_float_and_measures_its_error(narrow, calibrated):
    network, info, cache = calibrated
    # the encoder is quantised; the decoders and the fusion network (heads included) stay float32
    floats = _float_modules(network)
    assert floats and all(name.startswith(("fg_decoder.", "bg_decoder.", "fusion.")) for name in floats)
    assert {"fg_decoder.heads.3", "bg_decoder.heads.3", "fusion.head"} <= floats
    quantized = [name for name, m in network.body.named_modules() if "quantized" in type(m).__module__]
    assert len(quantized) > 100 and all(name.startswith("encoder.") for name in quantized)
    # info's accuracy figure is the mean |alpha int8 - fp32| on the two held-out images
    held_out = [quantize._as_batch(image, 64) for image in _images(5)[-2:]]
    reference = quantize.QuantizedNet(quantize.MattingBody(narrow), narrow.input_mean, narrow.input_scale)
    expected = np.mean([(network(x).alpha - reference(x).alpha).abs().mean().item() for x in held_out])
    assert info["mean_abs_diff"] == pytest.approx(expected, rel=1e-6)
    assert 0 < info["mean_abs_diff"] < 0.5 and info["calibration_images"] == 3
    assert quantize.calibration_path(narrow).parent == cache / "int8"


@pytest.mark.slow  # ~25 s each on a loaded 2-core host: FX prepare + convert
@torch.inference_mode()
def test_cached_calibration_rebuilds_the_same_network(narrow, calibrated):
    network, info, _ = calibrated
    loaded, loaded_info = quantize.load_calibration(narrow)
    assert loaded_info["mean_abs_diff"] == info["mean_abs_diff"]
    x = quantize._as_batch(_images(1)[0], 64)
    torch.testing.assert_close(loaded(x).alpha, network(x).alpha, rtol=0, atol=0)
    # another model (other weights) has no calibration
    assert quantize.load_calibration(tiny_net(seed=1, narrow=True)) is None


@pytest.mark.slow  # ~25 s each on a loaded 2-core host: FX prepare + convert
@torch.inference_mode()
def test_matter_int8_uses_the_cached_calibration(narrow, calibrated):
    matter = Matter(narrow, device="cpu", precision="int8", refine=False)
    assert matter.precision == "int8" and matter.int8_info["mean_abs_diff"] == calibrated[1]["mean_abs_diff"]
    result = matter(_images(1, side=70)[0])  # not a multiple of 32: padded and cropped as for fp32
    assert result.alpha.shape == (70, 70) and 0 <= result.alpha.min() and result.alpha.max() <= 1
    reference = Matter(narrow, device="cpu", precision="fp32", refine=False)(_images(1, side=70)[0])
    assert np.abs(result.alpha - reference.alpha).mean() < 0.1


def test_matter_int8_without_calibration_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONNET_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="python -m fusionnet.inference.int8"):
        Matter(tiny_net(seed=2, narrow=True), device="cpu", precision="int8")
    with pytest.raises(ValueError, match="int8 runs on CPU"):
        Matter(tiny_net(seed=2, narrow=True), device="cpu", precision="int8", compile=True)


TRAINED = os.environ.get("FUSIONNET_TRAINED_MODEL")


@pytest.mark.slow
@pytest.mark.skipif(not TRAINED, reason="set FUSIONNET_TRAINED_MODEL to a trained checkpoint to check the int8 bound")
@torch.inference_mode()
def test_int8_accuracy_bound_on_real_photos(tmp_path, monkeypatch):
    """On real photos, int8 of a trained model is either within the bound or kept out of `precision: auto`.

    (Measured with the CPU-profile model of `make run`: 0.018 > 0.005, and its held-out check, 0.007,
    also fails, so auto does not offer it. A check that passed while the photos fail is the bug caught.)
    """
    from fusionnet.inference.precision import inference_candidates
    from fusionnet.io.images import load_image
    from fusionnet.inference.loading import load_model

    if not ALPHAMATTING.is_dir():
        pytest.skip(f"real photos not found at {ALPHAMATTING} (../shared/data is absent on this machine)")
    monkeypatch.setenv("FUSIONNET_CACHE", str(tmp_path))
    torch.set_num_threads(2)
    model = load_model(TRAINED)
    shards = Path(TRAINED).resolve().parents[2] / "data" / "shards" / "train"
    images = calibration_images([shards if shards.is_dir() else ALPHAMATTING / "image"], count=18)
    int8 = Matter(model, device="cpu", precision="int8", refine=False, max_side=320, calibration=images)
    fp32 = Matter(model, device="cpu", precision="fp32", refine=False, max_side=320)
    diffs = []
    for path in sorted((ALPHAMATTING / "image").glob("GT0[1-4].png")):
        rgb = load_image(path).rgb
        diffs.append(np.abs(int8(rgb).alpha - fp32(rgb).alpha).mean())
    offered = "int8" in inference_candidates(model, {"avx512_vnni"})[0]
    assert offered == (int8.int8_info["mean_abs_diff"] <= quantize.INT8_MEAN_DIFF_BOUND)
    if np.mean(diffs) > quantize.INT8_MEAN_DIFF_BOUND:
        assert not offered, f"int8 offered by auto with mean |d alpha| {np.mean(diffs):.4f} on real photos"
