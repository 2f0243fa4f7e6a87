"""`fusionnet serve` for real: subprocesses on 127.0.0.1, raw sockets and http.client as clients,
headless Chromium for the page.

One server serves the module (2 workers, queue 8, network side 64, 8 MiB body limit); the
503/408/504 paths and the soak start their own (slow tests: a start is mostly importing torch, 10 to
60 s on a shared 2-core host). The model is a small random densenet121 (narrow decoders,
pretrained=False); served values are checked against `fusionnet.inference.matter.Matter` run here on the same
image.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.server import Server, png_bytes, rss_bytes, run_load, sample_image, tiny_model
from fusionnet.io.images import to_uint8

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "alphamatting-dev" / "image"
ARTIFACTS = REPO / "test-artifacts"
BODY_LIMIT = 8 << 20
LOG_LINE = re.compile(r'127\.0\.0\.1 "POST /matte\?output=alpha HTTP/1\.1" 200 \d+ B \d+\.\d ms')


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("serve-model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def servers(model_file, tmp_path_factory):
    # fp32 pinned: served values are compared with an fp32 Matter here (auto times this CPU and may pick bf16)
    main = Server(model_file, "--max-side", "64", "--workers", "2", "--queue", "8", "--max-bytes", str(BODY_LIMIT),
                  "--precision", "fp32", log=tmp_path_factory.mktemp("serve-logs") / "main.log")
    try:
        yield {"main": main.wait_ready()}
    finally:
        main.stop()


@pytest.fixture(scope="module")
def local_matter(model_file):
    """The served model as a Matter in this process, at the main server's settings."""
    from fusionnet.inference.loading import load_model
    from fusionnet.inference.matter import Matter

    return Matter(load_model(model_file), device="cpu", precision="fp32", max_side=64, refine=True)


# ---------------------------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------------------------


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def raw_request(port: int, data: bytes, shut_write: bool = False, timeout: float = 60,
                sock: socket.socket | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send `data` as is (any headers, any lie about the body) and read one response."""
    sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with sock:
        if data:
            sock.sendall(data)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def post_head(path: str, length: int | None, content_type: str | None = "image/png", extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def multipart(name: str, data: bytes, filename: str = "photo.png") -> tuple[bytes, str]:
    boundary = "fusionnet-test-7d1f"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def health(port: int) -> dict:
    status, _, body = request(port, "GET", "/health")
    assert status == 200
    return json.loads(body)


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im)


def assert_close_uint8(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to one 8-bit level (float rounding differs with thread counts), most pixels exactly."""
    assert got.shape == expected.shape
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


# ---------------------------------------------------------------------------------------------
# endpoints
# ---------------------------------------------------------------------------------------------


def test_health_names_the_model_and_its_queue(servers, model_file):
    status, headers, body = request(servers["main"].port, "GET", "/health")
    assert status == 200 and headers["content-type"] == "application/json"
    info = json.loads(body)
    assert info["status"] == "ok"
    assert info["model"]["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert info["model"]["config"]["backbone"] == "densenet121"
    assert (info["device"], info["precision"], info["max_side"], info["refine"]) == ("cpu", "fp32", 64, True)
    assert info["queue"] == {"workers": 2, "queue": 8, "capacity": 10, "in_flight": 0, "running": 0, "waiting": 0}
    assert info["limits"]["max_bytes"] == BODY_LIMIT


def test_matte_answers_each_output_as_matter_computes_it(servers, local_matter):
    from fusionnet.refine import implicit_trimap

    port = servers["main"].port
    image = sample_image(3, (48, 80))
    data = png_bytes(image)
    expected = local_matter(image)
    body, content_type = multipart("file", data)

    status, headers, alpha_png = request(port, "POST", "/matte?output=alpha", body, {"Content-Type": content_type})
    assert status == 200, alpha_png
    assert headers["content-type"] == "image/png" and headers["x-fusionnet-size"] == "80x48"
    nh, nw = expected.network_size
    assert headers["x-fusionnet-network-size"] == f"{nw}x{nh}" == "64x38"
    alpha = decode(alpha_png)
    assert alpha.dtype == np.uint8 and alpha.shape == (48, 80)
    assert_close_uint8(alpha, to_uint8(expected.alpha))

    # the same file as a raw body: the same PNG, from the result cache
    status, headers, raw_png = request(port, "POST", "/matte", data, {"Content-Type": "image/png"})
    assert status == 200 and headers["x-fusionnet-cache"] == "hit" and raw_png == alpha_png

    status, _, rgba_png = request(port, "POST", "/matte?output=rgba", data, {"Content-Type": "image/png"})
    rgba = decode(rgba_png)
    assert status == 200 and rgba.shape == (48, 80, 4)
    assert np.array_equal(rgba[..., 3], alpha)

    status, _, composite_png = request(port, "POST", "/matte?output=composite&background=00ff00", data,
                                       {"Content-Type": "application/octet-stream"})
    composite = decode(composite_png).astype(float)
    a = alpha[..., None] / 255.0
    over_green = a * rgba[..., :3] + (1 - a) * np.array([0, 255, 0])
    assert status == 200 and composite.shape == (48, 80, 3)
    assert np.abs(composite - over_green).max() <= 2.0

    status, _, trimap_png = request(port, "POST", "/matte?output=trimap", data, {"Content-Type": "image/png"})
    trimap = decode(trimap_png)
    assert status == 200 and set(np.unique(trimap)) <= {0, 128, 255}
    assert (trimap == implicit_trimap(expected.fg_prob, expected.bg_prob)).mean() > 0.99

    status, _, unrefined_png = request(port, "POST", "/matte?refine=false", data, {"Content-Type": "image/png"})
    unrefined = decode(unrefined_png)
    assert status == 200 and not np.array_equal(unrefined, alpha)
    assert_close_uint8(unrefined, to_uint8(expected.raw_alpha))

    status, headers, _ = request(port, "POST", "/matte?max_side=32", data, {"Content-Type": "image/png"})
    assert status == 200 and headers["x-fusionnet-network-size"] == "32x19" and headers["x-fusionnet-size"] == "80x48"


def test_exif_orientation_is_applied_as_the_cli_does(servers):
    image = Image.fromarray(sample_image(4, (48, 80)))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a portrait photo stored landscape
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    status, headers, png = request(servers["main"].port, "POST", "/matte", buffer.getvalue(),
                                   {"Content-Type": "image/jpeg"})
    assert status == 200 and headers["x-fusionnet-size"] == "48x80" and decode(png).shape == (80, 48)


def test_expect_100_continue_comes_only_after_the_checks(servers):
    port = servers["main"].port
    data = png_bytes(sample_image(5, (32, 32)))
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(post_head("/matte", len(data), extra="Expect: 100-continue\r\n"))
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n")
        status, _, png = raw_request(port, data, sock=sock)
    assert status == 200 and png.startswith(b"\x89PNG")
    # too large: the final answer comes at once (no "100 Continue" first), the body is never asked for
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(post_head("/matte", BODY_LIMIT + 1, extra="Expect: 100-continue\r\n"))
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ")


def _png(seed: int = 6) -> bytes:
    return png_bytes(sample_image(seed, (40, 40)))


BAD_REQUESTS = {
    # name: (request bytes, shut_write, status, fragment of the error)
    "empty-body": (lambda: post_head("/matte", 0), False, 400, "empty request body"),
    "empty-file-field": (lambda: _multipart_request("file", b""), False, 400, "empty file (0 bytes)"),
    "truncated-png": (lambda: _raw_body(_png()[:300]), False, 400, "truncated or corrupt"),
    "truncated-upload": (lambda: post_head("/matte", 5000) + _png()[:1000], True, 400, "ended after 1000 of 5000"),
    "not-an-image": (lambda: _raw_body(b"just some text, honestly"), False, 400, "not an image file"),
    # over twice the server's --max-pixels (50 MP) PIL refuses at open: the message still names --max-pixels
    "bomb": (lambda: _raw_body(_bomb_png(12000, 10000)), False, 400,
             "image is 120 megapixels, over the limit of 50 megapixels (decompression-bomb guard); raise --max-pixels"),
    "text-plain": (lambda: _raw_body(_png(), "text/plain"), False, 415, "'text/plain' is not an image"),
    "form-urlencoded": (lambda: _raw_body(_png(), "application/x-www-form-urlencoded"), False, 415, "curl -F"),
    "huge-declared-size": (lambda: post_head("/matte", 10**12) + b"x" * 1024, False, 413,
                           f"of 1000000000000 bytes is over the limit of {BODY_LIMIT} bytes"),
    "body-over-limit": (lambda: _raw_body(b"\x00" * (BODY_LIMIT + 1)), False, 413, "--max-bytes"),
    "wrong-field": (lambda: _multipart_request("photo", _png()), False, 400, "no field 'file' (or 'image')"),
    "no-boundary": (lambda: _raw_body(_png(), "multipart/form-data"), False, 400, "boundary"),
    "no-length": (lambda: post_head("/matte", None) + _png(), True, 411, "Content-Length required"),
    "chunked": (lambda: post_head("/matte", None, extra="Transfer-Encoding: chunked\r\n") + b"5\r\nhello\r\n0\r\n\r\n",
                False, 411, "chunked"),
    "bad-length": (lambda: post_head("/matte", None, extra="Content-Length: lots\r\n"), False, 400, "not a byte count"),
    "bad-output": (lambda: _raw_body(_png(), path="/matte?output=mask"), False, 400, "output='mask'"),
    "bad-max-side": (lambda: _raw_body(_png(), path="/matte?max_side=5"), False, 400, "outside 32..4096"),
    "unknown-parameter": (lambda: _raw_body(_png(), path="/matte?colour=red"), False, 400, "unknown query parameter 'colour'"),
    "bad-background": (lambda: _raw_body(_png(), path="/matte?output=composite&background=nope"), False, 400,
                       "not a colour"),
    "get-matte": (lambda: b"GET /matte HTTP/1.1\r\nHost: x\r\n\r\n", False, 405, "POST an image"),
    "post-health": (lambda: _raw_body(_png(), path="/health"), False, 405, "GET only"),
    "unknown-path": (lambda: b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", False, 404, "no such path"),
    "garbage-request-line": (lambda: b"HELLO THERE NOW\r\n\r\n", False, 400, "Bad request version"),
}


def _bomb_png(width: int, height: int) -> bytes:
    """A two-tone PNG of width x height pixels in a few hundred KB."""
    import tempfile

    from tests.test_cli import write_two_tone_png

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bomb.png"
        write_two_tone_png(path, width, height, (1, 2, 3), (4, 5, 6))
        return path.read_bytes()


def _raw_body(data: bytes, content_type: str = "image/png", path: str = "/matte") -> bytes:
    return post_head(path, len(data), content_type) + data


def _multipart_request(field: str, data: bytes) -> bytes:
    body, content_type = multipart(field, data)
    return post_head("/matte", len(body), content_type) + body


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(servers, case):
    build, shut_write, expected_status, fragment = BAD_REQUESTS[case]
    port = servers["main"].port
    status, headers, body = raw_request(port, build(), shut_write=shut_write)
    assert status == expected_status, body
    assert headers["content-type"] == "application/json"
    assert fragment in json.loads(body)["error"]
    if status == 405:
        assert headers["allow"] in ("GET", "POST")
    assert health(port)["queue"]["in_flight"] == 0  # nothing left holding a place


def test_bad_requests_are_counted_and_the_server_still_serves(servers):
    port = servers["main"].port
    before = health(port)["requests"]
    for case in ("text-plain", "wrong-field", "not-an-image"):  # refused before the body, after it, by the decoder
        build, shut_write, expected_status, _ = BAD_REQUESTS[case]
        assert raw_request(port, build(), shut_write=shut_write)[0] == expected_status
    after = health(port)["requests"]
    assert after["bad_request"] - before["bad_request"] == 3 and after["ok"] == before["ok"]
    status, _, png = request(port, "POST", "/matte", png_bytes(sample_image(7, (32, 32))), {"Content-Type": "image/png"})
    assert status == 200 and decode(png).shape == (32, 32)
    assert health(port)["requests"]["ok"] == before["ok"] + 1


# ---------------------------------------------------------------------------------------------
# admission, timeouts, stop
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_server_answers_503_and_slow_or_long_requests_time_out(model_file, serve, tmp_path):
    _one_place_server(serve(model_file, "--max-side", "64", "--workers", "1", "--queue", "0", "--timeout", "1",
                            "--socket-timeout", "2", log=tmp_path / "tight.log"))


def _one_place_server(tight: Server) -> None:
    port = tight.port
    data = png_bytes(sample_image(8, (32, 32)))
    # A slow upload holds the only place...
    slow = socket.create_connection(("127.0.0.1", port), timeout=30)
    slow.sendall(post_head("/matte", len(data)) + data[:10])
    wait_for(lambda: health(port)["queue"]["in_flight"] == 1, what="the slow upload to be admitted")
    # ...so the next request is turned away with a hint when to retry,
    status, headers, body = request(port, "POST", "/matte", data, {"Content-Type": "image/png"})
    assert status == 503 and int(headers["retry-after"]) >= 1 and "busy" in json.loads(body)["error"]
    # and the slow client is cut off by --socket-timeout (2 s), not allowed to hold the place.
    started = time.monotonic()
    status, _, body = raw_request(port, b"", sock=slow)
    assert status == 408 and "not received in time (10 of" in json.loads(body)["error"]
    assert time.monotonic() - started < 10
    wait_for(lambda: health(port)["queue"]["in_flight"] == 0, what="the place to be given back")

    # An inference longer than --timeout (1 s): 504 at the deadline; it keeps its place until it ends.
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8))
    started = time.monotonic()
    status, _, body = request(port, "POST", "/matte?max_side=1200", big, {"Content-Type": "image/png"})
    assert status == 504 and "--timeout" in json.loads(body)["error"]
    assert time.monotonic() - started < 8
    state = health(port)
    assert state["requests"]["timed_out"] == 1 and state["requests"]["busy"] == 1
    assert state["queue"]["running"] == 1 and state["queue"]["in_flight"] == 1
    status, _, _ = request(port, "POST", "/matte", data, {"Content-Type": "image/png"})
    assert status == 503

    # SIGTERM while that inference still runs: stops after a --timeout grace, exit status 0.
    started = time.monotonic()
    assert tight.stop(timeout=30) == 0
    assert time.monotonic() - started < 15
    log = tight.log_text()
    assert "stopped (SIGTERM)" in log and "still running" in log


def test_cli_start_errors(tmp_path, capsys):
    from fusionnet.cli.main import main

    assert main(["serve", str(tmp_path / "none.safetensors"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: model" in err and "no such model file" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "any-model", "--port", str(port)]) == 2  # before the model is even looked at
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the page, in headless Chromium
# ---------------------------------------------------------------------------------------------


def _page_images(tmp_path: Path) -> list[Path]:
    """Two real photos from ../shared/data when it is there, else two synthetic discs on gradients."""
    photos = [PHOTOS / "GT04.png", PHOTOS / "GT03.png"]
    if all(p.is_file() for p in photos):
        return photos
    paths = []
    for seed, size in ((11, (300, 400)), (12, (360, 240))):
        paths.append(tmp_path / f"disc-{seed}.png")
        Image.fromarray(sample_image(seed, size)).save(paths[-1])
    return paths


def test_page_drop_an_image_and_see_alpha_cutout_composite(servers, tmp_path):
    from tests.support.browser import all_shown, chromium_page, drop_file

    port = servers["main"].port
    first, second = _page_images(tmp_path)
    sizes = [Image.open(p).size for p in (first, second)]
    with chromium_page(viewport=(1400, 900)) as page:
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("() => document.getElementById('model').textContent.includes('sha256')")
        drop_file(page, first)  # as a drag from the desktop delivers it
        page.wait_for_function(all_shown(1), timeout=180_000)
        assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
        shown = page.evaluate("""() => ['input', 'alpha', 'rgba', 'composite'].map((id) => {
            const img = document.getElementById(id);
            return [img.naturalWidth, img.naturalHeight, img.complete, img.src.startsWith('blob:')];
        })""")
        assert shown == [[*sizes[0], True, True]] * 4
        # the alpha on the page is the server's alpha for that file
        page_mean = page.evaluate("""() => {
            const img = document.getElementById('alpha');
            const canvas = Object.assign(document.createElement('canvas'), {width: img.naturalWidth, height: img.naturalHeight});
            const context = canvas.getContext('2d');
            context.drawImage(img, 0, 0);
            const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let sum = 0;
            for (let i = 0; i < pixels.length; i += 4) sum += pixels[i];
            return sum / (pixels.length / 4);
        }""")
        status, _, png = request(port, "POST", "/matte?refine=true", first.read_bytes(), {"Content-Type": "image/png"})
        assert status == 200 and abs(page_mean - decode(png).astype(float).mean()) < 0.01
        assert "all three in" in page.locator("#status").text_content()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)

        # the file input: a second image replaces the first
        page.set_input_files("#file", str(second))
        page.wait_for_function(all_shown(2), timeout=180_000)
        widths = page.evaluate("() => ['alpha', 'rgba', 'composite'].map((id) => "
                               "[document.getElementById(id).naturalWidth, document.getElementById(id).naturalHeight])")
        assert widths == [list(sizes[1])] * 3

        # not an image: the server's message is shown
        notes = tmp_path / "notes.png"
        notes.write_text("not a picture")
        page.set_input_files("#file", str(notes))
        page.wait_for_function("() => document.body.dataset.failed === '3'", timeout=60_000)
        assert "not an image file" in page.locator("#error").text_content()


# ---------------------------------------------------------------------------------------------
# soak
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_300_requests_from_8_clients_with_bounded_rss(model_file, tmp_path):
    server = Server(model_file, "--max-side", "64", "--workers", "2", "--queue", "6", "--threads", "1",
                    "--cache-mb", "4", log=tmp_path / "soak.log").wait_ready()
    try:
        warm = run_load(server.port, 40, 8, seed=10**6)  # also fills the 4 MiB result cache
        assert warm.errors == []
        before = rss_bytes(server.pid)
        load = run_load(server.port, 300, 8)
        after = rss_bytes(server.pid)
        state = health(server.port)
    finally:
        code = server.stop()
    print(f"soak: {dict(load.statuses)} in {load.wall_s:.1f} s ({load.ok / load.wall_s:.1f} requests/s), "
          f"p50 {load.percentile(50) * 1000:.0f} ms, p95 {load.percentile(95) * 1000:.0f} ms, "
          f"RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
    assert load.errors == [] and set(load.statuses) <= {200, 503}
    assert load.ok >= 270
    assert after - before < 50 * 2**20
    assert state["requests"]["ok"] == warm.ok + load.ok
    assert state["cache"]["bytes"] <= 4 << 20
    assert code == 0


# ---------------------------------------------------------------------------------------------
# last: stopping the main server
# ---------------------------------------------------------------------------------------------


def test_sigterm_stops_cleanly_and_every_request_was_logged(servers):
    main = servers["main"]
    assert main.stop() == 0
    log = main.log_text()
    assert "stopped (SIGTERM)" in log and "still running" not in log
    assert LOG_LINE.search(log), log[-2000:]
