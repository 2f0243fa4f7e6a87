"""The one way to open a model for matting: `fusionnet matte`, `fusionnet serve` and the MLflow pyfunc.

    opened = open_model("models:/late-fusion-matting@champion", device="auto", max_side=None)
    opened.matter(rgb).alpha      # (H,W) float32 in [0,1]
    opened.settings               # {"max_side": 320, "precision": "auto", "refine": True, ...}
    opened.settings_from          # where each setting came from

A model's serving settings (SERVING_KEYS) are taken, per key, from the first of:
1. the caller (a command-line option; None means "not given");
2. the model file's own header: safetensors metadata "serving" (JSON), written by
   `fusionnet.model.checkpoint.save(..., serving=...)` (training writes max_side = its working scale,
   crops.max_side); for an ONNX file its `fusionnet.serving` metadata (`fusionnet export` copies 2.-3.);
3. the MLflow model the file was downloaded in (`settings.json` beside it in `artifacts/`, next to
   `MLmodel`: what a `models:/` URI resolves to; the registry keeps the file byte-identical to the trained one);
4. SERVING_DEFAULTS.
So one model, by path or URI, runs the same way in every front end.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionnet.hardware import resolve_device
from fusionnet.inference.loading import load_model, resolve_model_path
from fusionnet.inference.matter import (
    DEFAULT_GUIDED_EPS,
    DEFAULT_GUIDED_RADIUS,
    DEFAULT_MAX_SIDE,
    PRECISIONS,
    Matter,
)
from fusionnet.model.checkpoint import SERVING_KEY, read_metadata
from fusionnet.model.network import LateFusionNet
from fusionnet.onnx.runtime import META_PREFIX, OnnxMatter, is_onnx_model
from fusionnet.onnx.runtime import read_metadata as read_onnx_metadata

SERVING_KEYS = ("max_side", "precision", "refine", "radius", "eps")
MAX_SIDE_RANGE = (32, 4096)  # a request's own max_side (server ?max_side=, pyfunc params): bounds its memory
SERVING_DEFAULTS: dict[str, Any] = {"max_side": DEFAULT_MAX_SIDE, "precision": "auto", "refine": True,
                                    "radius": DEFAULT_GUIDED_RADIUS, "eps": DEFAULT_GUIDED_EPS}
_TYPES = {"max_side": int, "precision": str, "refine": bool, "radius": int, "eps": float}
_VALID = {"max_side": lambda v: v >= 1, "precision": lambda v: v in PRECISIONS, "radius": lambda v: v >= 0,
          "eps": lambda v: v > 0}
MLFLOW_SETTINGS_FILE = "settings.json"


def check_settings(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The serving keys of `settings`, typed and checked; ValueError naming `source` for a bad value."""
    checked: dict[str, Any] = {}
    for key in SERVING_KEYS:
        value = settings.get(key)
        if value is None:
            continue
        if key == "refine":
            ok = isinstance(value, bool)
        else:
            try:
                value = _TYPES[key](value)
                ok = _VALID[key](value)
            except (TypeError, ValueError):
                ok = False
        if not ok:
            raise ValueError(f"{source}: serving setting {key}={settings[key]!r} is not valid")
        checked[key] = value
    return checked


def stored_layers(path: str | os.PathLike) -> list[tuple[dict[str, Any], str]]:
    """The settings stored with the model file at `path`, first wins per key: [(its header's, where),
    (a downloaded MLflow model's settings.json, where)], each only where present.

    Training writes max_side (its working scale) into the header; registration adds the guided filter
    evaluate chose (radius, eps) in settings.json without touching the file: both apply, key by key.
    """
    path = Path(path)
    layers: list[tuple[dict[str, Any], str]] = []
    if is_onnx_model(path):
        raw = read_onnx_metadata(path).get(SERVING_KEY)
        header = f"{path} (ONNX metadata {META_PREFIX}{SERVING_KEY})"
    else:
        raw = read_metadata(path).get(SERVING_KEY)
        header = f"{path} (header {SERVING_KEY})"
    if raw is not None:
        try:
            layers.append((check_settings(json.loads(raw), header), header))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{header}: not JSON ({exc})") from exc
    sidecar = path.parent / MLFLOW_SETTINGS_FILE
    if path.parent.name == "artifacts" and (path.parent.parent / "MLmodel").is_file() and sidecar.is_file():
        try:
            found = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{sidecar}: unreadable registered settings ({exc})") from exc
        if isinstance(found, dict):
            layers.append((check_settings(found, str(sidecar)), str(sidecar)))
    return [(settings, source) for settings, source in layers if settings]


def stored_settings(path: str | os.PathLike) -> tuple[dict[str, Any], str | None]:
    """(serving settings stored with the model file at `path`, merged key by key as `stored_layers`
    says, where the first of them was found; None: nowhere)."""
    layers = stored_layers(path)
    merged: dict[str, Any] = {}
    for settings, _ in reversed(layers):
        merged.update(settings)
    return merged, (layers[0][1] if layers else None)


@dataclass
class OpenedModel:
    """A model opened for matting: its file, its network (None for ONNX), the Matter and its settings."""

    spec: str
    path: Path
    engine: str  # "torch" | "onnx"
    model: LateFusionNet | None
    matter: Matter
    settings: dict[str, Any]
    settings_from: dict[str, str] = field(default_factory=dict)  # key -> "command line" | a file | "default"
    notes: list[str] = field(default_factory=list)  # what the caller should tell the user

    @property
    def config(self) -> dict[str, Any]:
        return self.model.config if self.model is not None else self.matter.config


def open_model(spec: str | os.PathLike, *, device: str = "auto", threads: int | None = None,
               compile: bool = False, **given: Any) -> OpenedModel:
    """Open `spec` (a model file, an .onnx file or a URI such as `models:/name@alias`) for matting.

    given: serving settings (SERVING_KEYS) from the caller; None = not given. Raises FileNotFoundError,
    LookupError (no resolver for a URI), ImportError (ONNX without onnxruntime) or ValueError/RuntimeError
    (an unusable file or setting), each naming the model.
    """
    unknown = set(given) - set(SERVING_KEYS)
    if unknown:
        raise TypeError(f"open_model: unknown settings {sorted(unknown)}")
    path = resolve_model_path(spec)
    explicit = check_settings(given, "the command line")
    settings, origin = {}, {}
    layers = [(explicit, "command line"), *stored_layers(path), (SERVING_DEFAULTS, "default")]
    for key in SERVING_KEYS:
        for layer, name in layers:
            if key in layer:
                settings[key], origin[key] = layer[key], name
                break
    options = {k: settings[k] for k in ("max_side", "refine", "radius", "eps")}
    notes: list[str] = []
    if is_onnx_model(path):
        matter = OnnxMatter(path, device=device, threads=threads, **options)
        if explicit.get("precision") not in (None, "auto", "fp32"):
            notes.append(f"--precision {explicit['precision']} does not apply to an ONNX model: it runs at the "
                         f"precision it was exported with ({matter.precision}); export with --int8 for int8")
        if compile:
            notes.append("--compile does not apply to an ONNX model (ONNX Runtime optimises the graph itself)")
        settings["precision"] = matter.precision
        return OpenedModel(os.fspath(spec), path, "onnx", None, matter, settings, origin, notes)
    if device == "auto" and settings["precision"] == "int8":
        device = "cpu"  # int8 runs on CPU only: "auto" means the best device that can run the model
    target = resolve_device(device)
    model = load_model(path, device=target)  # loaded onto its device: no CPU copy of a GPU model
    matter = Matter(model, device=target, precision=settings["precision"], compile=compile, **options)
    return OpenedModel(os.fspath(spec), path, "torch", model, matter, settings, origin, notes)
