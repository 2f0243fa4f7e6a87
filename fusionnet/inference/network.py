"""A trained model prepared to run at one precision on one device: the network part of inference.

Precision: "fp32" is plain eager float32 (the reference). "fp32-cl" is float32 with BatchNorms folded
and channels-last. "bf16" is that in bfloat16 (on CPU the weights are cast to bfloat16, which is
faster than autocast; on CUDA autocast). "int8" is CPU post-training quantisation
(`fusionnet.inference.int8`: needs calibration images or a cached calibration). "fp16" is CUDA
autocast only. Choosing among them ("auto") is `fusionnet.inference.precision`, which times this class.
The "fp32" forward runs inside `fusionnet.hardware.exact_fp32()`: true float32 on a GPU too (no TF32).

Compile (`compile=True`, static shapes): every new input shape costs a compile, and torch._dynamo
gives up after its recompile limit (8) and runs eagerly. So each side is padded up to a bucket, the
next multiple of `bucket_side / COMPILE_RUNGS` rounded up to the stride (`compile_bucket`), and the
output cropped back. For inputs whose sides are at most `bucket_side` (Matter passes its max_side, so
every image it mattes) that is at most COMPILE_RUNGS**2 = 16 graphs per batch size, and at most
2 * COMPILE_RUNGS - 1 = 7 when the longer side is `bucket_side` (every photo larger than max_side);
the recompile limit is raised to COMPILE_RUNGS**2. A side over `bucket_side` adds rungs (more graphs).
Without compile, inputs are padded to the stride only (extra padding costs time).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor, nn

from fusionnet.hardware import exact_fp32, resolve_device
from fusionnet.inference import int8
from fusionnet.model.geometry import pad_to_size
from fusionnet.model.network import LateFusionNet

from fusionnet.defaults import NETWORK_PRECISIONS  # "auto" is chosen among them (Matter)
COMPILE_RUNGS = 4  # compile: bucket sizes per side up to bucket_side (module docstring: the graph bound)
DEFAULT_BUCKET_SIDE = 512  # compile without a max_side: buckets of 128 px


def compile_bucket(side: int, bucket_side: int, stride: int, rungs: int = COMPILE_RUNGS) -> int:
    """The padded length of a side of `side` px under compile: the smallest `ceil(k * bucket_side / rungs)`
    (k = 1, 2, ...) that is >= `side`, rounded up to a multiple of `stride`."""
    k = -(-side * rungs // bucket_side)
    rung = -(-k * bucket_side // rungs)
    return -(-rung // stride) * stride


def _allow_recompiles(graphs: int) -> None:
    """Raise torch._dynamo's per-function recompile limit to at least `graphs` (process-wide)."""
    import torch._dynamo.config as dynamo_config

    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), graphs))


class PreparedNetwork:
    """`model` prepared for `precision` (one of NETWORK_PRECISIONS) on `device`; `run_network` maps images to maps.

    Args:
        model: a LateFusionNet (put in eval mode here: BatchNorm uses its running statistics).
        device: "auto", "cpu", "cuda" or a torch.device.
        precision: one of NETWORK_PRECISIONS.
        compile: wrap the network in torch.compile; inputs are then padded to bucket sizes (module docstring).
        calibration: int8 only: images ((H,W,3) uint8 or float [0,1], ideally training composites) to
            calibrate on (the calibration is then cached); None: use the cached calibration of this model.
        bucket_side: compile only: the largest side the buckets are laid out for (Matter: its max_side).
    """

    def __init__(
        self,
        model: LateFusionNet,
        *,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        compile: bool = False,
        calibration: Sequence[np.ndarray] | None = None,
        bucket_side: int = DEFAULT_BUCKET_SIDE,
    ):
        if precision not in NETWORK_PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(NETWORK_PRECISIONS)}")
        self.device = resolve_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use bf16 on CPU")
        if precision == "int8" and (self.device.type != "cpu" or compile):
            raise ValueError("precision int8 runs on CPU, without compile; use bf16/fp16 on CUDA")
        self.precision = precision
        self.stride = model.stride
        self.int8_info: dict | None = None  # int8: the calibration's accuracy check (fusionnet.inference.int8)
        if precision == "int8":
            self.model, self.int8_info = _int8_network(model, calibration)
        else:
            self.model = _prepare_model(model, self.device, precision)
        self._network = self.model
        self.compiled = compile
        self.bucket_side = bucket_side
        if compile:
            _allow_recompiles(COMPILE_RUNGS**2)
            # freezing: weights become constants, so inductor can prepack them for oneDNN and fold BN.
            options = {"freezing": True} if self.device.type == "cpu" else None
            self._network = torch.compile(self.model, dynamic=False, options=options)

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self._casts_weights else torch.float32

    @property
    def _casts_weights(self) -> bool:
        return self.precision == "bf16" and self.device.type == "cpu"

    @property
    def _autocast_dtype(self) -> torch.dtype | None:
        if self.device.type == "cuda" and self.precision in ("bf16", "fp16"):
            return torch.bfloat16 if self.precision == "bf16" else torch.float16
        return None

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The `(h, w)` the network sees for an `height x width` input: stride multiples, compile buckets."""
        if self.compiled:
            return (compile_bucket(height, self.bucket_side, self.stride),
                    compile_bucket(width, self.bucket_side, self.stride))
        return -(-height // self.stride) * self.stride, -(-width // self.stride) * self.stride

    @torch.inference_mode()
    def run_network(self, batch: Tensor) -> Tensor:
        """`(N,3,h,w)` float in [0,1], any h, w -> `(N,3,h,w)` float32 maps [alpha, fg_prob, bg_prob] on the device.

        Pads (`padded_size`), runs the network at this Matter's precision, crops the padding off.
        """
        height, width = batch.shape[-2:]
        x = pad_to_size(batch.to(self.device, torch.float32), self.padded_size(height, width)).to(self.input_dtype)
        if self.precision in ("fp32-cl", "bf16", "fp16"):
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = self._autocast_dtype
        exact = exact_fp32() if self.precision == "fp32" else nullcontext()  # fp32 is the reference: no TF32
        with exact, torch.autocast(self.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = self._network(x)
        maps = torch.cat([out.alpha, out.fg_prob, out.bg_prob], dim=1)[..., :height, :width]
        return maps.float().clamp_(0.0, 1.0).contiguous()


def _int8_network(model: LateFusionNet, calibration: Sequence[np.ndarray] | None) -> tuple[nn.Module, dict]:
    """(int8 network, calibration info): calibrated on `calibration`, else from the model's cached calibration."""
    if calibration is not None:
        return int8.quantize(model.cpu(), calibration)
    loaded = int8.load_calibration(model.cpu())
    if loaded is None:
        raise ValueError(
            "precision int8 needs a calibration of this model and none is cached; make one with "
            "`python -m fusionnet.inference.int8 MODEL --shards data/shards/train` (or --images DIR), "
            "or pass calibration images"
        )
    return loaded


def _prepare_model(model: LateFusionNet, device: torch.device, precision: str) -> LateFusionNet:
    model = model.eval()  # eval: BatchNorm running statistics, as at test time
    if precision == "fp32":
        return model.to(device)
    # A copy, so the caller's float32 model is left as it was; BatchNorms folded while still in fp32.
    model = copy.deepcopy(model)
    fold_batchnorms(model)
    model = model.to(device, memory_format=torch.channels_last)  # oneDNN / cuDNN fast layouts
    if precision == "bf16" and device.type == "cpu":
        # Whole-model bfloat16 measured faster than CPU autocast (no per-op casts); see benchmark.
        model = model.to(torch.bfloat16)
    return model


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> int:
    """Fold each eval-mode BatchNorm2d that directly follows a Conv2d into the conv; returns the count.

    Covers conv -> BN pairs in `nn.Sequential` (stem, up blocks, fusion network) and the
    conv1 -> norm2 pair inside torchvision's dense layers. Saves a full pass over the activations per
    BatchNorm (the fusion network's run at full resolution). Exact up to float rounding.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    from torchvision.models.densenet import _DenseLayer

    if model.training:
        raise ValueError("fold_batchnorms needs a model in eval mode (BatchNorm running statistics)")
    folded = 0
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for conv_name, bn_name in zip(names, names[1:]):
                conv, bn = module._modules[conv_name], module._modules[bn_name]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                    module._modules[bn_name] = nn.Identity()
                    folded += 1
        elif isinstance(module, _DenseLayer) and isinstance(module.norm2, nn.BatchNorm2d):
            # _DenseLayer.forward: conv2(relu2(norm2(conv1(relu1(norm1(cat(inputs)))))))
            module.conv1 = fuse_conv_bn_eval(module.conv1, module.norm2)
            module.norm2 = nn.Identity()
            folded += 1
    return folded
