"""The Late Fusion network: structure, Eq. 2, gradients, parameter count, checkpoints, input checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusionnet import model as fm
from fusionnet.model import BACKBONES, LateFusionNet, backbones, count_parameters


@pytest.mark.parametrize("backbone", BACKBONES)
def test_output_structure_for_every_backbone(backbone):
    torch.manual_seed(0)
    net = LateFusionNet(backbone).eval()
    image = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        out = net(image)
    maps = [out.alpha, out.fg_prob, out.bg_prob, out.blend_weight, *out.fg_sides, *out.bg_sides]
    assert len(out.fg_sides) == len(out.bg_sides) == 4
    for m in maps:
        assert m.shape == (2, 1, 64, 96)
        assert m.dtype == torch.float32
        assert torch.isfinite(m).all()
        assert m.min() >= 0 and m.max() <= 1
    # the last side output of each decoder is the branch's prediction itself
    assert out.fg_sides[-1] is out.fg_prob and out.bg_sides[-1] is out.bg_prob


def test_encoder_taps_match_method_notes():
    enc = LateFusionNet("densenet201").encoder
    assert enc.out_channels == [64, 256, 512, 1792, 1920]
    assert [i["reduction"] for i in enc.feature_info] == [2, 4, 8, 16, 32]
    dec = LateFusionNet("densenet201").fg_decoder
    widths = [b.proj[0].out_channels for b in dec.up_blocks]
    assert widths == [1792, 512, 256, 128, 128]
    # 1x1 up-block convs have no bias; the fusion widths are 384 -> 256,128,128,64,256 -> 1
    assert all(b.proj[0].bias is None and b.proj[0].kernel_size == (1, 1) for b in dec.up_blocks)
    fusion = LateFusionNet("densenet201").fusion
    assert fusion.body[0][0].in_channels == 384
    assert [blk[0].out_channels for blk in fusion.body] == [256, 128, 128, 64, 256]
    assert all(blk[0].kernel_size == (3, 3) for blk in fusion.body)
    assert fusion.head.out_channels == 1


def test_eq2_blend_is_exact(tiny_model):
    with torch.no_grad():
        out = tiny_model(torch.rand(1, 3, 64, 64))
    expected = out.blend_weight * out.fg_prob + (1 - out.blend_weight) * (1 - out.bg_prob)
    assert torch.equal(out.alpha, expected)


def test_side_outputs_come_from_four_resolutions(tiny_model):
    # a coarse side output, upsampled bilinearly from 1/8, is smoother than the full-resolution one
    torch.manual_seed(1)
    with torch.no_grad():
        out = tiny_model(torch.rand(1, 3, 128, 128))
    logits = out.fg_side_logits

    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean().item()

    assert len({tuple(s.shape) for s in logits}) == 1
    assert roughness(logits[0]) < roughness(logits[-1])
    assert torch.allclose(out.fg_sides[0], torch.sigmoid(logits[0]))


def test_densenet201_parameter_count():
    n = count_parameters(LateFusionNet("densenet201"))
    assert n == pytest.approx(37.7e6, rel=0.005), n


def test_gradients_reach_every_parameter_group():
    from fusionnet.losses import joint_loss

    torch.manual_seed(0)
    net = LateFusionNet("densenet121").train()
    image = torch.rand(2, 3, 64, 64)
    alpha = torch.rand(2, 1, 64, 64)
    joint_loss(net(image), alpha).total.backward()
    for group, params in net.parameter_groups().items():
        missing = [p.shape for p in params if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing, f"{group}: {len(missing)} parameters without a finite gradient"
        assert sum(p.grad.abs().sum().item() for p in params) > 0, group
    all_params = {id(p) for ps in net.parameter_groups().values() for p in ps}
    assert all_params == {id(p) for p in net.parameters()}


@pytest.mark.parametrize("shape", [(1, 3, 100, 64), (1, 3, 64, 70)])
def test_bad_size_names_nearest_valid_size(tiny_model, shape):
    with pytest.raises(ValueError, match=r"not a multiple of 32; nearest valid sizes are (96 and 128|64 and 96)"):
        tiny_model(torch.rand(*shape))


def test_bad_channels(tiny_model):
    with pytest.raises(ValueError, match=r"\(N,3,H,W\)"):
        tiny_model(torch.rand(1, 4, 64, 64))


def test_unknown_backbone():
    with pytest.raises(ValueError, match="densenet201"):
        LateFusionNet("resnet50")


def test_pretrained_without_local_weights_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="local torch cache"):
        LateFusionNet("densenet121", pretrained=True)


def test_pretrained_loads_from_local_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
    target = backbones.torch_cache_file(weights)
    target.parent.mkdir(parents=True)
    torch.manual_seed(3)
    reference = torchvision.models.densenet121()
    torch.save(reference.state_dict(), target)  # the file torchvision would have downloaded
    net = LateFusionNet("densenet121", pretrained=True)
    assert torch.equal(net.encoder.stem[0].weight, reference.features.conv0.weight)
    assert torch.equal(net.encoder.norm5.running_var, reference.features.norm5.running_var)


def test_input_norms_differ():
    torch.manual_seed(0)
    a = LateFusionNet("densenet121", input_norm="imagenet").eval()
    b = LateFusionNet("densenet121", input_norm="authors").eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(a(x).alpha, b(x).alpha)
    with pytest.raises(ValueError, match="input_norm"):
        LateFusionNet("densenet121", input_norm="caffe")


def test_save_load_round_trip(tiny_model, tmp_path):
    path = fm.save(tiny_model, tmp_path / "m.safetensors")
    loaded = fm.load(path).eval()
    assert loaded.config == tiny_model.config
    for (k1, v1), (k2, v2) in zip(tiny_model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tiny_model(x).alpha, loaded(x).alpha)
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


def test_load_rejects_foreign_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        fm.load(tmp_path / "nope.safetensors")
    pickle_file = tmp_path / "pickled.pt"
    torch.save({"a": torch.zeros(1)}, pickle_file)
    with pytest.raises(ValueError, match="pickled.pt: not a fusionnet model file"):
        fm.load(pickle_file)
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(1)}, str(other), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="other.safetensors: not a fusionnet model file"):
        fm.load(other)
    wrong = tmp_path / "wrong.safetensors"
    save_file(
        {"a": torch.zeros(1)},
        str(wrong),
        metadata={"format": "fusionnet.late_fusion.v1", "config": json.dumps({"backbone": "densenet121"})},
    )
    with pytest.raises(ValueError, match="wrong.safetensors: weights do not match"):
        fm.load(wrong)


def test_checkpoint_is_not_pickle(tiny_model, tmp_path):
    path = fm.save(tiny_model, tmp_path / "m.safetensors")
    head = Path(path).read_bytes()[:16]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK"), "pickle/zip checkpoint"


def _up_widths(decoder) -> list[int]:
    return [block.proj[0].out_channels for block in decoder.up_blocks]


def test_decoder_max_width_caps_the_up_blocks_only():
    """Authors' widths: max(skip, fpn_width); the cap lowers the wide ones, never below fpn_width."""
    authors = LateFusionNet("densenet121", fpn_width=32)
    assert _up_widths(authors.fg_decoder) == [1024, 512, 256, 64, 32]
    assert "decoder_max_width" not in authors.config  # older model files load as the authors' widths
    capped = LateFusionNet("densenet121", fpn_width=32, decoder_max_width=128)
    assert _up_widths(capped.fg_decoder) == _up_widths(capped.bg_decoder) == [128, 128, 128, 64, 32]
    assert _up_widths(LateFusionNet("densenet121", fpn_width=32, decoder_max_width=16).fg_decoder) == [32] * 5
    assert count_parameters(capped) < count_parameters(authors) - 4_000_000
    assert capped(torch.rand(1, 3, 64, 64)).alpha.shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="decoder_max_width"):
        LateFusionNet("densenet121", decoder_max_width=0)


def test_decoder_max_width_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = LateFusionNet("densenet121", fpn_width=32, decoder_max_width=128).eval()
    loaded = fm.load(fm.save(model, tmp_path / "m.safetensors")).eval()
    assert loaded.config["decoder_max_width"] == 128
    assert _up_widths(loaded.fg_decoder) == [128, 128, 128, 64, 32]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x).alpha, loaded(x).alpha)


def test_the_same_weights_give_the_same_file_bytes(tiny_model, tmp_path):
    """A model file's bytes depend only on weights, config and extras (DVC md5s compare across runs and
    machines); safetensors alone writes the metadata in a per-map random order."""
    import subprocess
    import sys

    extra = {"step": "joint", "iterations": 7, "kept_iteration": 5, "data_version": "abc"}
    paths = [fm.save(tiny_model, tmp_path / f"m{i}.safetensors", extra=extra) for i in range(3)]
    script = ("import sys, torch; from fusionnet import model as m; net = m.load(sys.argv[1]);"
              "m.save(net, sys.argv[2], extra=dict(a.split('=', 1) for a in sys.argv[3:]))")
    subprocess.run([sys.executable, "-c", script, str(paths[0]), str(tmp_path / "other-process.safetensors"),
                    *(f"{k}={v}" for k, v in extra.items())], check=True, timeout=120)
    contents = {p.read_bytes() for p in [*paths, tmp_path / "other-process.safetensors"]}
    assert len(contents) == 1
    assert fm.load(paths[0]).config == tiny_model.config
