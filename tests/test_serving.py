"""`mlflow models serve -m models:/late-fusion-matting@champion --env-manager local` on 127.0.0.1, for real.

A good request gets alpha mattes equal to what `Matter` computes here at the registered settings;
malformed requests get a clear 4xx and the server keeps serving. `fusionnet serve` of the same
registry URI runs beside it and must answer the same alpha.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusionnet.io.images import to_uint8
from tests.support.helpers import free_port, stop_process, wait_http
from tests.test_evaluate import make_checkpoints
from tests.test_registry import MODEL, register, registry_env

pytestmark = pytest.mark.slow


def post(port: int, payload: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=payload, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except json.JSONDecodeError:
            return error.code, {"message": body.decode(errors="replace")}


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The champion served twice from one registry: `mlflow models serve` and `fusionnet serve models:/...`."""
    from tests.support.server import Server

    root = tmp_path_factory.mktemp("serving")
    weights = make_checkpoints(root / "models")["joint"]
    with registry_env(root):
        registered = register(root, weights, sad=1.0, tag="v1")
        port = free_port()
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        log = open(root / "serve.log", "w")
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        fusionnet_server = Server(f"models:/{MODEL}@champion", log=root / "fusionnet-serve.log")
        try:
            try:
                wait_http(f"http://127.0.0.1:{port}/ping", 120, process)
            except (RuntimeError, TimeoutError) as error:
                pytest.fail(f"mlflow models serve: {error}: {(root / 'serve.log').read_text()[-3000:]}")
            fusionnet_server.wait_ready()
            yield {"port": port, "fusionnet_port": fusionnet_server.port, "weights": weights,
                   "settings": registered["settings"]}
        finally:
            fusionnet_server.stop()
            stop_process(process, timeout=20, group=True)  # the group this test started: mlflow and its uvicorn
            log.close()


def local_matter(server, refine: bool = True):
    """The registered model run here, at its registered settings (what both servers should answer)."""
    from fusionnet.inference.loading import load_model
    from fusionnet.inference.matter import Matter

    settings = server["settings"]
    return Matter(load_model(server["weights"]), device="cpu", precision="fp32", max_side=64, refine=refine,
                  radius=settings["radius"], eps=settings["eps"])


def served_alpha(prediction: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(prediction["alpha"]))), dtype=np.int32)


def assert_close_uint8(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to one 8-bit level (float rounding differs with thread counts), most pixels exactly."""
    diff = np.abs(got.astype(np.int32) - expected.astype(np.int32))
    assert got.shape == expected.shape and diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


def good_request(image: np.ndarray) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[png_b64(image)]]},
                       "params": {"max_side": 64}}).encode()


def test_served_model_answers_with_alpha_and_survives_bad_requests(server):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    status, body = post(server["port"], good_request(image))
    assert status == 200, body
    (prediction,) = body["predictions"]
    assert (prediction["height"], prediction["width"]) == (45, 70)
    alpha = Image.open(io.BytesIO(base64.b64decode(prediction["alpha"])))
    assert alpha.mode == "L" and alpha.size == (70, 45)
    # the served alpha is what Matter gives here for the same image at the registered settings
    assert_close_uint8(served_alpha(prediction), to_uint8(local_matter(server)(image).alpha))

    # not an image
    junk = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"junk").decode()]]}})
    status, body = post(server["port"], junk.encode())
    assert status == 400 and "row 0: not an image" in body["message"]
    # truncated: the message of fusionnet.io.images, the decoding path the CLI and fusionnet serve share
    cut = png_b64(image)[:200]
    status, body = post(server["port"], json.dumps({"dataframe_split": {"columns": ["image"], "data": [[cut]]}}).encode())
    assert status == 400 and "row 0: cannot decode image data, the file is truncated or corrupt" in body["message"]
    # not JSON
    status, body = post(server["port"], b"{this is not json")
    assert status == 400 and "JSON" in body["message"]
    # wrong column
    status, body = post(server["port"], json.dumps({"dataframe_split": {"columns": ["x"], "data": [["a"]]}}).encode())
    assert status == 400 and "image" in body["message"]
    # max_side out of range
    bad_param = json.loads(good_request(image))
    bad_param["params"]["max_side"] = 5
    status, body = post(server["port"], json.dumps(bad_param).encode())
    assert status == 400 and "max_side" in body["message"]

    # still serving, and deterministic
    status, again = post(server["port"], good_request(image))
    assert status == 200 and again["predictions"][0]["alpha"] == prediction["alpha"]


def test_served_model_mattes_two_images_in_one_request(server):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(30, 40, 3), (50, 20, 3)]]
    payload = {"dataframe_records": [{"image": png_b64(im)} for im in images], "params": {"refine": False}}
    status, body = post(server["port"], json.dumps(payload).encode())
    assert status == 200, body
    assert [(p["height"], p["width"]) for p in body["predictions"]] == [(30, 40), (50, 20)]
    # refine: False is the network's raw alpha; with refinement (the registered default) it differs
    payload["params"] = {"max_side": 64}
    status, refined = post(server["port"], json.dumps(payload).encode())
    assert status == 200, refined
    raw_matter = local_matter(server, refine=False)
    for image, unrefined, with_filter in zip(images, body["predictions"], refined["predictions"]):
        assert_close_uint8(served_alpha(unrefined), to_uint8(raw_matter(image).alpha))
        assert np.abs(served_alpha(unrefined) - served_alpha(with_filter)).max() > 1


def test_exif_orientation_through_the_shared_decoder(server):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", exif=exif.tobytes())
    payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(buffer.getvalue()).decode()]]}}
    status, body = post(server["port"], json.dumps(payload).encode())
    assert status == 200 and (body["predictions"][0]["height"], body["predictions"][0]["width"]) == (50, 30)


def test_fusionnet_serve_of_the_registry_uri_answers_the_same_alpha(server):
    """`fusionnet serve models:/late-fusion-matting@champion` uses the registered settings: same alpha
    as `mlflow models serve` for the same image."""
    image = np.random.default_rng(3).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    status, body = post(server["port"], good_request(image))
    assert status == 200, body
    with urllib.request.urlopen(f"http://127.0.0.1:{server['fusionnet_port']}/health", timeout=30) as response:
        health = json.loads(response.read())
    settings = server["settings"]
    # the registered settings.json beside the pulled weights, for every setting the command line left out
    assert set(health["model"]["settings_from"]) == {"max_side", "precision", "refine", "radius", "eps"}
    assert all(source.endswith("settings.json") for source in health["model"]["settings_from"].values())
    assert (health["max_side"], health["radius"], health["eps"]) == (64, settings["radius"], settings["eps"])
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    request = urllib.request.Request(f"http://127.0.0.1:{server['fusionnet_port']}/matte", data=buffer.getvalue(),
                                     headers={"Content-Type": "image/png"})
    with urllib.request.urlopen(request, timeout=120) as response:
        ours = np.asarray(Image.open(io.BytesIO(response.read())), dtype=np.int32)
    assert_close_uint8(ours, served_alpha(body["predictions"][0]))
