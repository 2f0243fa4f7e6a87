"""Which MLflow store a command uses: one rule for every lookup, download, cache key and logged run.

1. `MLFLOW_TRACKING_URI` when set (a tracking server, or any store you name);
2. else `<project>/mlflow.db` (SQLite; artifacts in `<project>/mlartifacts`) of the project being run:
   - FUSIONNET_PROJECT (what `fusionnet pull/matte --project DIR` sets; a pipeline run exports it to
     its step processes so they log where their parent run is),
   - else DVC_ROOT (inside a DVC stage: the repository `dvc repro` / `dvc exp run` runs, also for a
     `--temp` or queued experiment, whose DVC_ROOT is the parent repository),
   - else the nearest folder, from the current one upwards, that holds `dvc.yaml`, `.dvc/` or `.git`
     (a folder inside `<repo>/.dvc/tmp/exps/` counts as `<repo>`: DVC's temporary experiment copies).

Never the checkout the package is installed from: an editable install from one clone must not log into
or read from that clone's store while another project is run. A lookup never creates a store
(`tracking_uri(must_exist=True)`: opening a missing SQLite file would create an empty one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

PROJECT_ENV = "FUSIONNET_PROJECT"
STORE_FILE = "mlflow.db"
PROJECT_MARKERS = ("dvc.yaml", ".dvc", ".git")  # any of them marks a project's top folder


class NoStoreError(LookupError):
    """No MLflow store for this command: no MLFLOW_TRACKING_URI, and no project (or no mlflow.db in it)."""


def find_project(start: str | os.PathLike) -> Path | None:
    """The nearest folder from `start` upwards holding one of PROJECT_MARKERS, or None.

    A DVC temporary experiment workspace (`<repo>/.dvc/tmp/exps/...`) resolves to `<repo>`.
    """
    start = Path(start).resolve()
    parts = start.parts
    for index in range(len(parts) - 2):  # <repo>/.dvc/tmp/exps/... -> <repo>
        if parts[index : index + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:index])
    for folder in (start, *start.parents):
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            return folder
    return None


def project_dir(environ: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None) -> Path | None:
    """The project whose store is used (module doc, rule 2): FUSIONNET_PROJECT, DVC_ROOT, else found
    from `cwd` (default: the current folder) upwards; None outside any project."""
    env = os.environ if environ is None else environ
    for name in (PROJECT_ENV, "DVC_ROOT"):
        if env.get(name):
            return Path(env[name]).expanduser().resolve()
    return find_project(Path.cwd() if cwd is None else cwd)


def where_looked(environ: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None) -> str:
    """What the rule looked at, for an error message."""
    env = os.environ if environ is None else environ
    for name in (PROJECT_ENV, "DVC_ROOT"):
        if env.get(name):
            return f"{name}={env[name]}"
    here = Path.cwd() if cwd is None else Path(cwd)
    return f"{here.resolve()} and the folders above it (a project holds {', '.join(PROJECT_MARKERS)})"


HOW_TO_POINT = f"set MLFLOW_TRACKING_URI (e.g. sqlite:////path/to/project/{STORE_FILE} or http://host:5000), " \
               "run from inside the project, or give --project DIR"


def tracking_uri(must_exist: bool = False, environ: Mapping[str, str] | None = None,
                 cwd: str | os.PathLike | None = None) -> str:
    """The store's URI by the module's rule.

    must_exist: a lookup (pull, a `models:/` URI): raise NoStoreError when the project has no
    mlflow.db yet instead of naming a file that opening would create. Without a project (and no
    MLFLOW_TRACKING_URI), NoStoreError always: there is no folder a store belongs in.
    """
    env = os.environ if environ is None else environ
    if env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    root = project_dir(env, cwd)
    if root is None:
        raise NoStoreError(f"no MLflow store found: MLFLOW_TRACKING_URI is not set and no project was found in "
                           f"{where_looked(env, cwd)}; {HOW_TO_POINT}")
    db = root / STORE_FILE
    if must_exist and not db.is_file():
        raise NoStoreError(f"no MLflow store found: {db} does not exist (project {root}, from "
                           f"{where_looked(env, cwd)}); {HOW_TO_POINT}")
    return f"sqlite:///{db}"
