"""ONNX export and ONNX Runtime inference (fusionnet.onnx.export, onnx_runtime, onnx_quantize).

One narrow tiny densenet121 (pretrained=False) is exported once for the module: the dynamo
exporter takes ~1-3 min on a loaded 2-core host, so the tests that need it are slow-marked.
The real-photo int8 bound (densenet201 / trained checkpoint) is measured by the benchmark, not here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")

# int8 (ORT static QDQ) vs fp32 on the tiny random net: measured ~0.003 mean |d alpha| at 160 px.
TINY_INT8_MEAN_BOUND = 0.02


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour blobs plus noise, `(H,W,3)` float32 in [0,1]."""
    y, x = np.mgrid[0:height, 0:width] / 17.0
    base = np.stack([np.sin(x + y), np.cos(1.3 * x - y), np.sin(0.4 * x * y)], -1) * 0.4 + 0.5
    noise = np.random.default_rng(seed).normal(0, 0.05, base.shape)
    return np.clip(base + noise, 0, 1).astype(np.float32)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, one_thread):
    """(torch model, its .safetensors file, its fp32 .onnx export)."""
    from fusionnet.model import save
    from fusionnet.onnx.export import export_onnx
    from tests.support.helpers import tiny_net

    folder = tmp_path_factory.mktemp("onnx")
    model = tiny_net(narrow=True)
    weights = save(model, folder / "tiny.safetensors")
    onnx_path = export_onnx(model, folder / "tiny.onnx", source_sha256=_sha(weights))
    return model, weights, onnx_path


@pytest.mark.slow
def test_export_matches_pytorch_at_two_sizes_with_padding(exported):
    """Sizes not multiples of 32 (Matter's reflection padding) and two different H,W (dynamic axes),
    plus a batch of two (dynamic N): ONNX Runtime alpha/fg/bg = PyTorch fp32 up to float rounding."""
    from fusionnet.inference.matter import Matter
    from fusionnet.onnx.runtime import OnnxMatter, read_metadata

    model, _, onnx_path = exported
    meta = read_metadata(onnx_path)
    assert meta["opset"] == "20" and meta["precision"] == "fp32" and meta["stride"] == "32"
    assert json.loads(meta["config"]) == model.config
    for size, side in (((70, 45), 70), ((100, 130), 130)):
        image = _image(*size, seed=size[0])
        ours = OnnxMatter(onnx_path, device="cpu", max_side=side, refine=False)(image)
        ref = Matter(model, device="cpu", precision="fp32", max_side=side, refine=False)(image)
        assert ours.network_size == ref.network_size == size
        for name in ("raw_alpha", "fg_prob", "bg_prob"):
            diff = np.abs(getattr(ours, name) - getattr(ref, name))
            assert diff.max() < 1e-4, (size, name, diff.max())
        assert ref.raw_alpha.std() > 1e-3  # a matte that varies, so the comparison means something
    pair = [_image(64, 96, 1), _image(64, 96, 2)]
    batch = OnnxMatter(onnx_path, device="cpu", max_side=96, refine=False).matte_batch(pair)
    ref = Matter(model, device="cpu", precision="fp32", max_side=96, refine=False).matte_batch(pair)
    for ours_one, ref_one in zip(batch, ref):
        assert np.abs(ours_one.raw_alpha - ref_one.raw_alpha).max() < 1e-4


@pytest.mark.slow
def test_fusionnet_matte_with_an_onnx_model(exported, tmp_path, capsys):
    """`fusionnet matte --model x.onnx` writes the same PNGs as the .safetensors model (within 1/255)
    and says on stderr that ONNX Runtime ran and that --precision does not apply."""
    from PIL import Image

    from fusionnet.cli import main as cli

    _, weights, onnx_path = exported
    photo = tmp_path / "photo.png"
    Image.fromarray((_image(90, 75) * 255).astype(np.uint8)).save(photo)
    common = [str(photo), "--max-side", "96", "--save", "alpha", "trimap"]
    assert cli.main(["matte", *common, "--model", str(onnx_path), "--out", str(tmp_path / "onnx"),
                     "--precision", "bf16"]) == 0
    err = capsys.readouterr().err
    assert "device: cpu (onnxruntime CPUExecutionProvider, fp32 tiny.onnx)" in err
    assert "--precision bf16 does not apply to an ONNX model" in err
    assert cli.main(["matte", *common, "--model", str(weights), "--precision", "fp32",
                     "--out", str(tmp_path / "torch")]) == 0
    for kind in ("alpha", "trimap"):
        ours = np.asarray(Image.open(tmp_path / "onnx" / f"photo_{kind}.png"), dtype=int)
        ref = np.asarray(Image.open(tmp_path / "torch" / f"photo_{kind}.png"), dtype=int)
        assert ours.shape == ref.shape == (90, 75)
        assert np.abs(ours - ref).max() <= 1, kind


def test_export_of_a_bad_model_file_is_a_clear_error(tmp_path, capsys):
    """Not a model file: exit 2, the error names the file, nothing (not even a temp file) is left."""
    from fusionnet.cli import main as cli

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    out = tmp_path / "out" / "model.onnx"
    assert cli.main(["export", str(bad), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and "not a fusionnet model file" in err
    assert not out.parent.exists()  # not even the folder
    assert cli.main(["export", str(tmp_path / "missing.safetensors"), "--format", "onnx", "--out", str(out)]) == 2
    assert "no such model file" in capsys.readouterr().err
    assert cli.main(["export", str(bad), "--format", "onnx", "--out", str(out), "--int8"]) == 2
    assert "--int8 needs --calibrate" in capsys.readouterr().err


def test_an_unusable_onnx_file_is_a_usage_error(tmp_path, capsys):
    """`fusionnet matte --model broken.onnx`: exit 2 naming the file, before any input is touched."""
    from fusionnet.cli import main as cli

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00 not protobuf")
    photo = tmp_path / "p.png"
    from PIL import Image

    Image.fromarray((_image(40, 40) * 255).astype(np.uint8)).save(photo)
    assert cli.main(["matte", str(photo), "--model", str(broken), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error: --model" in err and str(broken) in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_failed_check_leaves_no_file(exported, tmp_path, monkeypatch, capsys):
    """The export is checked against PyTorch: beyond --tolerance the command fails (exit 1) and
    writes nothing. (The export itself is the module's, copied, to keep this test short.)"""
    import fusionnet.onnx.export as onnx_export
    from fusionnet.cli import main as cli

    _, weights, onnx_path = exported
    monkeypatch.setattr(onnx_export, "export_onnx", lambda model, out, **kw: Path(shutil.copyfile(onnx_path, out)))
    out = tmp_path / "dest" / "model.onnx"
    args = ["export", str(weights), "--format", "onnx", "--out", str(out), "--verify-side", "64"]
    assert cli.main([*args, "--tolerance", "1e-12"]) == 1
    err = capsys.readouterr().err
    assert "check fp32: ONNX Runtime vs PyTorch fp32 alpha at 64x" in err and "nothing written" in err
    assert list((tmp_path / "dest").iterdir()) == []
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "ONNX opset 20, fp32" in captured.out and out.is_file()
    assert list((tmp_path / "dest").iterdir()) == [out]


@pytest.mark.slow
def test_export_int8_scheme_decides_what_is_quantised(exported, tmp_path, monkeypatch, capsys):
    """`export --int8` defaults to the accurate scheme (decoders fp32, convolutions only) and says so;
    `--int8-scheme fast` quantises the decoders too. (The fp32 export is the module's, copied.)"""
    import onnx
    from PIL import Image

    import fusionnet.onnx.export as onnx_export
    from fusionnet.cli import main as cli
    from fusionnet.onnx.quantize import in_scopes
    from fusionnet.onnx.runtime import read_metadata

    _, weights, onnx_path = exported
    monkeypatch.setattr(onnx_export, "export_onnx", lambda model, out, **kw: Path(shutil.copyfile(onnx_path, out)))
    folder = tmp_path / "calibration"
    folder.mkdir()
    for i in range(2):
        Image.fromarray((_image(96, 96, seed=40 + i) * 255).astype(np.uint8)).save(folder / f"c{i}.png")
    decoder = set(in_scopes(onnx.load(str(onnx_path)), ["model.fg_decoder", "model.bg_decoder"]))
    int8_decoder_convs = {}
    for scheme in ("default", "fast"):
        out = tmp_path / f"{scheme}.onnx"
        extra = [] if scheme == "default" else ["--int8-scheme", scheme]
        assert cli.main(["export", str(weights), "--format", "onnx", "--out", str(out), "--verify-side", "64",
                         "--int8", "--calibrate", str(folder), *extra]) == 0
        captured = capsys.readouterr()
        said = captured.out + captured.err
        assert f"int8 ({'accurate' if scheme == 'default' else scheme} scheme" in said
        assert read_metadata(out)["precision"] == "int8"
        graph = onnx.load(str(out)).graph
        made = {o for n in graph.node for o in n.output}
        int8_decoder_convs[scheme] = sum(n.op_type == "Conv" and n.name in decoder and n.input[1] in made
                                         for n in graph.node)
    assert int8_decoder_convs["default"] == 0 and int8_decoder_convs["fast"] >= 8, int8_decoder_convs


@pytest.mark.slow
def test_int8_export_stays_near_fp32(exported, tmp_path):
    """ORT static int8 calibrated on a few images: alpha within TINY_INT8_MEAN_BOUND of fp32 PyTorch,
    int8 weights in the file, the 1-channel logit convolutions left in float32."""
    import onnx
    from PIL import Image

    from fusionnet.inference.matter import Matter
    from fusionnet.onnx.quantize import calibration_images, logit_convolutions, quantize_onnx
    from fusionnet.onnx.runtime import OnnxMatter, read_metadata

    model, _, onnx_path = exported
    folder = tmp_path / "calibration"
    (folder / "sub").mkdir(parents=True)
    for i in range(4):
        Image.fromarray((_image(96, 128, seed=10 + i) * 255).astype(np.uint8)).save(folder / "sub" / f"c{i}.png")
    images = calibration_images(folder, count=4)
    assert len(images) == 4 and images[0].shape == (96, 128, 3)
    int8_path = quantize_onnx(onnx_path, tmp_path / "int8.onnx", images, side=128)
    assert read_metadata(int8_path)["precision"] == "int8"
    assert json.loads(read_metadata(int8_path)["config"]) == model.config
    graph = onnx.load(str(int8_path)).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) > 100  # the convolutions are int8
    producers = {out: node for node in graph.node for out in node.output}
    logits = set(logit_convolutions(onnx.load(str(onnx_path))))
    heads = [n for n in graph.node if n.op_type == "Conv" and n.name in logits]
    assert len(heads) == 3  # fg_prob's and bg_prob's heads, beta's (the coarser side heads feed no output: pruned)
    for node in heads:  # float weights straight from an initializer, no DequantizeLinear
        assert node.input[1] not in producers, node.name
    matter = OnnxMatter(int8_path, device="cpu", max_side=128, refine=False)
    assert matter.precision == "int8"
    diffs = []
    for seed in (20, 21):
        image = _image(100, 120, seed)
        ref = Matter(model, device="cpu", precision="fp32", max_side=128, refine=False)(image).raw_alpha
        diffs.append(np.abs(matter(image).raw_alpha - ref).mean())
    assert max(diffs) < TINY_INT8_MEAN_BOUND, diffs
    assert max(diffs) > 0  # it is quantised, not the fp32 file


@pytest.mark.slow
def test_int8_keeps_the_named_modules_and_op_types_in_float(exported, tmp_path):
    """exclude_scopes leaves the convolutions of those modules float (weights straight from an initializer);
    op_types=("Conv",) quantises convolutions only; a scope that names no module is an error."""
    import onnx

    from fusionnet.onnx.export import ExportError
    from fusionnet.onnx.quantize import in_scopes, quantize_onnx

    _, _, onnx_path = exported
    images = [_image(96, 96, seed) for seed in (30, 31)]
    fp32 = onnx.load(str(onnx_path))
    fusion = set(in_scopes(fp32, ["model.fusion"]))
    assert sum(n.op_type == "Conv" and n.name in fusion for n in fp32.graph.node) >= 3  # rgb, body, head
    path = quantize_onnx(onnx_path, tmp_path / "a.onnx", images, side=96, exclude_scopes=["model.fusion"])
    graph = onnx.load(str(path)).graph
    producers = {out: node for node in graph.node for out in node.output}
    kept = [n for n in graph.node if n.op_type == "Conv" and n.name in fusion]
    assert len(kept) >= 3 and all(n.input[1] not in producers for n in kept)  # float weights, float arithmetic
    int8_convs = [n for n in graph.node if n.op_type == "Conv" and n.input[1] in producers]
    assert len(int8_convs) > 50  # the encoder's and decoders' are int8
    default = onnx.load(str(quantize_onnx(onnx_path, tmp_path / "d.onnx", images, side=96))).graph
    made = {out for node in default.node for out in node.output}
    default_float = [n for n in default.node if n.op_type == "Conv" and n.name in fusion and n.input[1] not in made]
    assert len(default_float) == 1  # without the exclusion only the beta head (a logit conv) is float
    # every tensor only a Concat/Add/Resize/pool reads is quantised by default, not with op_types=("Conv",)
    conv_only = onnx.load(str(quantize_onnx(onnx_path, tmp_path / "c.onnx", images, side=96, op_types=("Conv",)))).graph
    quantised = {name: sum(n.op_type == "QuantizeLinear" for n in g.node) for name, g in
                 (("conv_only", conv_only), ("default", default))}
    assert quantised["conv_only"] < quantised["default"], quantised
    with pytest.raises(ExportError, match="model.fusoin"):
        quantize_onnx(onnx_path, tmp_path / "b.onnx", images, side=96, exclude_scopes=["model.fusoin"])
    assert not (tmp_path / "b.onnx").exists()


@pytest.mark.slow
def test_registered_model_carries_the_onnx_file(exported, tmp_path, capsys):
    """register.onnx: true puts the export beside the weights as artifact "onnx"; `fusionnet pull`
    fetches it (recorded in fusionnet-model.json) and `fusionnet matte` runs the pulled file.
    (The export is the module's, copied, to keep this test short.)"""
    import fusionnet.onnx.export as onnx_export
    from fusionnet.cli import main as cli
    from pipeline.registry.registration import register_pipeline_model
    from pipeline.registry.models import onnx_file, weights_file
    from tests.test_registry import registry_env, write_evaluation

    _, weights, onnx_path = exported
    with registry_env(tmp_path), pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx_export, "export_onnx", lambda model, out, **kw: Path(shutil.copyfile(onnx_path, out)))
        metrics, reports = write_evaluation(tmp_path / "eval", 1.0)
        params = {"crops": {"max_side": 64}, "register": {"precision": "fp32", "onnx": True}}
        result = register_pipeline_model(params, weights, metrics, reports, tmp_path / "registered.json")
        assert result["onnx"]["artifact"] == "onnx" and result["onnx"]["opset"] == 20
        pulled = tmp_path / "pulled"
        assert cli.main(["pull", f"models:/{result['name']}/{result['version']}", "--out", str(pulled)]) == 0
        carried = onnx_file(pulled)
        assert carried is not None and _sha(carried) == _sha(onnx_path)
        assert _sha(weights_file(pulled)) == _sha(weights)
        assert json.loads((pulled / "fusionnet-model.json").read_text())["onnx"] == str(carried.relative_to(pulled))
        photo = tmp_path / "p.png"
        from PIL import Image

        Image.fromarray((_image(50, 40) * 255).astype(np.uint8)).save(photo)
        capsys.readouterr()
        assert cli.main(["matte", str(photo), "--model", str(carried), "--out", str(tmp_path / "o"),
                         "--max-side", "64"]) == 0
        assert "onnxruntime" in capsys.readouterr().err
        # without the option nothing is carried
        params["register"]["onnx"] = False
        plain = register_pipeline_model(params, weights, metrics, reports, tmp_path / "registered2.json")
        assert "onnx" not in plain
        assert cli.main(["pull", f"models:/{plain['name']}/{plain['version']}", "--out", str(tmp_path / "p2")]) == 0
        assert onnx_file(tmp_path / "p2") is None


@pytest.mark.slow
def test_serve_loads_an_onnx_model(exported):
    """`fusionnet serve x.onnx`: the service runs OnnxMatter and /health names the engine."""
    import argparse
    from types import SimpleNamespace

    from fusionnet.server import main as server
    from fusionnet.onnx.runtime import OnnxMatter

    _, _, onnx_path = exported
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    args = parser.parse_args([str(onnx_path), "--threads", "1", "--max-side", "64"])
    httpd = SimpleNamespace()
    service = server._load_service(args, httpd)
    try:
        assert isinstance(service.matter, OnnxMatter)
        assert httpd.health_info["engine"] == "onnxruntime CPUExecutionProvider"
        assert httpd.health_info["precision"] == "fp32"
    finally:
        service.close()
