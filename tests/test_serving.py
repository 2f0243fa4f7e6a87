"""`mlflow models serve -m models:/late-fusion-matting@champion --env-manager local` on 127.0.0.1, for real.

A good request gets alpha mattes; malformed requests get a clear 4xx and the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_evaluate import make_checkpoints
from tests.test_registry import MODEL, register, registry_env

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    root = tmp_path_factory.mktemp("serving")
    weights = make_checkpoints(root / "models")["joint"]
    with registry_env(root) as uri:
        register(root, weights, sad=1.0, tag="v1")
        port = free_port()
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        log = open(root / "serve.log", "w")
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    pytest.fail(f"mlflow models serve exited ({process.returncode}): {(root / 'serve.log').read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("mlflow models serve did not answer /ping within 120 s")
                time.sleep(0.5)
            yield port
        finally:
            os.killpg(process.pid, signal.SIGTERM)  # the group this test started: mlflow and its uvicorn
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
            log.close()


def good_request(image: np.ndarray) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [[png_b64(image)]]},
                       "params": {"max_side": 64}}).encode()


def test_served_model_answers_with_alpha_and_survives_bad_requests(server):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    status, body = post(server, good_request(image))
    assert status == 200, body
    (prediction,) = body["predictions"]
    assert (prediction["height"], prediction["width"]) == (45, 70)
    alpha = Image.open(io.BytesIO(base64.b64decode(prediction["alpha"])))
    assert alpha.mode == "L" and alpha.size == (70, 45)

    # not an image
    junk = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b"junk").decode()]]}})
    status, body = post(server, junk.encode())
    assert status == 400 and "row 0: not an image" in body["message"]
    # not JSON
    status, body = post(server, b"{this is not json")
    assert status == 400 and "JSON" in body["message"]
    # wrong column
    status, body = post(server, json.dumps({"dataframe_split": {"columns": ["x"], "data": [["a"]]}}).encode())
    assert status == 400 and "image" in body["message"]
    # max_side out of range
    bad_param = json.loads(good_request(image))
    bad_param["params"]["max_side"] = 5
    status, body = post(server, json.dumps(bad_param).encode())
    assert status == 400 and "max_side" in body["message"]

    # still serving, and deterministic
    status, again = post(server, good_request(image))
    assert status == 200 and again["predictions"][0]["alpha"] == prediction["alpha"]


def test_served_model_mattes_two_images_in_one_request(server):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(30, 40, 3), (50, 20, 3)]]
    payload = {"dataframe_records": [{"image": png_b64(im)} for im in images], "params": {"refine": False}}
    status, body = post(server, json.dumps(payload).encode())
    assert status == 200, body
    assert [(p["height"], p["width"]) for p in body["predictions"]] == [(30, 40), (50, 20)]
