"""int8 inference on CPU: post-training static quantisation of LateFusionNet (torch.ao FX graph mode).

What is quantised: the DenseNet encoder (activations uint8 per tensor, weights int8 per output
channel; the "x86" qconfig, which runs oneDNN/fbgemm VNNI kernels). What stays float32, and why:
- both decoders and the fusion network: measured on the trained CPU-profile model (held-out training
  composites), quantising them too gave mean |alpha int8 - fp32| 0.074 (0.11 on real photos), the
  encoder alone 0.004 (bound 0.005); the fusion network alone made no difference, the decoders'
  full-resolution FPN did;
- the 1x1 side-output heads and the fusion head in any case: their outputs are logits that a sigmoid
  maps to alpha, fg_prob and bg_prob (the reason model.fp32_conv keeps them float32 under autocast);
- the sigmoids and the Eq. 2 blend: elementwise, cheap, and the result is what is scored.
The input normalisation also runs in float before the first quantise.

Calibration: activation ranges (histogram observers) from a few images the network was trained on,
training composites from the shards (`fusionnet.data.shards`) or any image folder. The observers'
statistics and the measured accuracy (mean |alpha int8 - alpha fp32| on held-out calibration images)
are cached per model weights in $FUSIONNET_CACHE/int8/ (default ~/.cache/fusionnet), so
`Matter(precision="int8")` and `precision: auto` find them. Make one with

    python -m fusionnet.inference.int8 MODEL --shards data/shards/train      # or --images DIR

FX mode was measured against the alternatives in `benchmarks/bench_inference.py`: PT2E +
X86InductorQuantizer lives in torchao (not a dependency here); ONNX Runtime's int8 is
`fusionnet export --format onnx --int8` (fusionnet/onnx/runtime.py).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from fusionnet.inference.calibration import calibration_images
from fusionnet.inference.loading import load_model
from fusionnet.io.atomic import write_atomic
from fusionnet.io.images import fit_within
from fusionnet.model import LateFusionNet, blend
from fusionnet.model.geometry import as_float_image, pad_to_multiple, resize_maps

__all__ = [
    "INT8_MEAN_DIFF_BOUND",
    "Maps",
    "MattingBody",
    "QuantizedNet",
    "calibration_path",
    "load_calibration",
    "model_digest",
    "quantize",
]

# DenseNet concatenates features of different scales; quantized::cat requantizes them to the output's
# scale (what calibration measured), so torch's warning about unequal input scales is expected here.
warnings.filterwarnings("ignore", message="All inputs of this cat operator must share the same quantization")

INT8_MEAN_DIFF_BOUND = 0.005  # mean |alpha int8 - alpha fp32| above this: int8 is not offered by auto
FLOAT_MODULES = ("fg_decoder", "bg_decoder", "fusion")  # kept float32: measured necessary (see above)
CALIBRATION_SIDE = 320  # longer side calibration images are resized to (at most; never enlarged)


class Maps(NamedTuple):
    """What Matter.run_network reads: `(N,1,H,W)` float32 maps in [0,1]."""

    alpha: Tensor
    fg_prob: Tensor
    bg_prob: Tensor


class MattingBody(nn.Module):
    """The part of LateFusionNet that is quantised: normalised image -> (fg, bg, blend) logits.

    Input `(N,3,H,W)` normalised as the model expects, H and W multiples of 32; outputs `(N,1,H,W)`
    logits (float32). Shares the model's modules (no copy).
    """

    def __init__(self, model: LateFusionNet):
        super().__init__()
        self.encoder, self.fg_decoder, self.bg_decoder = model.encoder, model.fg_decoder, model.bg_decoder
        self.fusion = model.fusion

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.encoder(x)
        fg_logit, fg_feature = self.fg_decoder.finest(feats)
        bg_logit, bg_feature = self.bg_decoder.finest(feats)
        return fg_logit, bg_logit, self.fusion.head(self.fusion.features(fg_feature, bg_feature, x))


class QuantizedNet(nn.Module):
    """image `(N,3,H,W)` float in [0,1] -> Maps; `body` is MattingBody, float or FX-quantised."""

    stride = LateFusionNet.stride

    def __init__(self, body: nn.Module, input_mean: Tensor, input_scale: Tensor):
        super().__init__()
        self.body = body
        self.register_buffer("input_mean", input_mean.detach().clone(), persistent=False)
        self.register_buffer("input_scale", input_scale.detach().clone(), persistent=False)

    def forward(self, image: Tensor) -> Maps:
        fg_logit, bg_logit, blend_logit = self.body((image.float() - self.input_mean) * self.input_scale)
        fg_prob, bg_prob = torch.sigmoid(fg_logit.float()), torch.sigmoid(bg_logit.float())
        return Maps(blend(torch.sigmoid(blend_logit.float()), fg_prob, bg_prob), fg_prob, bg_prob)


def _qconfig_mapping(backend: str):
    from torch.ao.quantization import get_default_qconfig_mapping

    mapping = get_default_qconfig_mapping(backend)
    for name in FLOAT_MODULES:
        mapping = mapping.set_module_name(name, None)
    return mapping


def _prepared(model: LateFusionNet, backend: str) -> nn.Module:
    """MattingBody of a copy of `model` with observers in place (FX graph mode, prepare_fx)."""
    from torch.ao.quantization.quantize_fx import prepare_fx

    body = MattingBody(copy.deepcopy(model).eval().float().cpu()).eval()
    example = (torch.zeros(1, 3, 64, 64),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices; the API is what torch 2.x ships
        return prepare_fx(body, _qconfig_mapping(backend), example)


def _observer_state(prepared: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in prepared.state_dict().items() if "activation_post_process" in k}


def _convert(prepared: nn.Module, model: LateFusionNet) -> QuantizedNet:
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        body = convert_fx(prepared)
    return QuantizedNet(body, model.input_mean.cpu(), model.input_scale.cpu()).eval()


def model_digest(model: nn.Module) -> str:
    """sha256 (16 hex) over the model's config and state: the key of its int8 calibration."""
    digest = hashlib.sha256(repr(getattr(model, "config", {})).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def calibration_path(model: nn.Module, backend: str = "x86") -> Path:
    root = Path(os.environ.get("FUSIONNET_CACHE", Path.home() / ".cache" / "fusionnet"))
    return root / "int8" / f"{model_digest(model)}-{backend}.pt"


def _pad32(x: Tensor) -> Tensor:
    return pad_to_multiple(x, LateFusionNet.stride)


def _as_batch(image: np.ndarray, max_side: int) -> Tensor:
    rgb = torch.from_numpy(as_float_image(image)).permute(2, 0, 1)[None].contiguous()
    return _pad32(resize_maps(rgb, fit_within(tuple(rgb.shape[-2:]), max_side)).clamp_(0, 1))


@torch.inference_mode()
def quantize(
    model: LateFusionNet,
    images: Sequence[np.ndarray],
    *,
    held_out: int = 2,
    backend: str = "x86",
    max_side: int = CALIBRATION_SIDE,
    save: bool = True,
) -> tuple[QuantizedNet, dict]:
    """Calibrate on `images` ((H,W,3) uint8 or float [0,1]); -> (int8 network, info).

    The last `held_out` images are not used for calibration but to measure `info["mean_abs_diff"]`,
    the mean |alpha int8 - alpha fp32| (network output, before refinement). With `save`, the
    observers and info are written to `calibration_path(model)` for `load_calibration`.
    """
    if len(images) <= held_out:
        raise ValueError(f"need more than {held_out} calibration images (the last {held_out} check accuracy), got {len(images)}")
    if backend not in ("x86", "onednn", "fbgemm"):
        raise ValueError(f"unknown int8 backend {backend!r}; choose x86, onednn or fbgemm")
    torch.backends.quantized.engine = backend
    model = model.eval()
    prepared = _prepared(model, backend)
    batches = [_as_batch(image, max_side) for image in images]
    mean, scale = model.input_mean.cpu(), model.input_scale.cpu()
    for x in batches[: len(batches) - held_out]:
        prepared((x - mean) * scale)
    observers = _observer_state(prepared)
    network = _convert(prepared, model)
    reference = QuantizedNet(MattingBody(copy.deepcopy(model).cpu()).eval(), mean, scale).eval()
    diffs = [(network(x).alpha - reference(x).alpha).abs().mean().item() for x in batches[-held_out:]] if held_out else []
    info = {
        "backend": backend,
        "calibration_images": len(images) - held_out,
        "held_out": held_out,
        "mean_abs_diff": float(np.mean(diffs)) if diffs else None,
        "bound": INT8_MEAN_DIFF_BOUND,
        "digest": model_digest(model),
    }
    if save:
        # never a half-written calibration
        write_atomic(calibration_path(model, backend), lambda tmp: torch.save({"observers": observers, "info": info}, tmp))
    return network, info


def load_calibration(model: LateFusionNet, backend: str = "x86") -> tuple[QuantizedNet, dict] | None:
    """The int8 network for `model` from its cached calibration, or None when there is none."""
    path = calibration_path(model, backend)
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    torch.backends.quantized.engine = backend
    prepared = _prepared(model, backend)
    prepared.load_state_dict(saved["observers"], strict=False)
    return _convert(prepared, model), dict(saved["info"], path=str(path))


def calibration_info(model: LateFusionNet, backend: str = "x86") -> dict | None:
    """The cached calibration's info (accuracy, count) without building the network; None if absent."""
    path = calibration_path(model, backend)
    if not path.is_file():
        return None
    return dict(torch.load(path, map_location="cpu", weights_only=True)["info"], path=str(path))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusionnet.inference.int8", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a fusionnet model file")
    parser.add_argument("--shards", nargs="*", default=[], help="training shard folders or .parquet files")
    parser.add_argument("--images", nargs="*", default=[], help="image files or folders (when there are no shards)")
    parser.add_argument("--count", type=int, default=16, help="calibration images (2 more are held out)")
    parser.add_argument("--backend", default="x86", choices=("x86", "onednn", "fbgemm"))
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, "cpu")
        images = calibration_images([*args.shards, *args.images], count=args.count + 2, max_side=CALIBRATION_SIDE)
        if len(images) < 3:
            raise ValueError(f"found {len(images)} calibration image(s) in --shards/--images; need at least 3")
        _, info = quantize(model, images, backend=args.backend)
    except (OSError, ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verdict = "within" if info["mean_abs_diff"] <= INT8_MEAN_DIFF_BOUND else "BEYOND"
    print(f"int8 calibration ({info['calibration_images']} images, {args.backend}) saved to "
          f"{calibration_path(model, args.backend)}; mean |alpha int8 - fp32| on {info['held_out']} held-out "
          f"images {info['mean_abs_diff']:.5f} ({verdict} the {INT8_MEAN_DIFF_BOUND} bound)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
