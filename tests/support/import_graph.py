"""The import graph of the project's library code, read from the source (no import is executed).

    graph = module_graph(REPO, ("fusionnet", "pipeline"))
    graph.cycles()            # [["fusionnet.a", "fusionnet.b"], ...]: each strongly connected set of modules
    graph.function_level      # [(module, line, target), ...]: imports inside a function or method

Nodes are dotted module names of the files under the given top-level packages. An edge a -> b means
a imports b anywhere in its file (module level, inside functions, `importlib.import_module("b")`),
minus `if TYPE_CHECKING:` bodies, which never run. `from p import x` is an edge to p.x when that is a
module, else to p. Parent packages' __init__ files that Python runs on the way are not edges: only a
package named in the import itself is.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> list[tuple[ast.AST, bool]]:
    """(import node, inside a function) for every import that can run."""
    found: list[tuple[ast.AST, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append((node, in_function))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                found.append((node, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


@dataclass
class ModuleGraph:
    """Modules (dotted names) -> the in-graph modules they import, and where imports sit in functions."""

    files: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    function_level: list[tuple[str, int, str]] = field(default_factory=list)

    def cycles(self) -> list[list[str]]:
        """Every set of two or more modules that import each other, directly or through others
        (Tarjan's strongly connected components), each sorted; plus any module importing itself."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def strong(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for target in sorted(self.edges.get(node, ())):
                if target not in index:
                    strong(target)
                    low[node] = min(low[node], low[target])
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1 or node in self.edges.get(node, ()):
                    found.append(sorted(component))

        for node in sorted(self.files):
            if node not in index:
                strong(node)
        return sorted(found)

    def importers_of(self, prefix: str) -> dict[str, set[str]]:
        """Modules outside `prefix` (a module or package name) -> what they import inside it."""
        inside = lambda name: name == prefix or name.startswith(prefix + ".")  # noqa: E731
        return {source: {t for t in targets if inside(t)}
                for source, targets in self.edges.items()
                if not inside(source) and any(inside(t) for t in targets)}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph(root: Path, packages: tuple[str, ...]) -> ModuleGraph:
    """The graph of every .py file under root/<package> for each of `packages`."""
    files = {_module_name(root, path): path
             for package in packages for path in sorted((root / package).rglob("*.py"))}
    graph = ModuleGraph(files)
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node, in_function in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            wanted: list[str] = []
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files]
                wanted = subs if len(subs) == len(node.names) else [base, *subs]
            else:  # import_module / __import__ with a literal
                wanted = [node.args[0].value]
            for target in wanted:
                while target and target not in files and "." in target:  # `import a.b.func`-like names
                    target = target.rpartition(".")[0]
                if target in files and target != name:
                    targets.add(target)
                    if in_function:
                        graph.function_level.append((name, node.lineno, target))
        graph.edges[name] = targets
    return graph
