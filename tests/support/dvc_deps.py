"""Which in-repo Python files a DVC stage's `cmd` runs: its entry and the transitive closure of imports.

Pure AST + shlex (no import of the code, no subprocess), so it is fast and never pulls in torch.

    graph = ImportGraph(REPO)
    files = graph.stage_files("python stages/train.py --step joint ...")   # {"stages/train.py", ...}
    missing = uncovered(files, stage["deps"])                             # [] when deps are complete

What counts as an import (everything that can run when the stage runs):
  - `import a.b.c` -> a/__init__.py, a/b/__init__.py, a/b/c.py (each package's __init__ runs);
  - `from a.b import c` -> a.b's files, plus a/b/c.py when c is a submodule;
  - relative imports (`from . import x`, `from ..m import y`), resolved against the file's package;
  - imports anywhere in the file, inside functions too (lazy imports run when the function does);
  - `importlib.import_module("lit")` / `import_module("lit", "pkg")` / `__import__("lit")`, literals only;
  - a list/tuple literal `[..., "-m", "pkg.mod", ...]` (a subprocess launch): pkg.mod's files and,
    for a package, its __main__.py, walked further as a new process.
Not counted: `if TYPE_CHECKING:` bodies (never executed), dynamic names ("pkg.mod:func" hook
strings, entry-point plugins), and anything resolving outside IN_REPO_DIRS (third party, tests/).
"""

from __future__ import annotations

import ast
import re
import shlex
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IN_REPO_DIRS = ("fusionnet", "pipeline", "stages")  # code DVC stages run; tests/ and third party are not deps
_PYTHON = re.compile(r"^python(\d+(\.\d+)*)?$")  # python, python3, python3.11 (any directory)
_OPTS_WITH_ARG = {"-X", "-W", "--check-hash-based-pycs"}  # interpreter options that take the next token


@dataclass(frozen=True)
class Entry:
    """What one `python ...` in a stage command runs: kind "script" (target = repo-relative path)
    or "module" (target = dotted name for `python -m`)."""

    kind: str
    target: str


def python_entries(cmd: str) -> list[Entry]:
    """Entries of every `python ...` in `cmd` (one command, or several joined by &&, ;, |).

    A `python -c` program cannot be analysed and raises ValueError, as does an unreadable command.
    """
    # any token named python counts (also after `env`, `timeout 600`, ...): missing one would hide deps
    tokens = shlex.split(cmd)
    return [_entry_after_python(tokens[i + 1:], cmd) for i, tok in enumerate(tokens) if _PYTHON.match(Path(tok).name)]


def _entry_after_python(args: list[str], cmd: str) -> Entry:
    skip_next = False
    for i, arg in enumerate(args):
        if skip_next:
            skip_next = False
        elif arg == "-m" and i + 1 < len(args):
            return Entry("module", args[i + 1])
        elif arg.startswith("-m") and len(arg) > 2:
            return Entry("module", arg[2:])
        elif arg == "-c" or (arg.startswith("-c") and len(arg) > 2):
            raise ValueError(f"cannot analyse a `python -c` program: {cmd!r}")
        elif arg in _OPTS_WITH_ARG:
            skip_next = True
        elif arg.startswith("-"):
            continue  # -u, -O, -B, -Xfoo ...
        else:
            return Entry("script", arg)
    raise ValueError(f"no script or -m module after python in {cmd!r}")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_executed(node: ast.AST) -> Iterator[ast.AST]:
    """ast.walk, minus the bodies of `if TYPE_CHECKING:` (their else branch is kept)."""
    todo = [node]
    while todo:
        current = todo.pop()
        yield current
        if isinstance(current, ast.If) and _is_type_checking(current.test):
            todo.extend(current.orelse)
            continue
        todo.extend(child for child in ast.iter_child_nodes(current) if not isinstance(child, ast.expr_context))


def _str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


@dataclass(frozen=True)
class _Imports:
    """What one file asks for: imports as (module, level, names) and `-m` launch module names."""

    imports: tuple[tuple[str, int, tuple[str, ...]], ...]
    launches: tuple[str, ...]


def _imports_in(path: Path) -> _Imports:
    """The imports and launches of one source file."""
    return _imports_of_source(path.read_text(encoding="utf-8"), str(path))


@cache  # keyed by the text, so an edited file is parsed again
def _imports_of_source(source: str, filename: str) -> _Imports:
    return _imports_of(ast.parse(source, filename=filename))


def _imports_of(tree: ast.Module) -> _Imports:
    imports: list[tuple[str, int, tuple[str, ...]]] = []
    launches: list[str] = []
    for node in _walk_executed(tree):
        if isinstance(node, ast.Import):
            imports.extend((alias.name, 0, ()) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imports.append((node.module or "", node.level, tuple(a.name for a in node.names if a.name != "*")))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            target = _str(node.args[0]) if node.args else None
            if name in ("import_module", "__import__") and target:
                package = _str(node.args[1]) if name == "import_module" and len(node.args) > 1 else None
                level = len(target) - len(target.lstrip("."))
                if level and package:  # import_module("..x", "a.b") == import a.x
                    base = package.split(".")[: len(package.split(".")) - (level - 1)]
                    imports.append((".".join(base + [target[level:]] if target[level:] else base), 0, ()))
                elif not level:
                    imports.append((target, 0, ()))
        elif isinstance(node, (ast.List, ast.Tuple)):
            values = [_str(elt) for elt in node.elts]
            launches.extend(mod for flag, mod in zip(values, values[1:]) if flag == "-m" and mod)
    return _Imports(tuple(imports), tuple(launches))


class ImportGraph:
    """Import resolution over a repository `root`: module names -> the in-repo files they execute.

    Files are returned as repo-relative POSIX strings ("pipeline/flows.py"); a module counts only
    when its file lies under one of `in_repo_dirs` of `root`.
    """

    def __init__(self, root: Path = REPO, in_repo_dirs: Iterable[str] = IN_REPO_DIRS) -> None:
        self.root = root.resolve()
        self.in_repo = tuple(self.root / d for d in in_repo_dirs)
        self._direct: dict[tuple[Path, tuple[Path, ...]], tuple[set[Path], list[str]]] = {}  # stages share most files

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _is_in_repo(self, path: Path) -> bool:
        return any(path.is_relative_to(d) for d in self.in_repo)

    def _chain(self, name: str, search: tuple[Path, ...]) -> list[Path]:
        """One path per leading part of `name` that resolves: a module file, a package's __init__.py, or
        the directory of a namespace package (no __init__.py). [] when the top level is not in-repo.

        The top-level name is looked up on the search roots in order (a module or regular package
        first, as Python prefers them); its submodules are looked up under the same root only.
        """
        parts = name.split(".")

        def resolve(base: Path, i: int, namespace_ok: bool) -> Path | None:
            stem = base.joinpath(*parts[: i + 1])
            for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
                if candidate.is_file():
                    return candidate
            return stem if namespace_ok and stem.is_dir() else None

        bases = [b for b in search if resolve(b, 0, False)] or [b for b in search if resolve(b, 0, True)]
        if not bases or not self._is_in_repo(resolve(bases[0], 0, True).resolve()):
            return []
        chain: list[Path] = []
        for i in range(len(parts)):
            found = resolve(bases[0], i, True)
            if found is None:
                break  # e.g. `from pkg.mod import func` asks for pkg.mod.func, which is no module
            chain.append(found.resolve())
        return chain

    def import_files(self, name: str, search: tuple[Path, ...]) -> list[Path]:
        """In-repo files that `import name` executes: each enclosing package's __init__.py, then the
        module (as far as the name resolves; namespace packages have no file)."""
        return [path for path in self._chain(name, search) if path.is_file()]

    def _package_of(self, path: Path, search: tuple[Path, ...]) -> str:
        """Dotted package a file belongs to (for relative imports); "" outside every search root."""
        for base in search:
            if path.is_relative_to(base):
                parts = list(path.relative_to(base).with_suffix("").parts)
                return ".".join(parts[:-1])  # pkg/mod.py -> pkg; pkg/__init__.py -> pkg too
        return ""

    def direct(self, path: Path, search: tuple[Path, ...]) -> tuple[set[Path], list[str]]:
        """(in-repo files imported by `path`, module names it launches with `-m`)."""
        if (path, search) not in self._direct:
            self._direct[path, search] = self._find_direct(path, search)
        return self._direct[path, search]

    def _find_direct(self, path: Path, search: tuple[Path, ...]) -> tuple[set[Path], list[str]]:
        found = _imports_in(path)
        files: set[Path] = set()
        for module, level, names in found.imports:
            if level:
                package = self._package_of(path, search).split(".")
                if level - 1 >= len(package) or not package[0]:
                    continue  # relative import beyond the top-level package: fails at run time
                base_parts = package[: len(package) - (level - 1)]
                module = ".".join(base_parts + ([module] if module else []))
            files.update(self.import_files(module, search))
            depth = len(module.split("."))
            for name in names:  # `from pkg import sub` imports pkg.sub when it is a module
                chain = self._chain(f"{module}.{name}", search)
                files.update(path for path in chain[depth:] if path.is_file())
        return files, list(found.launches)

    def module_launch(self, name: str) -> list[Path]:
        """Files `python -m name` runs: its packages' __init__.py and the module, or for a package its
        __init__.py and __main__.py; [] when `name` is not (entirely) an in-repo module."""
        chain = self._chain(name, (self.root,))
        if len(chain) != len(name.split(".")):
            return []
        last = chain[-1]
        if last.is_dir() or last.name == "__init__.py":  # a package: runpy runs its __main__
            main = (last if last.is_dir() else last.parent) / "__main__.py"
            if main.is_file():
                chain.append(main)
        return [path for path in chain if path.is_file()]

    def reach(self, entries: Iterable[Entry]) -> dict[str, str | None]:
        """In-repo files reachable from `entries` -> the file that first imports or launches it (None
        for an entry), breadth first, so following the links gives a shortest import chain."""
        todo: deque[tuple[Path, tuple[Path, ...], str | None]] = deque()
        for entry in entries:
            if entry.kind == "script":
                script = (self.root / entry.target).resolve()
                if script.is_file() and self._is_in_repo(script):  # sys.path[0] is the script's directory
                    todo.append((script, (script.parent, self.root), None))
            else:
                todo.extend((f, (self.root,), None) for f in self.module_launch(entry.target))
        seen: set[tuple[Path, tuple[Path, ...]]] = set()
        via: dict[str, str | None] = {}
        while todo:
            path, search, parent = todo.popleft()
            if (path, search) in seen:
                continue
            seen.add((path, search))
            rel = self._rel(path)
            via.setdefault(rel, parent)
            files, launches = self.direct(path, search)
            todo.extend((f, search, rel) for f in sorted(files))
            for name in launches:  # a subprocess: a fresh interpreter with the repo on its path
                todo.extend((f, (self.root,), rel) for f in self.module_launch(name))
        return via

    def closure(self, entries: Iterable[Entry]) -> set[str]:
        """Repo-relative in-repo files reachable from `entries` (entry scripts included)."""
        return set(self.reach(entries))

    def stage_files(self, cmd: str) -> set[str]:
        """In-repo files a stage command runs (entry scripts included)."""
        return self.closure(python_entries(cmd))


def import_chain(via: dict[str, str | None], path: str) -> str:
    """'stages/train.py -> pipeline/flows.py -> pipeline/tracking/runs.py': how `path` gets run."""
    chain = [path]
    while via.get(chain[-1]) is not None:
        chain.append(via[chain[-1]])
    return " -> ".join(reversed(chain))


def dep_paths(deps: Iterable[str | dict]) -> list[str]:
    """A stage's `deps` as normalised repo-relative paths (dict entries like {path: {...}} by key)."""
    paths: list[str] = []
    for dep in deps:
        for path in (dep if isinstance(dep, dict) else [dep]):
            path = str(path).strip()
            paths.append(path[2:] if path.startswith("./") else path.rstrip("/"))
    return paths


def uncovered(files: Iterable[str], deps: Iterable[str | dict]) -> list[str]:
    """Sorted `files` that no dep lists, neither itself nor a directory above it."""
    paths = dep_paths(deps)
    return sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in paths))
