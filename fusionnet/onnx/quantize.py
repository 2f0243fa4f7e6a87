"""int8 post-training static quantisation of an exported ONNX model with ONNX Runtime.

`quantize_onnx(fp32.onnx, int8.onnx, images)`: activation ranges calibrated (MinMax) on training
composites, weights int8 per output channel, QDQ format (Quantize/DequantizeLinear pairs that ONNX
Runtime's CPU provider fuses into int8 convolutions on VNNI/AMX). Activations uint8 by default.

Kept in float32, because alpha is read straight off them: the 1-channel convolutions that give
fg_prob's and bg_prob's logits and the fusion network's beta logit (int8 steps in a logit move
the sigmoid by up to a few 1/255 near 0.5) and everything after them (sigmoids, the Eq. 2 blend).
They are a negligible share of the FLOPs; the full-resolution fusion and FPN convolutions, which are
most of them, are int8.

Calibration images: `calibration_images(source)` reads the project's shards (`fusionnet.data.shards`,
the composites training sees) or, when `source` is a folder of image files, those.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fusionnet.inference.calibration import calibration_images as shared_calibration_images
from fusionnet.io.atomic import write_atomic
from fusionnet.io.images import fit_within
from fusionnet.model import LateFusionNet
from fusionnet.model.geometry import pad_to_multiple, resize_maps
from fusionnet.onnx.common import ExportError, set_metadata
from fusionnet.onnx.runtime import INPUT_NAME, META_PREFIX

DEFAULT_CALIBRATION_COUNT = 16
DEFAULT_CALIBRATION_SIDE = 320  # activation ranges barely depend on size; 320 keeps calibration minutes short
QUANT_FORMATS = ("QDQ", "QOperator")
ACTIVATION_TYPES = ("uint8", "int8")
QUANTIZED_OPS = ("Conv", "Concat", "MaxPool", "AveragePool", "Resize", "Relu", "Add")
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def calibration_images(
    source: str | os.PathLike, *, count: int = DEFAULT_CALIBRATION_COUNT, seed: int = 0
) -> list[np.ndarray]:
    """Up to `count` images `(H,W,3)` float32 in [0,1] from shards or an image folder, drawn as the
    PyTorch int8 path draws them (`fusionnet.inference.calibration`); ExportError naming `--calibrate`."""
    try:
        return shared_calibration_images([source], count=count, seed=seed)
    except (OSError, ValueError) as exc:
        raise ExportError(f"--calibrate {exc}") from exc


def network_input(image: np.ndarray, side: int = DEFAULT_CALIBRATION_SIDE) -> np.ndarray:
    """What the network sees for `image` at longer side `side`: `(1,3,h,w)` float32, h, w padded to 32."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    x = resize_maps(x, fit_within(image.shape[:2], side)).clamp_(0.0, 1.0)
    return np.ascontiguousarray(pad_to_multiple(x, LateFusionNet.stride).numpy())


def _reader(images: Sequence[np.ndarray], side: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items: Iterator[np.ndarray] = (network_input(image, side) for image in images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self._items, None)
            return None if item is None else {INPUT_NAME: item}

    return Reader()


def logit_convolutions(model) -> list[str]:
    """Names of the Conv nodes with one output channel: the side-output heads and the beta head."""
    weights = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "Conv" and len(node.input) > 1 and weights.get(node.input[1], (0,))[0] == 1]


def float_tail(model) -> list[str]:
    """The logit convolutions and every node downstream of them (sigmoids, the Eq. 2 blend's Mul/Add)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_name = {node.name: node for node in model.graph.node}
    todo = [by_name[name] for name in logit_convolutions(model)]
    seen: dict[str, None] = {}
    while todo:
        node = todo.pop()
        if node.name in seen:
            continue
        seen[node.name] = None
        for output in node.output:
            todo.extend(consumers.get(output, []))
    return list(seen)


def in_scopes(model, scopes: Sequence[str]) -> list[str]:
    """Names of the nodes whose PyTorch module (the exporter's `pkg.torch.onnx.name_scopes`) is in `scopes`."""
    import ast

    wanted, names = set(scopes), []
    for node in model.graph.node if wanted else ():
        meta = {p.key: p.value for p in node.metadata_props}
        if wanted & set(ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))):
            names.append(node.name)
    return names


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out: str | os.PathLike,
    images: Sequence[np.ndarray],
    *,
    side: int = DEFAULT_CALIBRATION_SIDE,
    quant_format: str = "QDQ",
    activation_type: str = "uint8",
    per_channel: bool = True,
    keep_logits_fp32: bool = True,
    method: str = "minmax",
    exclude_scopes: Sequence[str] = (),
    op_types: Sequence[str] = QUANTIZED_OPS,
    extra_options: dict | None = None,
) -> Path:
    """Static int8 quantisation of `fp32_path`, calibrated on `images`, written atomically to `out`.

    quant_format "QDQ" or "QOperator"; activation_type "uint8" or "int8"; weights int8 (per channel).
    keep_logits_fp32: leave the 1-channel logit convolutions and all after them in float32 (module doc).
    method: activation-range calibration, one of CALIBRATION_METHODS; exclude_scopes: module paths
    (`model.fusion.rgb`, `model.encoder.stem`) whose nodes stay fp32; extra_options: more of
    `quantize_static`'s extra_options (they win over ours).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if quant_format not in QUANT_FORMATS or activation_type not in ACTIVATION_TYPES or method not in CALIBRATION_METHODS:
        raise ValueError(f"quant_format one of {QUANT_FORMATS}, activation_type one of {ACTIVATION_TYPES}, "
                         f"method one of {tuple(CALIBRATION_METHODS)}")
    if not images:
        raise ExportError("no calibration images")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".quantize.", dir=out.parent) as work:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(os.fspath(fp32_path), os.fspath(prepared), skip_symbolic_shape=True)
        model = onnx.load(os.fspath(prepared))
        kept = {scope: in_scopes(model, [scope]) for scope in exclude_scopes}
        for scope, names in kept.items():  # a misspelt scope would silently quantise everything
            if not names:
                raise ExportError(f"exclude scope {scope!r}: no node of {fp32_path} comes from that module")
        exclude = list(dict.fromkeys([*(float_tail(model) if keep_logits_fp32 else []), *itertools.chain(*kept.values())]))
        quantized = Path(work) / "int8.onnx"
        quantize_static(
            os.fspath(prepared), os.fspath(quantized), _reader(images, side),
            quant_format=QuantFormat.QDQ if quant_format == "QDQ" else QuantFormat.QOperator,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8 if activation_type == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            op_types_to_quantize=list(op_types),
            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
            extra_options={"ActivationSymmetric": activation_type == "int8", **(extra_options or {})},
        )
        proto = onnx.load(os.fspath(quantized))
        source = onnx.load(os.fspath(fp32_path), load_external_data=False)
        set_metadata(proto, {p.key[len(META_PREFIX):]: p.value for p in source.metadata_props
                             if p.key.startswith(META_PREFIX)})
        set_metadata(proto, {"precision": "int8", "quantization": f"onnxruntime static {quant_format}, "
                             f"{activation_type} activations, int8 {'per-channel' if per_channel else 'per-tensor'} "
                             f"weights, {CALIBRATION_METHODS[method]} on {len(images)} images at side {side}, "
                             f"{len(exclude)} nodes on fp32 (logit convs{''.join(', ' + x for x in exclude_scopes)}), "
                             f"ops {'+'.join(op_types)}"})
        return write_atomic(out, lambda tmp: onnx.save(proto, os.fspath(tmp)))
