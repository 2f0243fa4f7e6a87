"""The library's import graph: no cycles (imports inside functions included), and the CLI and the
server are leaves that nothing else in fusionnet/ or pipeline/ imports (issue 24)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.import_graph import module_graph

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fusionnet", "pipeline")
FRONT_ENDS = ("fusionnet.cli", "fusionnet.server")
ENTRY_POINTS = {"fusionnet.__main__"}  # `python -m fusionnet` is the CLI


@pytest.fixture(scope="module")
def graph():
    return module_graph(ROOT, PACKAGES)


def test_the_graph_sees_every_module_and_the_real_imports(graph):
    assert len(graph.files) == sum(1 for package in PACKAGES for _ in (ROOT / package).rglob("*.py"))
    assert "fusionnet.model.network" in graph.edges["fusionnet.model.checkpoint"]
    assert "fusionnet.inference.network" in graph.edges["fusionnet.inference.precision"]
    # a function-level import counts: the CLI loads the server only for `fusionnet serve`
    assert ("fusionnet.cli.main", "fusionnet.server.main") in {(a, b) for a, _, b in graph.function_level}


def test_no_import_cycles(graph):
    cycles = graph.cycles()
    assert not cycles, "modules that import each other (directly or through others; imports inside functions " \
                       "count too):\n" + "\n".join("  " + " <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_nothing_but_the_front_ends_imports_the_cli_or_the_server(graph, front_end):
    importers = {source: sorted(targets) for source, targets in graph.importers_of(front_end).items()
                 if source not in ENTRY_POINTS and not any(source.startswith(f + ".") for f in FRONT_ENDS)}
    assert not importers, f"{front_end} is imported from elsewhere in the library: {importers}"


def test_a_cycle_made_on_purpose_is_found(tmp_path):
    """The graph is built from source, so a planted cycle through a function-level and a relative
    import is caught, with its members named; TYPE_CHECKING imports are not edges."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .c import g\n    return g\n")
    (pkg / "sub" / "c.py").write_text("import importlib\n\ndef g():\n    return importlib.import_module('pkg.a')\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    graph = module_graph(tmp_path, ("pkg",))
    assert graph.cycles() == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]
    assert graph.edges["pkg.d"] == set()
    (pkg / "sub" / "c.py").write_text("def g():\n    return 1\n")
    assert module_graph(tmp_path, ("pkg",)).cycles() == []
