"""The data stages under real `dvc repro`: outputs appear, a re-run does nothing, and only the stages
whose params changed re-run (a training-only key re-runs no data stage)."""

from __future__ import annotations

import json

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA_STAGES = ("collect_foregrounds", "composite", "shard_crops")

pytestmark = pytest.mark.slow


def tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["foregrounds"]["source"] = "synthetic"
    params["foregrounds"]["synthetic"].update(count=6, size=[64, 64])
    params["composite"]["backgrounds"].update(source="builtin", count=4)
    params["composite"].update(bg_per_fg=1, bg_per_test_fg=1, max_side=96)
    params["crops"].update(sizes=[32], out_size=32, per_image=2, warmup_size=32, shard_rows=4)
    return params


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path_factory.mktemp("dvcproj")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "fusionnet", root / "fusionnet", ignore=ignore)
    shutil.copytree(ROOT / "stages", root / "stages", ignore=ignore)
    # only the data stages: later stages (training) would need models and code this test does not copy
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    missing = [name for name in DATA_STAGES if name not in pipeline["stages"]]
    assert not missing, f"dvc.yaml lacks data stage(s) {missing}"
    pipeline = {"stages": {name: pipeline["stages"][name] for name in DATA_STAGES}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(root),
               DVC_NO_ANALYTICS="1", DO_NOT_TRACK="true", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q"], [str(bin_dir / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, timeout=60)
    return root, env


def dvc(project: tuple[Path, dict], *args: str) -> str:
    root, env = project
    bin_dir = Path(sys.executable).parent
    result = subprocess.run([str(bin_dir / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_dvc_repro_runs_data_stages_once_and_only_when_their_params_change(project):
    root, _ = project
    output = dvc(project, "repro")
    assert ran_stages(output) == set(DATA_STAGES), output
    for path in ("data/foregrounds/manifest.parquet", "data/composites/manifest.parquet",
                 "data/shards/summary.json", "data/shards/train/shard-00000.parquet",
                 "data/shards/val/shard-00000.parquet", "dvc.lock"):
        assert (root / path).is_file(), path
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]["shard_crops"]["params"]["params.yaml"]) == {"seed", "crops"}

    output = dvc(project, "repro")
    assert ran_stages(output) == set(), output
    assert "up to date" in output.lower() or "didn't change" in output.lower(), output

    # training-only keys of the real params.yaml: the training stage declares them, no data stage does,
    # so nothing re-runs here
    real = yaml.safe_load((ROOT / "params.yaml").read_text())
    training = {"train_seg": "epochs", "train_common": "batch_size"}
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(training) <= set(declared["train_seg"]["params"]), declared["train_seg"]["params"]
    for section, key in training.items():
        assert key in real[section], f"params.yaml has no {section}.{key}"
        assert not any(section in stage["params"]["params.yaml"] for stage in lock["stages"].values()), section
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train_seg"]["epochs"] = real["train_seg"]["epochs"] + 2
    params["train_common"]["batch_size"] = real["train_common"]["batch_size"] + 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = dvc(project, "repro")
    assert ran_stages(output) == set(), output

    # a crops key re-runs shard_crops only, and the sampling the trainer reads follows it
    params["crops"]["rotation_deg"] = 7
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = dvc(project, "repro")
    assert ran_stages(output) == {"shard_crops"}, output
    assert json.loads((root / "data/shards/summary.json").read_text())["sampling"]["rotation_deg"] == 7
