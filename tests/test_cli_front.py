"""The `fusionnet` front ends as a user meets them (issue 27): help without torch, usage errors before
any work, the model file's own serving settings, and messages that say what happened."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_cli import cli_env, make_good, run_cli

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


# --------------------------------------------------------------------------------------------- usage before work


def test_out_that_cannot_be_created_is_a_usage_error(tiny_checkpoint, tmp_path):
    """Was a Python traceback (rc 1): a file where a parent folder should be."""
    good = make_good(tmp_path / "in")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("matte", good, "--model", tiny_checkpoint, "--out", blocker / "sub" / "out")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"error: --out {blocker / 'sub' / 'out'}: cannot be created: {blocker} is not a directory"
    assert "Traceback" not in result.stderr


def test_missing_inputs_are_reported_before_anything_is_created(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "nope.jpg"
    result = run_cli("matte", missing, "--model", tmp_path / "no-model.safetensors", "--out", out)
    # the model is never opened (it does not exist either): the input is what is reported, rc 2
    assert (result.returncode, result.stderr) == (2, f"error: {missing}: no such file\n")
    assert not out.exists()


def test_a_video_is_summarised_as_a_video(tiny_checkpoint, tmp_path):
    from tests.test_video import scene, write_clip

    clip = write_clip(tmp_path / "clip.mp4", (scene(i) for i in range(4)))
    result = run_cli("matte", clip, "--model", tiny_checkpoint, "--out", tmp_path / "out", "--max-side", "64")
    assert result.returncode == 0, result.stderr
    assert "matted 1 of 1 videos (0 failed)" in result.stdout


# --------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize(("extra", "message"), [
    (("--int8",), "error: --int8 needs --calibrate SHARDS_OR_IMAGE_DIR (training composites to calibrate on)\n"),
    (("--int8", "--calibrate", "{tmp}/no-shards"), "error: --calibrate {tmp}/no-shards: no such file or folder\n"),
    (("--verify-image", "{tmp}/no.png"), "error: --verify-image {tmp}/no.png: no such file or folder\n"),
])
def test_export_usage_errors_are_whole_lines_before_the_export(tiny_checkpoint, tmp_path, extra, message):
    """Each is one line ending in a newline, rc 2, nothing written, and answered before a minute of export."""
    out = tmp_path / "model.onnx"
    result = run_cli("export", tiny_checkpoint, "--format", "onnx", "--out", out,
                     *(e.format(tmp=tmp_path) for e in extra))
    assert (result.returncode, result.stderr) == (2, message.format(tmp=tmp_path))
    assert not out.exists()


def test_export_finds_its_photo_beside_the_project_not_the_current_folder(tmp_path, monkeypatch):
    from PIL import Image

    from fusionnet.onnx.export import find_verify_image

    photo = tmp_path / "shared" / "data" / "alphamatting-dev" / "image" / "GT01.png"
    photo.parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 100, 50)).save(photo)
    project = tmp_path / "project"
    (project / "docs" / "notes").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(project / "docs" / "notes")  # ../shared from here is project/docs/shared: not it
    image, name = find_verify_image()
    assert name == str(photo) and image.shape == (30, 40, 3)


# --------------------------------------------------------------------------------------------- serving settings


def test_a_model_trained_at_96_px_is_matted_at_96_unless_told(tmp_path):
    """The file's header carries max_side 96 (as training writes it): `fusionnet matte` without flags
    mattes at 96 (it used to take 800), `--max-side 800` overrides it, and `serve` reports 96 too."""
    import argparse
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from fusionnet.model import save
    from fusionnet.server import main as server
    from tests.support.helpers import tiny_net

    model = save(tiny_net(seed=4, narrow=True), tmp_path / "trained-at-96.safetensors", serving={"max_side": 96})
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(photo)
    alphas = {}
    for name, extra in {"default": (), "96": ("--max-side", "96"), "800": ("--max-side", "800")}.items():
        result = run_cli("matte", photo, "--model", model, "--out", tmp_path / name, "--precision", "fp32", *extra)
        assert result.returncode == 0, result.stderr
        alphas[name] = np.asarray(Image.open(tmp_path / name / "photo_alpha.png"), np.int32)
        if name == "default":
            assert f"note: max_side=96 from {model} (header serving)" in result.stderr
    assert np.array_equal(alphas["default"], alphas["96"])
    assert np.abs(alphas["default"] - alphas["800"]).mean() > 1  # the scale shows in the matte

    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    httpd = SimpleNamespace()
    service = server._load_service(parser.parse_args([str(model), "--threads", "1"]), httpd)
    try:
        assert httpd.health_info["max_side"] == 96
    finally:
        service.close()


# --------------------------------------------------------------------------------------------- threads


def test_matte_runs_on_a_worker_thread_with_the_process_thread_count():
    """As the server does (issue 27: from the main thread, the same threads ran 1.4-1.7x slower on a
    loaded CPU; benchmarks/bench_cli.py --busy): the work sees a worker thread and this process's
    torch thread count, its value comes back and its exceptions reach the caller."""
    import threading

    import torch

    from fusionnet.cli.matte import UsageError, _on_inference_thread

    def work(a, b):
        return threading.current_thread() is threading.main_thread(), torch.get_num_threads(), a + b

    assert _on_inference_thread(work, 2, 3) == (False, torch.get_num_threads(), 5)

    def fail():
        raise UsageError("nope")

    with pytest.raises(UsageError, match="nope"):
        _on_inference_thread(fail)
