"""Exporting a LateFusionNet to ONNX (`fusionnet export --format onnx`) and checking it against PyTorch.

The graph: input "image" `(N,3,H,W)` float32 RGB in [0,1], N, H and W dynamic, H and W multiples of
32 (the network stride; `Matter` / `OnnxMatter` reflect-pad any image to them); outputs "alpha",
"fg_prob", "bg_prob" `(N,1,H,W)` float32 in [0,1] (paper Eq. 2's alpha and the two decoders' last
side outputs). BatchNorms that follow a convolution are folded into it first (on a copy), so the
graph is convolutions all the way down: that is also what int8 quantisation wants.

Exporter: torch.onnx's dynamo exporter (torch.export, then ONNX opset DEFAULT_OPSET). The older
TorchScript exporter traces the side outputs' "already at input size?" test as a constant and gives
wrong mattes at any size but the traced one, so it is not used.

The file's metadata (`fusionnet.*` keys) records the opset, the precision (fp32; int8 after
`fusionnet.onnx.quantize`), the stride, the network config and the sha256 of the source model file.
Writing is atomic: a hidden temp sibling renamed into place when complete; a failed export or a failed
check leaves nothing.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fusionnet.inference.loading import load_model, resolve_model_path
from fusionnet.inference.matter import Matter
from fusionnet.inference.network import fold_batchnorms
from fusionnet.inference.opening import stored_settings
from fusionnet.io.atomic import write_atomic
from fusionnet.io.hashing import file_sha256
from fusionnet.io.images import fit_within, load_image
from fusionnet.model import LateFusionNet
from fusionnet.model.checkpoint import SERVING_KEY
from fusionnet.onnx.common import ExportError, set_metadata
from fusionnet.onnx.defaults import (DEFAULT_INT8_SCHEME, DEFAULT_OPSET, DEFAULT_VERIFY_SIDE, FP32_TOLERANCE,
                                     INT8_SCHEMES, INT8_TOLERANCE, MIN_OPSET)
from fusionnet.onnx.quantize import calibration_images, quantize_onnx
from fusionnet.onnx.runtime import INPUT_NAME, OUTPUT_NAMES, OnnxMatter

# Example input the graph is traced on: batch 2, sides of 3 and 4 strides (a size-1 dim would be
# specialised to a constant by torch.export; equal sides could be taken for one symbol).
EXAMPLE_SHAPE = (2, 3, 96, 128)
MAX_SIDE_STRIDES = 512  # 16384 px: dynamic sides are declared up to this many strides
# A real photo for the check, relative to the project root (../shared/data: see README.md), else synthetic.
VERIFY_IMAGE_CANDIDATES = ("../shared/data/alphamatting-dev/image/GT01.png",)
PROJECT_MARKERS = ("dvc.yaml", "pyproject.toml", ".git")


def project_roots(start: str | os.PathLike | None = None) -> list[Path]:
    """The project holding `start` (default: the current folder; the nearest folder with a PROJECT_MARKERS
    entry), then the checkout this package runs from: where `../shared` is looked for, never the cwd itself."""
    roots: list[Path] = []
    here = Path(start if start is not None else os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            roots.append(folder)
            break
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and checkout not in roots:
        roots.append(checkout)
    return roots


class MattingGraph(nn.Module):
    """LateFusionNet as ONNX sees it: image -> (alpha, fg_prob, bg_prob), each `(N,1,H,W)`."""

    def __init__(self, model: LateFusionNet):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(image)
        return out.alpha, out.fg_prob, out.bg_prob


def export_onnx(
    model: LateFusionNet, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET, source_sha256: str | None = None,
    serving: Mapping[str, Any] | None = None,
) -> Path:
    """Write `model` (fp32, BatchNorms folded on a copy) as ONNX to `out`, atomically; returns `out`.

    serving: the source model's serving settings (fusionnet.inference.opening), kept as `fusionnet.serving`.

    N, H, W are dynamic (H, W multiples of 32 up to MAX_SIDE_STRIDES strides). Raises ExportError.
    """
    import onnx

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is below {MIN_OPSET}, the lowest the dynamo exporter writes")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    network = copy.deepcopy(model).float().eval().cpu()
    fold_batchnorms(network)
    graph = MattingGraph(network).eval()
    dim = torch.export.Dim
    rows, cols = dim("rows", min=1, max=MAX_SIDE_STRIDES), dim("cols", min=1, max=MAX_SIDE_STRIDES)
    shapes = {"image": {0: dim("batch", min=1, max=1024), 2: LateFusionNet.stride * rows,
                        3: LateFusionNet.stride * cols}}
    example = torch.rand(*EXAMPLE_SHAPE, generator=torch.Generator().manual_seed(0))
    try:
        program = torch.onnx.export(graph, (example,), None, dynamo=True, opset_version=opset,
                                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes=shapes, verbose=False, report=False)
        proto = program.model_proto
    except Exception as exc:  # torch.export / onnxscript raise many kinds
        raise ExportError(f"torch.onnx.export failed ({type(exc).__name__}: {exc})") from exc
    set_metadata(proto, {
        "format": "fusionnet-onnx-1", "opset": opset, "precision": "fp32", "stride": LateFusionNet.stride,
        "config": json.dumps(model.config, sort_keys=True), "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
        "batchnorm_folded": "true", **({"source_sha256": source_sha256} if source_sha256 else {}),
        **({SERVING_KEY: json.dumps(dict(serving), sort_keys=True)} if serving else {}),
    })
    return write_atomic(out, lambda tmp: onnx.save(proto, os.fspath(tmp)))


@dataclass
class Parity:
    """|ONNX Runtime alpha - PyTorch fp32 alpha| on one image (raw alpha, no refinement)."""

    max_abs: float
    mean_abs: float
    network_size: tuple[int, int]
    image: str


def verify_onnx(
    onnx_path: str | os.PathLike, model: LateFusionNet, image: np.ndarray, *, side: int = DEFAULT_VERIFY_SIDE,
    image_name: str = "image", reference: np.ndarray | None = None,
) -> Parity:
    """Matte `image` `(H,W,3)` through OnnxMatter and through Matter fp32 at network side `side`.

    Both pad, resize and crop with Matter's code, so sizes not a multiple of 32 are exercised.
    `reference`: the PyTorch raw alpha, when already computed (it is the slow half on a CPU).
    """
    onnx_alpha = OnnxMatter(onnx_path, device="cpu", max_side=side, refine=False)(image).raw_alpha
    if reference is None:
        reference = torch_reference(model, image, side)
    diff = np.abs(onnx_alpha.astype(np.float64) - reference.astype(np.float64))
    return Parity(float(diff.max()), float(diff.mean()), fit_within(image.shape[:2], side), image_name)


def torch_reference(model: LateFusionNet, image: np.ndarray, side: int) -> np.ndarray:
    """PyTorch fp32 eager raw alpha of `image` at network side `side`, `(H,W)` float32."""
    return Matter(model, device="cpu", precision="fp32", max_side=side, refine=False)(image).raw_alpha


def find_verify_image(explicit: str | os.PathLike | None = None) -> tuple[np.ndarray, str]:
    """The check image `(H,W,3)` float32 and its name: `explicit`, else a real photo, else synthetic."""
    if explicit is not None:
        return load_image(explicit).rgb, str(explicit)
    for root in project_roots():
        for candidate in VERIFY_IMAGE_CANDIDATES:
            path = Path(os.path.normpath(root / candidate))
            if path.is_file():
                return load_image(path).rgb, str(path)
    rng = np.random.default_rng(0)  # smooth blobs, so the network sees edges and flat regions
    y, x = np.mgrid[0:600, 0:450] / 100.0
    base = np.stack([np.sin(x + 1.3 * y), np.cos(1.7 * x - y), np.sin(0.5 * x * y)], -1) * 0.4 + 0.5
    return np.clip(base + rng.normal(0, 0.03, base.shape), 0, 1).astype(np.float32), "synthetic image (no photo found)"


@dataclass
class ExportReport:
    """What `fusionnet export` did: the file, its opset and precision, the checks, the timings."""

    out: Path
    opset: int
    precision: str
    checks: list[Parity] = field(default_factory=list)
    export_s: float = 0.0
    quantize_s: float = 0.0


def export_model_file(
    spec: str | os.PathLike,
    out: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    int8: bool = False,
    calibrate: str | os.PathLike | None = None,
    calibration_count: int = 16,
    int8_scheme: str = DEFAULT_INT8_SCHEME,
    verify_image: str | os.PathLike | None = None,
    verify_side: int = DEFAULT_VERIFY_SIDE,
    tolerance: float = FP32_TOLERANCE,
    int8_tolerance: float = INT8_TOLERANCE,
    log: Callable[[str], None] = print,
) -> ExportReport:
    """Export model file/URI `spec` to `out` (fp32, or int8 calibrated on `calibrate`), checked.

    int8_scheme: a key of onnx_defaults.INT8_SCHEMES (what int8 touches: "accurate" or "fast").
    fp32: max |d alpha| vs PyTorch on the check image must be <= `tolerance`; int8: the fp32 export
    is checked so, then the quantised one's mean |d alpha| vs PyTorch must be <= `int8_tolerance`.
    Raises ExportError (or OSError/ValueError/LookupError from loading) with nothing left at `out`.
    """
    out = Path(out)
    if int8 and calibrate is None:
        raise ExportError("--int8 needs --calibrate SHARDS_OR_IMAGE_DIR (training composites to calibrate on)")
    path = resolve_model_path(spec)
    model = load_model(path, device="cpu")
    image, image_name = find_verify_image(verify_image)
    report = ExportReport(out=out, opset=opset, precision="int8" if int8 else "fp32")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as work:
        fp32_path = Path(work) / "fp32.onnx"
        started = time.perf_counter()
        export_onnx(model, fp32_path, opset=opset, source_sha256=file_sha256(path), serving=stored_settings(path)[0])
        report.export_s = time.perf_counter() - started
        log(f"exported {path} -> ONNX opset {opset} in {report.export_s:.1f} s; checking against PyTorch fp32 "
            f"on {image_name} at network side {verify_side}")
        reference = torch_reference(model, image, verify_side)
        check = verify_onnx(fp32_path, model, image, side=verify_side, image_name=image_name, reference=reference)
        report.checks.append(check)
        log(_check_line("fp32", check))
        if check.max_abs > tolerance:
            raise ExportError(f"ONNX fp32 alpha differs from PyTorch by up to {check.max_abs:.3g} "
                              f"(> tolerance {tolerance:g}) on {image_name}; nothing written")
        final = fp32_path
        if int8:
            if int8_scheme not in INT8_SCHEMES:
                raise ExportError(f"int8 scheme {int8_scheme!r}: one of {', '.join(INT8_SCHEMES)}")

            images = calibration_images(calibrate, count=calibration_count)
            started = time.perf_counter()
            final = quantize_onnx(fp32_path, Path(work) / "int8.onnx", images, **INT8_SCHEMES[int8_scheme])
            report.quantize_s = time.perf_counter() - started
            log(f"quantised to int8 ({int8_scheme} scheme, ONNX Runtime static QDQ, calibrated on {len(images)} images from {calibrate}) "
                f"in {report.quantize_s:.1f} s")
            check = verify_onnx(final, model, image, side=verify_side, image_name=image_name, reference=reference)
            report.checks.append(check)
            log(_check_line("int8", check))
            if check.mean_abs > int8_tolerance:
                raise ExportError(f"ONNX int8 alpha differs from PyTorch fp32 by {check.mean_abs:.3g} on average "
                                  f"(> tolerance {int8_tolerance:g}) on {image_name}; nothing written")
        os.replace(final, out)
    return report


def _check_line(precision: str, check: Parity) -> str:
    h, w = check.network_size
    return (f"check {precision}: ONNX Runtime vs PyTorch fp32 alpha at {w}x{h}: max |d alpha| {check.max_abs:.2e}, "
            f"mean {check.mean_abs:.2e}")
