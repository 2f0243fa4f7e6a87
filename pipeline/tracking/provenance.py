"""Where a run came from: flattened params, git commit, DVC data version, pipeline-run identity.

A "pipeline run" is one `dvc repro` (or one Prefect `train` flow run): its DVC stages run as
separate processes, and each needs the same MLflow parent run. The identity is, in order:
  1. FUSIONNET_PIPELINE_RUN, any string the caller exports (e.g. `make run` sets a timestamp);
  2. inside a DVC stage (DVC sets DVC_STAGE), the `dvc` process that runs the stages: its pid,
     start time and host, which every stage of one `dvc repro` shares;
  3. otherwise None: the caller starts a new parent run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fusionnet.io.hashing import file_sha256
from pipeline.env import PROJECT_DIR
from pipeline.tracking.store import project_dir

PIPELINE_RUN_ENV = "FUSIONNET_PIPELINE_RUN"


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"}; lists and scalars become their YAML-ish string form.

    >>> flatten_params({"train_seg": {"base_lr": 0.01, "sizes": [1, 2]}, "seed": 0})
    {'train_seg.base_lr': '0.01', 'train_seg.sizes': '[1, 2]', 'seed': '0'}
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None else str(value)
    return flat


def git_commit(project_dir: Path) -> tuple[str | None, bool]:
    """(HEAD commit, whether tracked files differ from it); (None, False) outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return head, bool(status.strip())


def dvc_md5(shards_dir: Path, dvc_root: Path) -> str | None:
    """The md5 DVC recorded for `shards_dir` (e.g. "ab12...dir"): the output entry of the stage
    that produces it in dvc.lock, else its `.dvc` file (`dvc add`). None when DVC has no record.

    DVC writes a stage's lock entry as soon as the stage finishes, so inside `dvc repro` this is
    the version of the shards the training stages read.
    """
    target = Path(shards_dir).resolve()
    records: list[dict] = []
    try:
        lock = dvc_root / "dvc.lock"
        if lock.is_file():
            for stage in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).values():
                records += [dict(out, base=dvc_root) for out in stage.get("outs") or []]
        dvc_file = target.with_name(target.name + ".dvc")
        if dvc_file.is_file():
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
            records += [dict(out, base=dvc_file.parent) for out in outs]
    except (OSError, yaml.YAMLError):
        return None
    for out in records:
        if (out["base"] / out.get("path", "")).resolve() == target:
            return out.get("md5")
    return None


def content_sha256(directory: Path) -> str:
    """sha256 over (relative path, sha256 of contents) of every file under `directory`, sorted.

    The fallback data version when dvc.lock has no entry (e.g. a Prefect run outside DVC); reads
    every byte, so it costs one pass over the data.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(directory).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def data_version_tags(shards_dir: Path, dvc_root: Path) -> dict[str, str]:
    """Tags naming the training data: DVC's md5 of the shards (or our content hash) and row counts."""
    shards_dir = Path(shards_dir)
    tags: dict[str, str] = {"fusionnet.data.path": str(shards_dir)}
    md5 = dvc_md5(shards_dir, dvc_root)
    if md5 is not None:
        tags["fusionnet.data.dvc_md5"] = md5
    elif shards_dir.is_dir():
        tags["fusionnet.data.sha256"] = content_sha256(shards_dir)
    summary = shards_dir / "summary.json"
    if summary.is_file():
        tags["fusionnet.data.summary"] = summary.read_text()[:8000]  # MLflow's tag value limit
    return tags


def project_root(environ: Mapping[str, str] | None = None) -> Path:
    """The DVC project the run belongs to: DVC_ROOT inside a DVC stage (which may be a `dvc exp`
    workspace copy), else the project being run (pipeline.tracking.store.project_dir: the one whose
    MLflow store the run logs to), else the checkout holding this package."""
    env = os.environ if environ is None else environ
    if env.get("DVC_ROOT"):
        return Path(env["DVC_ROOT"])
    return project_dir(env) or PROJECT_DIR


def _dvc_process_identity() -> str | None:
    """'dvc-<host>-<pid>-<start time>' of the nearest `dvc` ancestor process, or None."""
    try:
        import psutil  # a dependency of dvc, so present wherever DVC runs our stages
    except ImportError:
        return None
    try:
        for proc in psutil.Process().parents():
            cmdline = proc.cmdline()
            names = [Path(arg).name for arg in cmdline[:3]]
            if "dvc" in names or cmdline[1:3] == ["-m", "dvc"]:
                return f"dvc-{socket.gethostname()}-{proc.pid}-{int(proc.create_time() * 1000)}"
    except (psutil.Error, OSError):
        return None
    return None


def pipeline_run_key(environ: Mapping[str, str] | None = None) -> str | None:
    """The identity of the current pipeline run (see module doc), or None for a standalone run."""
    env = os.environ if environ is None else environ
    if env.get(PIPELINE_RUN_ENV):
        return env[PIPELINE_RUN_ENV]
    if env.get("DVC_STAGE"):
        return _dvc_process_identity()
    return None


