"""HTTP for `fusionnet serve`: routes, request checks and error answers (stdlib `http.server`).

    POST /matte   an image as a multipart field `file` (or `image`), or as the raw body
                  (Content-Type image/* or application/octet-stream); query: output, background,
                  max_side, refine. Answers a PNG.
    GET  /health  JSON: model, device, precision, queue state, counters.
    GET  /        a page to drop an image and see alpha, cut-out and composite side by side.

Every error is JSON `{"error": "..."}`: 400 (bad query, empty/truncated body, not a decodable
image, wrong multipart field), 404, 405, 408 (body not received in time), 411 (no Content-Length),
413 (body over --max-bytes), 415 (not an image media type), 500, 503 + Retry-After (every place
taken, or stopping), 504 (no answer within --timeout). Checks that need no body run before a byte
of it is read; such an answer closes the connection (the unread body cannot be skipped reliably).
"""

from __future__ import annotations

import json
import socket
import sys
import time
import traceback
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fusionnet import __version__
from fusionnet.io.images import ImageLoadError
from fusionnet.server.requests import HttpError, media_type, multipart_file, parse_matte_query
from fusionnet.server.service import Busy, InferenceError, MattingService

RAW_MEDIA_TYPES = ("application/octet-stream",)  # and every image/*
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
_READ_CHUNK = 1 << 20
_DISCARD_LIMIT, _DISCARD_SECONDS = 16 << 20, 2.0


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    timeout: float  # seconds from admission to answer
    socket_timeout: float  # seconds a connection may stay silent


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------


class MattingHTTPServer(ThreadingHTTPServer):
    """A thread per connection; the inference itself runs on the service's bounded workers."""

    daemon_threads = True
    request_queue_size = 64  # listen backlog: bursts of clients are not refused at connect

    def __init__(self, address: tuple[str, int], limits: Limits):
        """Binds at once (a taken port fails before the model loads); set `service` before serving."""
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        handler = type("Handler", (MattingHandler,), {"timeout": limits.socket_timeout})
        super().__init__(address, handler)
        self.limits = limits
        self.service: MattingService | None = None
        self.health_info: dict[str, Any] = {}
        self.static = load_static()


def load_static() -> dict[str, bytes]:
    """The page's files from the package (fusionnet/server/static, shipped as package data)."""
    folder = resources.files("fusionnet.server") / "static"
    found = {}
    for name in STATIC_FILES:
        try:
            found[name] = (folder / name).read_bytes()
        except OSError:
            pass
    return found


class MattingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's next request reuses the connection
    server_version = f"fusionnet/{__version__}"
    sys_version = ""
    server: MattingHTTPServer

    # ---------------------------------------------------------------- plumbing

    def handle_one_request(self) -> None:
        self._started = time.perf_counter()
        self._expects_continue = False
        super().handle_one_request()

    def handle_expect_100(self) -> bool:
        # Answer "100 Continue" only once the request passed the checks that need no body.
        self._expects_continue = True
        return True

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per request is written by _reply, with the time taken

    def log_message(self, format: str, *args: Any) -> None:
        pass  # idle keep-alive timeouts and the like: not requests

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, 414, 431, 501) as JSON like ours."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # an unparsable request line still gets a status line
        text = message or HTTPStatus(code).phrase
        self._reply(code, json.dumps({"error": text}).encode(), "application/json", close=True)

    def _reply(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None,
               close: bool = False) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(body)
        except OSError:  # the client went away; nothing to answer to
            self.close_connection = True
        ms = (time.perf_counter() - self._started) * 1000.0
        line = getattr(self, "requestline", "") or "-"
        sys.stderr.write(f"{self.client_address[0]} \"{line}\" {status} {len(body)} B {ms:.1f} ms\n")

    def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None,
              close: bool = False) -> None:
        self._reply(status, json.dumps(payload, indent=1).encode(), "application/json", headers, close)

    def _error(self, error: HttpError) -> None:
        self._json(error.status, {"error": error.message}, error.headers, close=error.body_unread)
        if error.body_unread:
            self._discard_unread_body()

    def _discard_unread_body(self) -> None:
        """Read and drop what the client still sends (a little, briefly), so closing does not reset
        the connection before the client has read our answer."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            deadline, dropped = time.monotonic() + _DISCARD_SECONDS, 0
            while time.monotonic() < deadline and dropped < _DISCARD_LIMIT:
                chunk = self.rfile.read1(65536)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass

    # ---------------------------------------------------------------- routes

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/health":
            self._json(200, self._health())
        elif path in ("/", "/index.html") or path.startswith("/static/"):
            name = "index.html" if path in ("/", "/index.html") else path[len("/static/"):]
            if name not in self.server.static:
                self._error(HttpError(404, f"no such file {path!r}"))
                return
            headers = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:"}
            self._reply(200, self.server.static[name], STATIC_FILES[name], headers)
        elif path == "/matte":
            self._error(HttpError(405, "POST an image to /matte (GET / for the page)", {"Allow": "POST"}))
        else:
            self._error(HttpError(404, f"no such path {path!r}; try POST /matte, GET /health or GET /"))

    def do_POST(self) -> None:
        split = urlsplit(self.path)
        if split.path != "/matte":
            allowed = {"/health": "GET", "/": "GET"}.get(split.path)
            if allowed:
                self._error(HttpError(405, f"{split.path} answers GET only", {"Allow": allowed}, body_unread=True))
            else:
                self._error(HttpError(404, f"no such path {split.path!r}; POST images to /matte", body_unread=True))
            return
        service = self.server.service
        try:
            request = parse_matte_query(split.query)
            kind, boundary, length = self._check_headers()
            service.admit()
        except HttpError as error:
            error.body_unread = True
            service.count("bad_request")
            self._error(error)
            return
        except Busy as busy:
            self._error(HttpError(503, str(busy), {"Retry-After": str(busy.retry_after)}, body_unread=True))
            return
        deadline = time.monotonic() + self.server.limits.timeout
        try:
            body = self._read_body(length, deadline)
            name, data = ("request body", body) if boundary is None else multipart_file(body, boundary)
            future = service.submit(data, name, request)
        except Exception as exc:
            service.leave()  # before answering: a client that reads /health next sees the place free
            if isinstance(exc, HttpError):
                service.count("bad_request")
                self._error(exc)
            elif type(exc) is RuntimeError:  # from submit: the executor is shut down (SIGTERM/SIGINT)
                self._error(HttpError(503, "server is stopping", {"Retry-After": "5"}))
            else:  # e.g. MemoryError for the body buffer: answer, keep serving, log the traceback
                traceback.print_exc()
                service.count("failed")
                self._error(HttpError(500, f"internal error ({type(exc).__name__}: {exc})", body_unread=True))
            return
        try:
            reply = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except ImageLoadError as exc:
            service.count("bad_request")
            self._error(HttpError(400, str(exc)))
        except FutureTimeout:
            future.cancel()  # still queued: dropped; running: it keeps its place until it ends
            service.count("timed_out")
            self._error(HttpError(504, f"no answer within {self.server.limits.timeout:g} s (--timeout)"))
        except InferenceError as exc:
            service.count("failed")
            self._error(HttpError(500, str(exc)))
        except CancelledError:  # cancelled by the stop
            self._error(HttpError(503, "server is stopping", {"Retry-After": "5"}))
        except Exception as exc:  # a bug: answer it, keep serving, leave the traceback in the log
            traceback.print_exc()
            service.count("failed")
            self._error(HttpError(500, f"internal error ({type(exc).__name__}: {exc})"))
        else:
            service.count("ok")
            headers = {"X-Fusionnet-Size": f"{reply.size[1]}x{reply.size[0]}",
                       "X-Fusionnet-Network-Size": f"{reply.network_size[1]}x{reply.network_size[0]}",
                       "X-Fusionnet-Cache": "hit" if reply.cached else "miss",
                       "X-Fusionnet-Ms": f"{reply.seconds * 1000:.1f}"}
            if reply.original_size != reply.size:
                headers["X-Fusionnet-Original-Size"] = f"{reply.original_size[1]}x{reply.original_size[0]}"
            self._reply(200, reply.png, "image/png", headers)

    # ---------------------------------------------------------------- body

    def _check_headers(self) -> tuple[str, str | None, int]:
        """(media type, multipart boundary, Content-Length) or HttpError 400/411/413/415."""
        kind, boundary = media_type(self.headers.get("Content-Type"))
        if kind == "multipart/form-data":
            if not boundary:
                raise HttpError(400, "multipart/form-data without a boundary parameter")
        elif not (kind.startswith("image/") or kind in RAW_MEDIA_TYPES):
            raise HttpError(
                415, f"Content-Type {kind!r} is not an image: send multipart/form-data with a field 'file' "
                "(curl -F file=@photo.jpg) or the raw file as image/* or application/octet-stream "
                "(curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg')")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HttpError(411, "chunked request bodies are not accepted: send Content-Length")
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise HttpError(411, "Content-Length required")
        try:
            length = int(declared)
            if length < 0:
                raise ValueError
        except ValueError:
            raise HttpError(400, f"Content-Length {declared!r} is not a byte count") from None
        limit = self.server.limits.max_bytes
        if length > limit:
            raise HttpError(413, f"request body of {length} bytes is over the limit of {limit} bytes (--max-bytes)")
        if length == 0:
            raise HttpError(400, "empty request body: send an image file")
        return kind, boundary, length

    def _read_body(self, length: int, deadline: float) -> bytearray:
        if self._expects_continue:
            self.send_response_only(100)
            self.end_headers()
        buffer = bytearray(length)
        view, got = memoryview(buffer), 0
        try:
            while got < length:
                if time.monotonic() > deadline:
                    raise TimeoutError
                n = self.rfile.readinto1(view[got:min(length, got + _READ_CHUNK)])
                if n == 0:
                    raise HttpError(400, f"request body ended after {got} of {length} bytes (truncated upload)",
                                    body_unread=True)
                got += n
        except TimeoutError:
            raise HttpError(408, f"request body not received in time ({got} of {length} bytes)",
                            body_unread=True) from None
        return buffer

    def _health(self) -> dict[str, Any]:
        limits = self.server.limits
        return {"status": "ok", "version": __version__, **self.server.health_info, **self.server.service.state(),
                "limits": {"max_bytes": limits.max_bytes, "timeout_s": limits.timeout,
                           "socket_timeout_s": limits.socket_timeout,
                           "max_pixels": self.server.service.max_pixels,
                           "max_output_side": self.server.service.max_output_side}}
