"""fusionnet.inference: any image size in, maps at that size out; padding, resizing and refinement exact."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from fusionnet.hardware import resolve_device
from fusionnet.inference.loading import MODEL_RESOLVER_GROUP, load_model, resolve_model_path
from fusionnet.inference.matter import Matter, matte, matte_files
from fusionnet.inference.network import fold_batchnorms
from fusionnet.model.geometry import pad_to_multiple, reflect_indices, resize_maps
from fusionnet.refine import guided_filter


# one thread: several test processes share 2 cores (oversubscribed OpenMP: a tiny forward ~10x slower)
pytestmark = pytest.mark.usefixtures("one_thread")


def disc_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H,W,3) float32 in [0,1]: a bright textured disc on a dark gradient, so the maps have structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    inside = ((yy - height / 2) ** 2 + (xx - width / 2) ** 2) < (min(height, width) / 3) ** 2
    image = np.where(inside[..., None], [0.9, 0.7, 0.2], [0.1, 0.2, 0.4])
    image = image + 0.05 * rng.standard_normal((height, width, 3))
    image[..., 2] += 0.2 * xx / width
    return np.clip(image, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize(("size", "total"), [(1, 32), (2, 32), (3, 7), (5, 32), (31, 32), (32, 32), (45, 64)])
def test_reflect_indices_match_numpy_reflect(size, total):
    expected = np.pad(np.arange(size), (0, total - size), mode="reflect")
    np.testing.assert_array_equal(reflect_indices(size, total).numpy(), expected)


def test_pad_to_multiple_matches_torch_reflect_and_keeps_top_left():
    x = torch.rand(2, 3, 45, 70)
    padded = pad_to_multiple(x, 32)
    assert padded.shape == (2, 3, 64, 96)
    torch.testing.assert_close(padded, nnf.pad(x, (0, 26, 0, 19), mode="reflect"), rtol=0, atol=0)
    assert pad_to_multiple(padded, 32) is padded  # already a multiple: untouched


def test_pad_one_pixel_repeats_it():
    x = torch.tensor([0.25, 0.5, 0.75]).view(1, 3, 1, 1)
    padded = pad_to_multiple(x, 32)
    assert padded.shape == (1, 3, 32, 32)
    torch.testing.assert_close(padded, x.expand(1, 3, 32, 32))


# --------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size", [(1, 1), (1, 40), (37, 53), (33, 97), (64, 64)])
def test_output_maps_have_the_input_size(tiny_model, size):
    result = Matter(tiny_model, device="cpu", refine=False)(disc_image(*size))
    for name in ("alpha", "raw_alpha", "fg_prob", "bg_prob"):
        value = getattr(result, name)
        assert value.shape == size and value.dtype == np.float32, name
        assert np.isfinite(value).all() and value.min() >= 0 and value.max() <= 1, name
    assert result.network_size == size


def test_prepadded_image_gives_identical_alpha(tiny_model):
    """Padding is reflection at bottom/right and the crop takes the top-left: pre-padding by hand
    with numpy's reflect and cropping the result must reproduce the matte exactly."""
    image = disc_image(45, 70)
    matter = Matter(tiny_model, device="cpu", refine=False)
    direct = matter(image)
    prepadded = np.pad(image, ((0, 19), (0, 26), (0, 0)), mode="reflect")
    via_padded = matter(prepadded)
    np.testing.assert_array_equal(via_padded.raw_alpha[:45, :70], direct.raw_alpha)
    np.testing.assert_array_equal(via_padded.fg_prob[:45, :70], direct.fg_prob)
    # The check is sensitive: zero padding instead of reflection changes the matte near the border.
    zero_padded = matter(np.pad(image, ((0, 19), (0, 26), (0, 0))))
    assert np.abs(zero_padded.raw_alpha[:45, :70] - direct.raw_alpha).max() > 1e-4


def test_max_side_resizes_for_the_network_and_back(tiny_model):
    image = disc_image(100, 60)
    matter = Matter(tiny_model, device="cpu", refine=False, max_side=50)
    result = matter(image)
    assert result.network_size == (50, 30) and result.alpha.shape == (100, 60)
    # Reference: downscale (antialiased bilinear), matte at 50x30, upscale (bilinear) by hand.
    small = resize_maps(torch.from_numpy(image).permute(2, 0, 1)[None], (50, 30)).clamp(0, 1)
    maps = matter.run_network(small)
    expected = resize_maps(maps, (100, 60)).clamp(0, 1)[0]
    np.testing.assert_allclose(result.raw_alpha, expected[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(result.bg_prob, expected[2].numpy(), atol=1e-6)
    unresized = Matter(tiny_model, device="cpu", refine=False, max_side=100)(image)
    assert unresized.network_size == (100, 60)
    assert np.abs(unresized.raw_alpha - result.raw_alpha).max() > 1e-4


def test_uint8_input_equals_float_input(tiny_model):
    image_u8 = (disc_image(40, 40) * 255).round().astype(np.uint8)
    matter = Matter(tiny_model, device="cpu", refine=False)
    np.testing.assert_array_equal(matter(image_u8).alpha, matter(image_u8.astype(np.float32) / 255).alpha)


# --------------------------------------------------------------------------------------------- refinement


def test_refinement_is_the_guided_filter_of_the_raw_alpha(tiny_model):
    image = disc_image(64, 80)
    refined = Matter(tiny_model, device="cpu", refine=True, radius=3, eps=1e-3)(image)
    plain = Matter(tiny_model, device="cpu", refine=False)(image)
    np.testing.assert_array_equal(plain.alpha, plain.raw_alpha)
    np.testing.assert_array_equal(refined.raw_alpha, plain.raw_alpha)
    np.testing.assert_allclose(refined.alpha, guided_filter(image, plain.raw_alpha, 3, 1e-3), atol=1e-6)
    assert np.abs(refined.alpha - plain.alpha).max() > 1e-3  # refinement on/off changes the output


# --------------------------------------------------------------------------------------------- precision


def test_bf16_fast_path_runs_close_to_fp32_and_leaves_model_alone(tiny_model):
    image = disc_image(70, 90)
    reference = Matter(tiny_model, device="cpu", precision="fp32", refine=False)(image)
    fast = matte(tiny_model, image, fast=True, device="cpu", refine=False)
    assert fast.alpha.shape == (70, 90) and fast.alpha.dtype == np.float32 and np.isfinite(fast.alpha).all()
    assert np.abs(fast.alpha - reference.alpha).mean() < 0.01
    assert not np.array_equal(fast.alpha, reference.alpha)  # really ran in bfloat16
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())  # caller's model untouched
    assert next(tiny_model.parameters()).is_contiguous()


def test_fold_batchnorms_is_exact(tiny_model):
    folded = copy.deepcopy(tiny_model)
    # Non-trivial statistics, so a wrong fold (e.g. scale without shift) would show.
    generator = torch.Generator().manual_seed(0)
    for a, b in zip(tiny_model.modules(), folded.modules()):
        if isinstance(a, torch.nn.BatchNorm2d):
            for tensor, low, high in ((b.running_mean, -0.3, 0.3), (b.running_var, 0.5, 2.0),
                                      (b.weight, 0.5, 1.5), (b.bias, -0.3, 0.3)):
                tensor.data.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    reference = copy.deepcopy(folded)
    batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    count = fold_batchnorms(folded)
    assert count > 50 and sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == batchnorms - count
    x = torch.rand(1, 3, 64, 96, generator=generator)
    with torch.no_grad():
        expected, actual = reference(x), folded(x)
    torch.testing.assert_close(actual.alpha, expected.alpha, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual.bg_prob, expected.bg_prob, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorms(copy.deepcopy(tiny_model).train())


def test_bad_precision_and_device(tiny_model):
    with pytest.raises(ValueError, match="unknown precision"):
        Matter(tiny_model, device="cpu", precision="int4")  # int8 is the ONNX Runtime path (needs calibration)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Matter(tiny_model, device="cpu", precision="fp16")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")


def test_bad_image_arrays(tiny_model):
    matter = Matter(tiny_model, device="cpu", refine=False)
    with pytest.raises(ValueError, match=r"\(H,W,3\)"):
        matter(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"\(H,W,3\)"):
        matter(np.zeros((0, 8, 3), np.float32))


# --------------------------------------------------------------------------------------------- files


def test_matte_files_goes_on_after_a_failure(tiny_model, tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray((disc_image(30, 40) * 255).astype(np.uint8)).save(good)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    matter = Matter(tiny_model, device="cpu", refine=False)
    items = list(matte_files(matter, [tmp_path / "bad.png", tmp_path / "missing.png", good]))
    assert [item.path.name for item in items] == ["bad.png", "missing.png", "good.png"]
    assert "not an image file" in items[0].error and items[0].result is None
    assert items[1].error == "no such file"
    assert items[2].error is None and items[2].result.alpha.shape == (30, 40)


def test_load_model_round_trip(tiny_checkpoint, tiny_model):
    loaded = load_model(tiny_checkpoint)
    assert not loaded.training
    for (name, a), b in zip(tiny_model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_resolve_model_path_plain_and_missing(tiny_checkpoint, tmp_path):
    assert resolve_model_path(str(tiny_checkpoint)) == tiny_checkpoint
    with pytest.raises(FileNotFoundError, match="no such model file"):
        resolve_model_path(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError):
        resolve_model_path(tmp_path)


def test_resolve_model_uri_without_plugin():
    with pytest.raises(LookupError, match=r"no resolver for 'nosuchscheme:'.*fusionnet.model_resolvers"):
        resolve_model_path("nosuchscheme:/registry/model@champion")


def test_resolve_model_uri_through_entry_point_plugin(tiny_checkpoint, tmp_path, monkeypatch):
    """A real (installed-on-sys.path) distribution registers a resolver for a URI scheme."""
    plugin_dir = tmp_path / "site"
    dist = plugin_dir / "fusionnet_test_resolver-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fusionnet-test-resolver\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{MODEL_RESOLVER_GROUP}]\ntestreg = fusionnet_test_resolver:resolve\n")
    (plugin_dir / "fusionnet_test_resolver.py").write_text(
        f"def resolve(spec):\n    assert spec.startswith('testreg:/')\n    return {str(tiny_checkpoint)!r}\n"
    )
    monkeypatch.syspath_prepend(str(plugin_dir))
    assert resolve_model_path("testreg:/matting@champion") == tiny_checkpoint
