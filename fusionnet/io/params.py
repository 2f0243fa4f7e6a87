"""Reading params.yaml: every stage script, flow and step process reads it through `load_params`,
then hands each section to its library dataclass (`CollectConfig.from_params`, `CompositeConfig`,
`CropParams`, `StepConfig`, `EvalConfig`, ...), so a bad file is one clear error naming it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def load_params(params_path: str | os.PathLike) -> dict[str, Any]:
    """params.yaml as a dict; FileNotFoundError / ValueError naming the file when it is missing or not a mapping."""
    path = Path(params_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:  # the parser's own message names no file
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(params, dict):
        raise ValueError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return params
