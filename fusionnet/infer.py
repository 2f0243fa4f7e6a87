"""Matting one image of any size with a trained LateFusionNet, and batches of image files.

Per image (paper Sec. 4: the longer side is kept at most 800 px at inference, as in training):

1. resize so the longer side is at most `max_side` (bilinear, antialiased; never enlarged);
2. pad bottom/right to a multiple of the network stride 32 by reflection, as the authors' code does
   (numpy "reflect" semantics, so even a 1x1 image works: it is repeated);
3. run the network; crop the padding off alpha, fg_prob and bg_prob;
4. upsample them bilinearly to the image's own size;
5. optionally refine alpha with the guided filter at full resolution (the paper's "Ours-refined").

Precision: "fp32" is plain eager float32 (the reference). "fp32-cl" is float32 with BatchNorms folded
and channels-last. "bf16" is that in bfloat16 (on CPU the weights are cast to bfloat16, which is
faster than autocast; on CUDA autocast). "int8" is CPU post-training quantisation (`fusionnet.quantize`:
needs calibration images or a cached calibration). "fp16" is CUDA autocast only. "auto" picks what is
measurably fastest here (`fusionnet.precision.resolve_inference_precision`).
`benchmarks/bench_inference.py` measures the variants.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from fusionnet.imageio import DEFAULT_MAX_PIXELS, ImageLoadError, LoadedImage, fit_within, load_image
from fusionnet.model import LateFusionNet

DEFAULT_MAX_SIDE = 800  # paper Sec. 4: longer side below 800 at training and inference
# Images larger than this are decoded downscaled and matted at this size (bounds memory: the float
# image, the maps and the guided filter all scale with the output size).
DEFAULT_MAX_OUTPUT_SIDE = 6144
# The paper gives no radius/eps for the guided filter; these are starting points, tune on validation.
DEFAULT_GUIDED_RADIUS = 8
DEFAULT_GUIDED_EPS = 1e-4
PRECISIONS = ("fp32", "fp32-cl", "bf16", "int8", "fp16", "auto")
DEVICES = ("auto", "cpu", "cuda")
MODEL_RESOLVER_GROUP = "fusionnet.model_resolvers"
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters or more: "C:\\x" is a path


# ---------------------------------------------------------------------------------------------
# model files
# ---------------------------------------------------------------------------------------------


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A local model file for `spec`: a path, or a URI such as `models:/name@alias`.

    URIs are handed to the plugin registered under entry-point group `fusionnet.model_resolvers`
    with the URI's scheme as its name (e.g. `models = fusionnet_mlflow:resolve`); the plugin is a
    callable `(spec: str) -> str | PathLike` returning a local file. fusionnet itself imports no
    tracking library.
    """
    text = os.fspath(spec)
    match = _URI_SCHEME.match(text)
    if match is None:
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such model file")
        if not path.is_file():
            raise IsADirectoryError(f"{path}: is a directory, not a model file")
        return path
    scheme = match.group(1)
    found = [ep for ep in entry_points(group=MODEL_RESOLVER_GROUP) if ep.name == scheme]
    if not found:
        raise LookupError(
            f"{text}: no resolver for '{scheme}:' model URIs is installed (entry-point group "
            f"{MODEL_RESOLVER_GROUP!r}, name {scheme!r}); give a path to a model file instead"
        )
    resolved = Path(os.fspath(found[0].load()(text)))
    if not resolved.is_file():
        raise FileNotFoundError(f"{text}: resolver {found[0].value} returned {resolved}, which is not a file")
    return resolved


def load_model(spec: str | os.PathLike, device: str | torch.device = "cpu") -> LateFusionNet:
    """`fusionnet.model.load` of `resolve_model_path(spec)`, on `device`, in eval mode."""
    from fusionnet.model import load

    return load(resolve_model_path(spec), map_location=resolve_device(device)).eval()


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU is a clear error."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but no CUDA GPU is available; use --device cpu")
    return torch.device(spec)


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------


def reflect_indices(size: int, total: int) -> Tensor:
    """Indices `0..total-1` folded back into `0..size-1` by mirror reflection (edge not repeated).

    Same as numpy's `np.pad(mode="reflect")` for any pad length; a size of 1 repeats its element.
    """
    index = torch.arange(total)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index % period
    return torch.where(index < size, index, period - index)


def pad_to_multiple(x: Tensor, multiple: int = LateFusionNet.stride) -> Tensor:
    """Reflect-pad `(N,C,H,W)` at the bottom and right up to multiples of `multiple`."""
    height, width = x.shape[-2:]
    padded_h = -(-height // multiple) * multiple
    padded_w = -(-width // multiple) * multiple
    if padded_h != height:
        x = x.index_select(-2, reflect_indices(height, padded_h).to(x.device))
    if padded_w != width:
        x = x.index_select(-1, reflect_indices(width, padded_w).to(x.device))
    return x


def resize_maps(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of `(N,C,h,w)` to `size`; antialiased when shrinking, identity when equal."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return nnf.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


# ---------------------------------------------------------------------------------------------
# one image
# ---------------------------------------------------------------------------------------------


@dataclass
class MatteResult:
    """One image's matte; every map is `(H,W) float32 in [0,1]` at the input image's size.

    `alpha` is the final matte (guided-filter refined when refinement is on), `raw_alpha` the
    network's alpha before refinement; `network_size` is the `(h, w)` the network saw before padding.
    """

    alpha: np.ndarray
    raw_alpha: np.ndarray
    fg_prob: np.ndarray
    bg_prob: np.ndarray
    network_size: tuple[int, int]


class Matter:
    """A model prepared for inference at a given device and precision; call it on images.

    Args:
        model: a LateFusionNet (put in eval mode here: BatchNorm uses its running statistics).
        device: "auto", "cpu", "cuda" or a torch.device.
        precision: "fp32" (eager reference), "fp32-cl" (folded BN, channels-last), "bf16", "int8" (CPU),
            "fp16" (CUDA only) or "auto" (the measurably fastest of fp32-cl, bf16 and int8 on this
            machine, `fusionnet.precision`; the choice and why are in `precision` and `precision_reason`).
        max_side: longer side of the network input (paper: 800).
        refine: apply the guided filter to alpha at full resolution.
        radius, eps: guided filter window radius (pixels) and regularisation (on the [0,1] scale).
        compile: wrap the network in torch.compile (pays off only for many images of one size).
        calibration: int8 only: images ((H,W,3) uint8 or float [0,1], ideally training composites) to
            calibrate on (the calibration is then cached); None: use the cached calibration of this model.
    """

    def __init__(
        self,
        model: LateFusionNet,
        *,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        max_side: int = DEFAULT_MAX_SIDE,
        refine: bool = True,
        radius: int = DEFAULT_GUIDED_RADIUS,
        eps: float = DEFAULT_GUIDED_EPS,
        compile: bool = False,
        calibration: Sequence[np.ndarray] | None = None,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        self.device = resolve_device(device)
        self.precision_reason = "set by the caller"
        if precision == "auto":
            from fusionnet.precision import resolve_inference_precision

            precision, self.precision_reason = resolve_inference_precision(model, self.device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device; use bf16 on CPU")
        if precision == "int8" and (self.device.type != "cpu" or compile):
            raise ValueError("precision int8 runs on CPU, without compile; use bf16/fp16 on CUDA")
        self.precision = precision
        self.max_side = max_side
        self.refine = refine
        self.radius = radius
        self.eps = eps
        self.stride = model.stride
        self.int8_info: dict | None = None  # int8: the calibration's accuracy check (fusionnet.quantize)
        if precision == "int8":
            self.model, self.int8_info = _int8_network(model, calibration)
        else:
            self.model = _prepare_model(model, self.device, precision)
        self._network = self.model
        if compile:
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

    @torch.inference_mode()
    def run_network(self, batch: Tensor) -> Tensor:
        """`(N,3,h,w)` float in [0,1], any h, w -> `(N,3,h,w)` float32 maps [alpha, fg_prob, bg_prob].

        Pads to the stride, runs the network at this Matter's precision, crops the padding off.
        """
        height, width = batch.shape[-2:]
        x = pad_to_multiple(batch.to(self.device, torch.float32), self.stride).to(self.input_dtype)
        if self.precision in ("fp32-cl", "bf16", "fp16"):
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = self._autocast_dtype
        with torch.autocast(self.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = self._network(x)
        maps = torch.cat([out.alpha, out.fg_prob, out.bg_prob], dim=1)[..., :height, :width]
        return maps.float().clamp_(0.0, 1.0).contiguous()

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> MatteResult:
        """Matte `image`, `(H,W,3)` float in [0,1] (uint8 0..255 also accepted), of any size >= 1x1."""
        return self.matte_batch([image])[0]

    @torch.inference_mode()
    def matte_batch(self, images: Sequence[np.ndarray]) -> list[MatteResult]:
        """Matte same-size images (e.g. video frames) in one network call; one MatteResult each.

        Each image is `(H,W,3)` float in [0,1] or uint8, all of one size. Same steps as calling this
        Matter on each image (the network sees an `(N,3,h,w)` batch): equal up to float rounding.
        """
        rgbs = [as_float_image(image) for image in images]
        if not rgbs:
            return []
        size = (int(rgbs[0].shape[0]), int(rgbs[0].shape[1]))
        for rgb in rgbs[1:]:
            if rgb.shape[:2] != size:
                raise ValueError(f"matte_batch needs images of one size, got {size} and {rgb.shape[:2]}")
        network_size = fit_within(size, self.max_side)
        # contiguous NCHW, as a single image's permuted view is taken: a channels-last batch rounds differently
        x = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).contiguous().to(self.device)
        x = resize_maps(x, network_size).clamp_(0.0, 1.0)
        maps = resize_maps(self.run_network(x), size).clamp_(0.0, 1.0).cpu().numpy()
        results = []
        for rgb, (raw_alpha, fg_prob, bg_prob) in zip(rgbs, maps):
            alpha = raw_alpha
            if self.refine and self.radius > 0:
                from fusionnet.refine import guided_filter

                alpha = guided_filter(rgb, raw_alpha, self.radius, self.eps)
            results.append(
                MatteResult(
                    alpha=alpha, raw_alpha=raw_alpha, fg_prob=fg_prob, bg_prob=bg_prob, network_size=network_size
                )
            )
        return results


def _int8_network(model: LateFusionNet, calibration: Sequence[np.ndarray] | None) -> tuple[nn.Module, dict]:
    """(int8 network, calibration info): calibrated on `calibration`, else from the model's cached calibration."""
    from fusionnet import quantize

    if calibration is not None:
        return quantize.quantize(model.cpu(), calibration)
    loaded = quantize.load_calibration(model.cpu())
    if loaded is None:
        raise ValueError(
            "precision int8 needs a calibration of this model and none is cached; make one with "
            "`python -m fusionnet.quantize MODEL --shards data/shards/train` (or --images DIR), "
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


def as_float_image(image: np.ndarray) -> np.ndarray:
    """An `(H,W,3)` uint8 or float image as float32 in [0,1] (ValueError/TypeError for anything else)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected an (H,W,3) RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise TypeError(f"expected a float image in [0,1] or uint8, got {image.dtype}")
    return np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32)


def matte(model: LateFusionNet, image: np.ndarray, *, fast: bool = False, **options) -> MatteResult:
    """One-off convenience: `Matter(model, precision="bf16" if fast else "fp32", **options)(image)`."""
    options.setdefault("precision", "bf16" if fast else "fp32")
    return Matter(model, **options)(image)


# ---------------------------------------------------------------------------------------------
# many files
# ---------------------------------------------------------------------------------------------


@dataclass
class FileMatte:
    """The outcome for one input file: `image` and `result` on success, else `error` (a message)."""

    path: Path
    image: LoadedImage | None = None
    result: MatteResult | None = None
    error: str | None = None


def matte_files(
    matter: Matter,
    paths: Iterable[str | os.PathLike],
    *,
    max_output_side: int | None = DEFAULT_MAX_OUTPUT_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[FileMatte]:
    """Matte each file in turn; a file that fails yields its error and the batch goes on."""
    for path in paths:
        path = Path(path)
        try:
            image = load_image(path, max_side=max_output_side, max_pixels=max_pixels)
        except ImageLoadError as exc:
            yield FileMatte(path, error=exc.problem)
            continue
        try:
            yield FileMatte(path, image=image, result=matter(image.rgb))
        except (RuntimeError, ValueError, MemoryError) as exc:
            yield FileMatte(path, image=image, error=f"inference failed ({type(exc).__name__}: {exc})")
