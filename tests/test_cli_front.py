"""The `fusionnet` front ends as a user meets them (issue 27): help without torch, usage errors before
any work, the model file's own serving settings, and messages that say what happened."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_cli import cli_env, run_cli

HEAVY = ("torch", "torchvision", "cv2", "numpy", "PIL", "onnxruntime")
NO_HEAVY_IMPORTS = """
import sys
from fusionnet.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("imported:", *sorted(m for m in {heavy!r} if m in sys.modules), "rc:", code)
"""


@pytest.mark.parametrize("argv", [
    ["--help"], ["matte", "--help"], ["serve", "--help"], ["export", "--help"], ["pull", "--help"],
    ["matte", "x.png", "--model", "m.safetensors", "--max-side", "abc"],  # an argument error
    ["matte", "x.png"],  # a missing required option
])
def test_help_and_argument_errors_answer_before_heavy_imports(argv):
    """`--help` took 6-8 s importing torch: the parser and its defaults import the standard library only."""
    result = subprocess.run([sys.executable, "-c", NO_HEAVY_IMPORTS.format(heavy=HEAVY), *argv],
                            capture_output=True, text=True, timeout=120, env=cli_env())
    assert result.stdout.strip().splitlines()[-1] == f"imported: rc: {0 if argv[-1] == '--help' else 2}", result


def test_matte_help_through_the_real_command():
    result = run_cli("matte", "--help")
    assert result.returncode == 0 and "--max-side" in result.stdout and "(default: the model's setting" in result.stdout
