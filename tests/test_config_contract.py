"""One config contract (issue 24): every params section is read by one library dataclass's
`from_params`, from a file read by one function (`fusionnet.io.params.load_params`), and the stage
scripts only call them: no stage restates a section's keys or defaults."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fusionnet.data.collect import CollectConfig
from fusionnet.data.composite import CompositeConfig
from fusionnet.data.crops import CropParams
from fusionnet.evaluation.config import EvalConfig
from fusionnet.io.params import load_params
from fusionnet.train.config import STEPS, StepConfig
from pipeline.training.dispatch import DispatchSettings
from pipeline.registry.registration import RegisterConfig

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("params.yaml", "params-photos.yaml", "params-paper.yaml")
SECTION_READERS = {"foregrounds": CollectConfig, "composite": CompositeConfig, "crops": CropParams,
                   "evaluate": EvalConfig, "register": RegisterConfig}


@pytest.mark.parametrize("profile", PROFILES)
def test_every_section_of_every_profile_parses_through_its_dataclass(profile):
    params = load_params(ROOT / profile)
    for section, reader in SECTION_READERS.items():
        assert section in params, f"{profile}: no {section} section"
        reader.from_params(params)
    for step in STEPS:
        StepConfig.from_params(params, step)
    DispatchSettings.from_params(params, profile)
    collect, composite = CollectConfig.from_params(params), CompositeConfig.from_params(params)
    assert collect.seed == composite.seed == params["seed"]
    assert collect.val_fraction == params["foregrounds"]["val_fraction"]
    assert composite.max_side == params["composite"]["max_side"]


def test_absent_keys_take_the_dataclass_defaults_not_a_restated_copy():
    assert CollectConfig.from_params({"foregrounds": {}}) == CollectConfig()
    assert CompositeConfig.from_params({}) == CompositeConfig()


def test_a_bad_params_file_is_one_error_naming_it(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"list\.yaml: expected a mapping"):
        load_params(tmp_path / "list.yaml")
    with pytest.raises(FileNotFoundError, match=r"gone\.yaml"):
        load_params(tmp_path / "gone.yaml")


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "stages").glob("*.py")))
def test_stage_scripts_only_call_the_contract(script):
    """No stage parses YAML itself or builds a config from keys (`XConfig(seed=..., ...)`): it calls
    load_params and the section's from_params."""
    tree = ast.parse((ROOT / "stages" / script).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("safe_load", "load") and \
                isinstance(node.value, ast.Name) and node.value.id == "yaml":
            pytest.fail(f"stages/{script}:{node.lineno}: parses YAML itself; use fusionnet.io.params.load_params")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith(
                ("Config", "Params", "Settings")) and node.keywords:
            pytest.fail(f"stages/{script}:{node.lineno}: builds {node.func.id}(...) from keys; use "
                        f"{node.func.id}.from_params")
