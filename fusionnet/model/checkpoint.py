"""Model files without pickle: safetensors weights with the model's config in the header metadata.

A checkpoint from an untrusted source cannot run code: safetensors holds only tensors and strings.
Training-state checkpoints (optimizer, schedule, RNG) live with the trainer; this is the model file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fusionnet.io.atomic import write_atomic
from fusionnet.model.network import LateFusionNet

FORMAT = "fusionnet.late_fusion.v1"
SERVING_KEY = "serving"  # header key: JSON of the settings to matte with (fusionnet.inference.opening)


def _sort_metadata(path: Path) -> None:
    """Rewrite the header's metadata in sorted key order, in place (same length).

    safetensors writes metadata in its Rust HashMap's order, which changes from process to process,
    so the same weights would give files with different bytes (and different DVC md5s).
    """
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # cannot happen for a reordering; keep the file as written if it does
            return
        handle.seek(8)
        handle.write(text + b" " * (size - len(text)))  # the format allows trailing spaces in the header


def save(model: LateFusionNet, path: str | os.PathLike, extra: dict[str, str] | None = None,
         serving: Mapping[str, Any] | None = None) -> Path:
    """Write `model`'s weights and config to `path` (safetensors), atomically.

    extra: strings stored as `extra.<key>`; serving: the settings every front end mattes this model
    with unless told otherwise (max_side, precision, refine, radius, eps), stored as JSON under SERVING_KEY.
    """
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(model.config, sort_keys=True)}
    for key, value in (extra or {}).items():
        metadata[f"extra.{key}"] = str(value)
    if serving:
        metadata[SERVING_KEY] = json.dumps(dict(serving), sort_keys=True)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp), metadata=metadata)
        _sort_metadata(tmp)

    return write_atomic(path, write)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a fusionnet model file, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a fusionnet model file (safetensors header unreadable: {exc})") from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fusionnet model file (format {metadata.get('format')!r}, expected {FORMAT!r})")
    return metadata


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LateFusionNet:
    """Rebuild the model from its stored config and load its weights (strict), straight onto `map_location`.

    The module is built on `map_location` and the weights read there, so a GPU model never passes
    through a CPU copy (no host round trip of the weights).
    """
    metadata = read_metadata(path)
    config = json.loads(metadata["config"])
    with torch.device(map_location):  # parameters and buffers are created on the target device
        model = LateFusionNet(pretrained=False, **config)
    state = load_file(str(path), device=str(map_location))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match a {config} network: {exc}") from exc
    return model.to(map_location)
