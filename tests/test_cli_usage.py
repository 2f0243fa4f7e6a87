"""The real `fusionnet` CLI on usage errors (exit 2, a message naming the option, nothing written),
`--version`, the console script, and `--model` URIs through a resolver plugin.

Each usage error ends its command, so they run through `fusionnet.cli.main.main` one after another in one
process (one torch import, `usage_results`); `python -m fusionnet.cli.main` itself runs in tests/test_cli.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from fusionnet import __version__
from tests.test_cli import _bytes, cli_env, files_in, make_good, random_rgb, run_cli


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture
def good(tmp_path) -> Path:
    return make_good(tmp_path / "in")


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"fusionnet {__version__}"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "fusionnet"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (project not pip-installed here)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120, env=cli_env())
    assert result.stdout.strip() == f"fusionnet {__version__}"


USAGE_DRIVER = """
import contextlib, io, json, sys
from fusionnet.cli.main import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's own usage errors
            rc = exc.code
    results[name] = {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
sys.__stdout__.write(json.dumps(results))
"""
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def usage_results(checkpoint, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("usage")
    good = make_good(root / "in")
    unreadable = root / "in" / "bg.png"
    unreadable.write_text("not a picture\n")
    truncated = root / "in" / "bg_truncated.png"
    data = _bytes(Image.fromarray(random_rgb(40, 56, seed=8)), "PNG")
    truncated.write_bytes(data[: len(data) // 2])
    common = ["matte", str(good), "--model", str(checkpoint)]
    cases = {
        "no_command": [],
        "missing_model": ["matte", str(good), "--model", str(good.parent / "missing.safetensors"), "--out", str(root / "o1")],
        "not_a_model": ["matte", str(good), "--model", str(good), "--out", str(root / "o2")],
        "fp16_on_cpu": [*common, "--out", str(root / "o3"), "--device", "cpu", "--precision", "fp16"],
        "bad_colour": [*common, "--out", str(root / "o4"), "--save", "composite", "--background", "no-such-colour"],
        "unreadable_background": [*common, "--out", str(root / "o5"), "--save", "composite", "--background", str(unreadable)],
        "truncated_background": [*common, "--out", str(root / "o6"), "--save", "composite", "--background", str(truncated)],
        "no_resolver": ["matte", str(good), "--model", "testreg:/matting@champion", "--out", str(root / "o7")],
    }
    if NO_CUDA:
        cases["missing_gpu"] = [*common, "--out", str(root / "o8"), "--device", "cuda"]
    result = subprocess.run([sys.executable, "-c", USAGE_DRIVER, json.dumps(cases)], capture_output=True, text=True,
                            timeout=600, env=cli_env())
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(root=root, good=good, unreadable=unreadable, truncated=truncated, **json.loads(result.stdout))


def test_no_command_is_a_usage_error(usage_results):
    case = usage_results.no_command
    assert case["rc"] == 2 and "matte" in case["stderr"]


@pytest.mark.parametrize(
    ("case", "model", "problem"),
    [("missing_model", "missing.safetensors", "no such model file"), ("not_a_model", "good.png", "not a fusionnet model file")],
)
def test_bad_model_is_a_usage_error(usage_results, case, model, problem):
    result = getattr(usage_results, case)
    assert result["rc"] == 2
    assert f"error: --model {usage_results.good.parent / model}: {problem}" in result["stderr"]
    assert not (usage_results.root / ("o1" if case == "missing_model" else "o2")).exists()


def test_fp16_on_cpu_is_a_usage_error(usage_results):
    # --device cpu: an error whether or not a GPU is present
    case = usage_results.fp16_on_cpu
    assert case["rc"] == 2 and "fp16 needs a CUDA device; use bf16 on CPU" in case["stderr"]


@pytest.mark.skipif(not NO_CUDA, reason="--device cuda is valid on this machine (it has a CUDA GPU)")
def test_missing_gpu_is_a_usage_error(usage_results):
    case = usage_results.missing_gpu
    assert case["rc"] == 2 and "error: device 'cuda' requested but no CUDA GPU is available" in case["stderr"]


def test_bad_background_colour_is_a_usage_error(usage_results):
    case = usage_results.bad_colour
    assert case["rc"] == 2 and "neither an image file nor a colour" in case["stderr"]
    assert not (usage_results.root / "o4").exists()


@pytest.mark.parametrize(
    ("case", "problem"),
    [("unreadable_background", "not an image file"),
     ("truncated_background", "cannot decode image data, the file is truncated or corrupt")],
)
def test_unreadable_background_file_is_a_usage_error(usage_results, case, problem):
    result = getattr(usage_results, case)
    path = usage_results.unreadable if case == "unreadable_background" else usage_results.truncated
    assert result["rc"] == 2, result
    assert re.search(rf"^error: --background {re.escape(str(path))}: {problem}", result["stderr"], re.M), result
    assert result["stdout"] == ""
    assert not (usage_results.root / ("o5" if case == "unreadable_background" else "o6")).exists()  # no outputs


@pytest.mark.slow  # 30+ s on this host (one CLI start scanning entry points on an extra PYTHONPATH)
def test_model_uri_through_resolver_plugin(checkpoint, tmp_path, good, usage_results):
    """A distribution on PYTHONPATH registers a resolver for its own URI scheme (the project's own
    `models:` resolver may be installed too, so this test uses a scheme nobody else claims)."""
    site = tmp_path / "site"
    dist = site / "fusionnet_test_registry-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fusionnet-test-registry\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fusionnet.model_resolvers]\ntestreg = fusionnet_test_registry:resolve\n")
    (site / "fusionnet_test_registry.py").write_text(
        f"def resolve(spec):\n    assert spec == 'testreg:/matting@champion', spec\n    return {str(checkpoint)!r}\n"
    )
    env = cli_env(PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    result = run_cli("matte", good, "--model", "testreg:/matting@champion", "--out", out, env=env)
    assert result.returncode == 0, result.stderr
    assert files_in(out) == ["good_alpha.png"]
    without_plugin = usage_results.no_resolver
    assert without_plugin["rc"] == 2
    assert "no resolver for 'testreg:' model URIs is installed" in without_plugin["stderr"]
