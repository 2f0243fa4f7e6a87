"""dvc.yaml deps are complete: every in-repo Python file a stage's cmd runs (its entry script and
the transitive closure of its imports, lazy ones and `-m` subprocess launches included) is a dep,
so changing any of them makes DVC re-run the stage. Also: no listed code dep is stale (missing).

Pure AST + YAML (tests/support/dvc_deps.py): no import of the stage code, no subprocess.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.support.dvc_deps import IN_REPO_DIRS, REPO, Entry, ImportGraph, dep_paths, import_chain, python_entries, uncovered

STAGES: dict[str, dict] = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
GRAPH = ImportGraph(REPO)  # one graph for all stages: each file is parsed once


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_deps_list_every_in_repo_file_its_cmd_runs(name: str) -> None:
    stage = STAGES[name]
    entries = python_entries(stage["cmd"])
    assert entries, f"dvc.yaml stage {name!r}: no `python <script>` / `python -m <module>` in its cmd " \
                    f"{stage['cmd']!r}; teach tests/support/dvc_deps.py to read it"
    for entry in entries:
        if entry.kind == "script":
            assert (REPO / entry.target).is_file(), f"dvc.yaml stage {name!r} runs missing script {entry.target}"
        else:
            assert GRAPH.module_launch(entry.target), f"stage {name!r}: `-m {entry.target}` is no in-repo module"
    via = GRAPH.reach(entries)
    missing = uncovered(via, stage.get("deps", []))
    assert not missing, (
        f"dvc.yaml stage {name!r} runs these in-repo files but does not list them in its deps, so a change to "
        f"them would leave its outputs stale while DVC calls them up to date (import chain in brackets):\n"
        + "\n".join(f"  - {path}    [{import_chain(via, path)}]" for path in missing)
        + f"\nAdd them to stages.{name}.deps in dvc.yaml.")


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_code_deps_exist(name: str) -> None:
    code = [d for d in dep_paths(STAGES[name].get("deps", []))
            if d.endswith(".py") or d.split("/")[0] in IN_REPO_DIRS]
    stale = [d for d in code if not (REPO / d).exists()]
    assert not stale, f"dvc.yaml stage {name!r} lists code deps that do not exist (renamed or deleted?): {stale}"


def test_a_dropped_dep_fails_the_check() -> None:
    """The check on the real dvc.yaml: take one dep away and it is reported; a directory dep covers its files."""
    stage = STAGES["train_seg"]
    files = GRAPH.stage_files(stage["cmd"])
    assert {"stages/train.py", "pipeline/training/steps.py", "pipeline/training/step_main.py", "fusionnet/model/network.py"} <= files
    # the whole-pipeline flow and the evaluation are not run by a training stage: editing them retrains nothing
    assert not files & {"pipeline/flows.py", "pipeline/tasks.py", "fusionnet/evaluation/run.py"}
    before = uncovered(files, stage["deps"])  # [] unless the test above fails too (then it says what)
    dropped = [d for d in stage["deps"] if d != "pipeline/tracking/runs.py"]
    assert uncovered(files, dropped) == sorted(before + ["pipeline/tracking/runs.py"])
    as_directory = [d for d in stage["deps"] if not str(d).startswith("pipeline/")] + ["pipeline/"]
    assert not [f for f in uncovered(files, as_directory) if f.startswith("pipeline/")]


# --- the walker itself, on a tiny synthetic repository ----------------------------------------------

def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


SYNTHETIC = {
    "stages/run.py": "import sys\nimport numpy\nimport pkg.a\nfrom helper import h\nimport tests.t\n",
    "stages/helper.py": "def h():\n    pass\n",
    "pkg/__init__.py": "",
    "pkg/a.py": (
        "from __future__ import annotations\n"
        "import importlib, subprocess, sys\n"
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "from .sub import sub_function\n"
        "if TYPE_CHECKING:\n    from pkg import typing_only\n"
        "def lazy():\n    from pkg.lazy import f\n    return f\n"
        "def launch():\n"
        "    subprocess.run([sys.executable, '-m', 'pkg.launched', '--flag'])\n"
        "    subprocess.run([sys.executable, '-m', 'torch.distributed.run'])\n"
        "def dynamic():\n    return importlib.import_module('pkg.dyn'), importlib.import_module('.rel', 'pkg'), "
        "importlib.import_module('..b', 'pkg.sub')\n"
    ),
    "pkg/b.py": "", "pkg/lazy.py": "def f():\n    pass\n", "pkg/dyn.py": "", "pkg/rel.py": "",
    "pkg/typing_only.py": "", "pkg/unused.py": "",
    "pkg/sub/__init__.py": "def sub_function():\n    pass\n",
    "pkg/sub/deep.py": "from ..b import *\n", "pkg/sub/other.py": "",
    "pkg/launched.py": "from pkg.sub import deep, sub_function\n",
    "pkg/cli/__init__.py": "", "pkg/cli/__main__.py": "from .. import b\n",
    "nspkg/mod.py": "import pkg.b\n",  # a namespace package (no __init__.py)
    "tests/__init__.py": "", "tests/t.py": "import pkg.unused\n",
}


@pytest.fixture
def synthetic(tmp_path: Path) -> ImportGraph:
    write(tmp_path, SYNTHETIC)
    return ImportGraph(tmp_path, in_repo_dirs=("pkg", "nspkg", "stages"))


def test_walker_follows_relative_lazy_dynamic_and_launched_imports(synthetic: ImportGraph) -> None:
    via = synthetic.reach(python_entries("python stages/run.py --x 1"))
    assert set(via) == {
        "stages/run.py", "stages/helper.py",  # the script's own directory is on sys.path
        "pkg/__init__.py", "pkg/a.py", "pkg/b.py",  # package __init__, relative `from . import b`
        "pkg/sub/__init__.py",  # `from .sub import sub_function`: a function, so only the package
        "pkg/lazy.py",  # import inside a function
        "pkg/dyn.py", "pkg/rel.py",  # importlib.import_module literals, absolute and relative
        "pkg/launched.py", "pkg/sub/deep.py",  # [sys.executable, "-m", "pkg.launched"], then `from pkg.sub import deep`
    }  # not: typing_only (TYPE_CHECKING), unused, numpy / torch (third party), tests/ (not in-repo)
    assert import_chain(via, "pkg/sub/deep.py") == "stages/run.py -> pkg/a.py -> pkg/launched.py -> pkg/sub/deep.py"


def test_walker_runs_a_package_main_and_namespace_packages(synthetic: ImportGraph) -> None:
    assert synthetic.stage_files("python -m pkg.cli") == {"pkg/__init__.py", "pkg/cli/__init__.py",
                                                           "pkg/cli/__main__.py", "pkg/b.py"}
    assert synthetic.stage_files("python -m nspkg.mod") == {"nspkg/mod.py", "pkg/__init__.py", "pkg/b.py"}
    assert synthetic.module_launch("pkg.missing") == [] and synthetic.module_launch("tests.t") == []


def test_walker_sees_a_new_import_in_the_chain(synthetic: ImportGraph, tmp_path: Path) -> None:
    """A lazy import added deep in the chain shows up as a missing dep of the stage."""
    deps = sorted(synthetic.stage_files("python stages/run.py"))
    write(tmp_path, {"pkg/b.py": "def g():\n    import pkg.unused\n"})
    fresh = ImportGraph(tmp_path, in_repo_dirs=("pkg", "nspkg", "stages"))
    assert uncovered(fresh.stage_files("python stages/run.py"), deps) == ["pkg/unused.py"]


def test_python_entries_reads_folded_chained_and_flagged_commands() -> None:
    folded = yaml.safe_load("cmd: >-\n  python stages/a.py --x 1\n  --y 2\n")["cmd"]
    assert python_entries(folded) == [Entry("script", "stages/a.py")]
    assert python_entries("FOO=1 python3.11 -u -X dev stages/a.py && .venv/bin/python -mpkg.b --z") == [
        Entry("script", "stages/a.py"), Entry("module", "pkg.b")]
    assert python_entries("python -W ignore -m pkg.c") == [Entry("module", "pkg.c")]
    assert python_entries("dvc exp show") == []
    with pytest.raises(ValueError, match="python -c"):
        python_entries("python -c 'import pkg'")


def test_uncovered_matches_files_and_directories_not_prefixes() -> None:
    files = ["pkg/a.py", "pkg/sub/c.py", "pkgx/y.py", "stages/s.py"]
    assert uncovered(files, ["./stages/s.py", "pkg/sub/", {"pkg/a.py": {"cache": False}}]) == ["pkgx/y.py"]
    assert uncovered(files, ["pkg"]) == ["pkgx/y.py", "stages/s.py"]


# What a stage runs decides what re-runs it (issue 24): an int8 or ONNX edit must not re-train the
# model, a video-smoothing edit must not re-register it.
NOT_IN_TRAINING = ("fusionnet/inference/", "fusionnet/onnx/", "fusionnet/cli/", "fusionnet/server/",
                   "fusionnet/video/", "fusionnet/evaluation/", "pipeline/registry/")
NOT_IN_EVALUATION = ("fusionnet/cli/", "fusionnet/server/", "fusionnet/video/", "fusionnet/train/loop.py")


@pytest.mark.parametrize("name", ["train_seg", "train_fusion", "train_joint", "evaluate", "register"])
def test_stages_run_only_the_code_of_their_role(name: str) -> None:
    via = GRAPH.reach(python_entries(STAGES[name]["cmd"]))
    banned = NOT_IN_TRAINING if name.startswith("train_") else NOT_IN_EVALUATION
    wrong = sorted(f for f in via if f.startswith(banned))
    assert not wrong, f"stage {name!r} runs code outside its role:\n" + "\n".join(
        f"  - {import_chain(via, f)}" for f in wrong)
    if not name.startswith("train_"):
        assert {"fusionnet/inference/matter.py", "fusionnet/evaluation/rows.py"} <= set(via) or name == "register"
