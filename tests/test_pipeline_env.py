"""pipeline.env.wait_for_prefect_api: the training stages wait for the server `make run` starts."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from pipeline.env import wait_for_prefect_api
from tests.support.helpers import free_port


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


def test_returns_at_once_without_a_url():
    t0 = time.monotonic()
    wait_for_prefect_api(timeout_s=5, environ={})
    assert time.monotonic() - t0 < 0.5


def test_waits_for_a_server_that_comes_up_later():
    port = free_port()
    server = HTTPServer(("127.0.0.1", port), _Health)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    starter = threading.Timer(1.0, serving.start)
    starter.start()
    try:
        t0 = time.monotonic()
        wait_for_prefect_api(timeout_s=20, environ={"PREFECT_API_URL": f"http://127.0.0.1:{port}/api"})
        assert 0.9 < time.monotonic() - t0 < 15
    finally:
        starter.cancel()
        starter.join()
        if serving.is_alive():  # shutdown() waits for serve_forever: only ask a server that serves
            server.shutdown()
        server.server_close()


def test_names_the_url_when_nothing_answers():
    port = free_port()  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/api"
    with pytest.raises(RuntimeError, match=f"PREFECT_API_URL={url}: no Prefect server answered"):
        wait_for_prefect_api(timeout_s=1, environ={"PREFECT_API_URL": url})
