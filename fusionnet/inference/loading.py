"""Opening a trained model for inference: a path or a URI (`models:/name@alias`) to a model on a device.

URIs are resolved by plugins (entry-point group `fusionnet.model_resolvers`), so the library imports
no tracking library.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import entry_points
from pathlib import Path

import torch

from fusionnet.defaults import DEVICES  # noqa: F401  re-exported
from fusionnet.hardware import resolve_device
from fusionnet.model.checkpoint import load
from fusionnet.model.network import LateFusionNet

MODEL_RESOLVER_GROUP = "fusionnet.model_resolvers"
_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters or more: "C:\\x" is a path


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
    """`fusionnet.model.checkpoint.load` of `resolve_model_path(spec)`, on `device`, in eval mode."""
    return load(resolve_model_path(spec), map_location=resolve_device(device)).eval()
