"""The registered model's MLflow pyfunc: encoded images in, alpha mattes out.

Logged as "model from code" (this file is the model's code; no pickle), with two artifacts:
`weights` (a fusionnet.model.save file) and `settings` (JSON: max_side, precision, refine, radius,
eps, device: "auto" = CUDA where the server has it; older models say "cpu"), and with `register.onnx: true` a third, `onnx` (the weights' fp32 ONNX export, for ONNX Runtime
users: `fusionnet matte --model <pulled>/artifacts/model.onnx`; this pyfunc itself runs the weights).
`code_paths` carries a copy of the fusionnet package, so a downloaded model runs without this
checkout (pipeline.registry.models.log_matting_model).

Input: a DataFrame with column "image", each value the bytes of a PNG/JPEG/... file (over REST:
base64 in `dataframe_split` / `dataframe_records` / `inputs`; MLflow decodes binary columns).
A base64 str is accepted too. Output: a DataFrame with "alpha" (PNG bytes, 8-bit grey, the
image's size; base64 over REST), "height", "width". Params (optional, per request): max_side
(network input's longer side, 32..4096), refine (guided filter on/off).

A bad image raises MlflowException(INVALID_PARAMETER_VALUE) naming the row and the problem, which
`mlflow models serve` answers with HTTP 400; the server keeps serving. Cells decode through
fusionnet.io.images.load_image_bytes, the CLI's and `fusionnet serve`'s path (same EXIF handling,
pixel limit and messages).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from PIL import Image

from fusionnet.inference.opening import MAX_SIDE_RANGE
from fusionnet.io import images as imageio
from fusionnet.io.images import ImageLoadError, load_image_bytes

IMAGE_COLUMN = "image"
MAX_PIXELS = 50_000_000  # refuse larger images from their header (decompression-bomb guard)
_MATTER_CACHE_SIZE = 4


def model_signature(max_side: int, refine: bool) -> ModelSignature:
    """Input: binary column "image"; output: alpha (binary PNG), height, width; params max_side, refine."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
        outputs=Schema(
            [ColSpec(DataType.binary, "alpha"), ColSpec(DataType.long, "height"), ColSpec(DataType.long, "width")]
        ),
        params=ParamSchema(
            [ParamSpec("max_side", DataType.long, int(max_side)), ParamSpec("refine", DataType.boolean, bool(refine))]
        ),
    )


def _bad_input(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


def decode_image(value: Any, row: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One input cell (file bytes, or their base64 text) -> (H,W,3) float32 RGB in [0,1].

    Decoded by fusionnet.io.images.load_image_bytes, as the CLI and `fusionnet serve` decode: EXIF
    orientation applied, images over `max_pixels` refused from their header.
    """
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise _bad_input(f"row {row}: column {IMAGE_COLUMN!r} is text but not base64 ({exc})") from exc
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise _bad_input(
            f"row {row}: column {IMAGE_COLUMN!r} must hold the bytes of an image file, got {type(value).__name__}"
        )
    try:
        return load_image_bytes(value, f"row {row}", max_pixels=max_pixels).rgb
    except ImageLoadError as exc:
        raise _bad_input(f"row {row}: {exc.problem}") from exc


def encode_png(alpha: np.ndarray) -> bytes:
    """(H,W) float in [0,1] -> 8-bit grey PNG bytes."""
    return imageio.encode_png(imageio.to_uint8(alpha))


def decode_png(data: bytes | str) -> np.ndarray:
    """The inverse for clients: PNG bytes (or their base64 text) -> (H,W) float32 alpha in [0,1]."""
    raw = base64.b64decode(data) if isinstance(data, str) else data
    with Image.open(io.BytesIO(raw)) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def images_frame(images: list[bytes | np.ndarray]) -> pd.DataFrame:
    """A model input from encoded image files or (H,W,3) uint8 arrays (arrays are PNG-encoded)."""
    cells = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = imageio.encode_png(np.ascontiguousarray(image, dtype=np.uint8))
        cells.append(bytes(image))
    return pd.DataFrame({IMAGE_COLUMN: cells})


class LateFusionMattingModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around fusionnet.inference.matter.Matter (see the module doc for input and output)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from fusionnet.inference.opening import open_model

        # opened the one way `fusionnet matte`/`serve` open it: the weights' header, else settings.json beside them
        # device: "auto" (registered since CUDA serving; CUDA when the server has it), or "cpu" as older models say
        device = json.loads(Path(context.artifacts["settings"]).read_text()).get("device", "auto")
        opened = open_model(context.artifacts["weights"], device=device)
        self.device = opened.matter.device  # resolved once: every Matter of this model runs there
        self.settings: dict[str, Any] = opened.settings
        self.network = opened.model
        self._matters: OrderedDict[tuple[int, bool], Any] = OrderedDict(
            {(opened.settings["max_side"], opened.settings["refine"]): opened.matter})

    def _matter(self, max_side: int, refine: bool):
        """A Matter per (max_side, refine), a few kept (a bf16 Matter holds its own weight copy)."""
        from fusionnet.inference.matter import Matter

        key = (max_side, refine)
        if key not in self._matters:
            self._matters[key] = Matter(
                self.network,
                device=self.device,
                precision=self.settings["precision"],
                max_side=max_side,
                refine=refine,
                radius=self.settings["radius"],
                eps=self.settings["eps"],
            )
            while len(self._matters) > _MATTER_CACHE_SIZE:
                self._matters.popitem(last=False)
        self._matters.move_to_end(key)
        return self._matters[key]

    # pd.DataFrame is a hint MLflow infers no signature from: the explicit model_signature stays in force
    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        params = params or {}
        max_side = int(params.get("max_side", self.settings["max_side"]))
        refine = bool(params.get("refine", self.settings["refine"]))
        if not MAX_SIDE_RANGE[0] <= max_side <= MAX_SIDE_RANGE[1]:
            raise _bad_input(f"param max_side={max_side} is outside {MAX_SIDE_RANGE[0]}..{MAX_SIDE_RANGE[1]}")
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            raise _bad_input(f"expected a DataFrame with column {IMAGE_COLUMN!r} of encoded image files")
        images = [decode_image(value, i) for i, value in enumerate(model_input[IMAGE_COLUMN].tolist())]
        matter = self._matter(max_side, refine)
        rows = []
        for image in images:
            result = matter(image)
            rows.append({"alpha": encode_png(result.alpha), "height": image.shape[0], "width": image.shape[1]})
        return pd.DataFrame(rows, columns=["alpha", "height", "width"])


# Models from code: MLflow runs this file and takes the model set here.
mlflow.models.set_model(LateFusionMattingModel())
