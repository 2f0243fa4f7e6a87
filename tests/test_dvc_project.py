"""The repository as a DVC project: a fresh `git clone` answers `dvc dag` and `dvc status` (the DVC
config is committed), and the metrics DVC compares stay few enough to read at 120 columns."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                DO_NOT_TRACK="true", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                GIT_COMMITTER_EMAIL="t@t", COLUMNS="120")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)


def test_fresh_clone_is_a_dvc_project(tmp_path):
    """What `git clone` gives (committed HEAD, no untracked leftovers) is a DVC repository."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, capture_output=True, timeout=120)
    assert (clone / ".dvc" / "config").is_file(), "the DVC config is not committed"
    stages = list(yaml.safe_load((clone / "dvc.yaml").read_text())["stages"])

    dag = _run([str(BIN / "dvc"), "dag", "--md"], clone)
    assert dag.returncode == 0, dag.stderr
    for stage in stages:
        assert stage in dag.stdout
    status = _run([str(BIN / "dvc"), "status"], clone)
    assert status.returncode == 0, status.stderr
    assert "collect_foregrounds" in status.stdout  # nothing built yet: every stage is out of date
    # the committed config is what the project wants: no analytics, no remote on someone's machine
    config = _run([str(BIN / "dvc"), "config", "--list", "--project"], clone)
    assert "core.analytics=false" in config.stdout
    assert "remote" not in config.stdout
    # running dvc in the clone leaves nothing for git to add (tmp/ and cache/ are ignored)
    assert _run(["git", "status", "--porcelain"], clone).stdout == ""


# Stands in for `evaluate`: the headline files from fusionnet.evaluation.outputs, numbers moved by one param.
_FAKE_EVALUATE = """
import json, yaml
from fusionnet.evaluation.outputs import write_headline_metrics
t = 1 + yaml.safe_load(open("params.yaml"))["evaluate"]["pictures"] / 10
def regions(names, base):
    return {r: {"sad": base * (i + 1), "mse": base / 70, "grad": 1.0, "conn": 1.0} for i, r in enumerate(names)}
record = {"evaluate": {row: regions(["band", "full"], 6.4 * t + k) for k, row in enumerate(("raw", "refined"))},
          "photos": {"rows": {row: regions(["trimap1", "trimap2", "full"], 32 * t + k) for k, row in enumerate(("raw", "refined"))}}}
write_headline_metrics(record, "metrics")
"""


def test_exp_show_and_metrics_diff_read_at_120_columns(tmp_path):
    """Two experiments on this project's metrics declarations and evaluate params: `dvc exp show
    --only-changed` shows the changed param and the headline metrics, and with `dvc metrics diff`
    fits 120 columns (DVC prints a column per metric key: the full table made 300+)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]
    (repo / "fake_evaluate.py").write_text(_FAKE_EVALUATE)
    pipeline = {"stages": {"evaluate": {"cmd": f"{sys.executable} fake_evaluate.py", "deps": ["fake_evaluate.py"],
                                        "params": stage["params"], "metrics": stage["metrics"]}}}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    env = dict(_env(), PYTHONPATH=str(ROOT))
    for cmd in (["git", "init", "-q"], ["dvc", "repro", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "base"],
                ["dvc", "exp", "run", "-q", "-n", "exp-lower", "-S", "evaluate.pictures=1"]):
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (cmd, done.stdout, done.stderr)

    def dvc(*args):
        done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    # --drop matches column names' starts: the SAD columns of the composites (the README's command)
    shown = dvc("exp", "show", "--only-changed", "--no-pager", "--drop", "Created|photo_|.*mse|.*/")
    assert "evaluate.pictures" in shown and "raw.sad25" in shown and "refined.sad" in shown and "mse" not in shown
    assert "…" not in shown  # rich cuts a cell that does not fit COLUMNS=120
    assert "closed_form_max_side" not in shown and "implicit_trimap_threshold" not in shown  # unchanged params are hidden
    assert max(map(len, shown.splitlines())) <= 120, shown
    dvc("exp", "apply", "exp-lower")
    diff = dvc("metrics", "diff")
    assert "photo_raw.sad_t1" in diff and "raw.sad25" in diff
    assert max(map(len, diff.splitlines())) <= 120, diff
    print(shown, diff, sep="\n")
