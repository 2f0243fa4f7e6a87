"""The parts of a POST /matte request for `fusionnet serve`: query, media type, multipart field.

Pure functions of header and body values; a problem raises `HttpError` with the status to answer
(400 for a bad value or body) and a message that says what was wrong and what is accepted.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import re
from urllib.parse import parse_qs

from fusionnet.inference.opening import MAX_SIDE_RANGE
from fusionnet.inference.render import OUTPUT_KINDS
from fusionnet.server.service import MatteRequest

FILE_FIELDS = ("file", "image")
QUERY_KEYS = ("output", "background", "max_side", "refine")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_HEX_COLOUR = re.compile(r"[0-9a-fA-F]{3}|[0-9a-fA-F]{6}")


class HttpError(Exception):
    """An answer other than 200; `body_unread`: the request body is still on the wire."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, body_unread: bool = False):
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = headers or {}
        self.body_unread = body_unread


def parse_matte_query(query: str) -> MatteRequest:
    """`output=alpha&background=green&max_side=512&refine=false` -> MatteRequest; HttpError 400 if bad."""
    try:
        params = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    except ValueError as exc:
        raise HttpError(400, f"cannot parse the query string ({exc})") from exc
    unknown = sorted(set(params) - set(QUERY_KEYS))
    if unknown:
        raise HttpError(400, f"unknown query parameter {unknown[0]!r}; known: {', '.join(QUERY_KEYS)}")
    for key, values in params.items():
        if len(values) > 1:
            raise HttpError(400, f"query parameter {key!r} given {len(values)} times")
    value = {key: values[0].strip() for key, values in params.items()}
    output = value.get("output", "alpha")
    if output not in OUTPUT_KINDS:
        raise HttpError(400, f"output={output!r}: choose one of {', '.join(OUTPUT_KINDS)}")
    background = (255, 255, 255)
    if "background" in value:
        background = parse_colour(value["background"])
    max_side = None
    if "max_side" in value:
        low, high = MAX_SIDE_RANGE
        try:
            max_side = int(value["max_side"])
        except ValueError:
            raise HttpError(400, f"max_side={value['max_side']!r}: not a whole number") from None
        if not low <= max_side <= high:
            raise HttpError(400, f"max_side={max_side} is outside {low}..{high}")
    refine = None
    if "refine" in value:
        flag = value["refine"].lower()
        if flag not in _TRUE + _FALSE:
            raise HttpError(400, f"refine={value['refine']!r}: use true or false")
        refine = flag in _TRUE
    return MatteRequest(output=output, background=background, max_side=max_side, refine=refine)


def parse_colour(text: str) -> tuple[int, int, int]:
    """A colour name or spec (`white`, `%2300ff00`, bare hex `00ff00`, `rgb(0,0,255)`) as RGB 0..255.

    Only colours: an image background is the CLI's (`fusionnet matte --background FILE`).
    """
    from PIL import ImageColor

    spec = f"#{text}" if _HEX_COLOUR.fullmatch(text) else text
    try:
        return tuple(ImageColor.getrgb(spec)[:3])  # type: ignore[return-value]
    except ValueError:
        raise HttpError(400, f"background={text!r}: not a colour (e.g. white, 00ff00, rgb(0,0,255))") from None


def media_type(header: str | None) -> tuple[str, str | None]:
    """(lower-case media type, multipart boundary or None) of a Content-Type header."""
    if not header:
        return "application/octet-stream", None  # http.client and many scripts send none
    message = email.message.Message()
    message["Content-Type"] = header
    return message.get_content_type(), message.get_boundary()


def multipart_file(body: bytes | bytearray, boundary: str) -> tuple[str, memoryview]:
    """(filename, bytes) of the first part named `file` or `image` of a multipart/form-data body.

    Part boundaries are found here (one pass, no copy of the payload); each part's headers go to the
    stdlib email parser. email's full-message parser was 10x the body in memory and 2 s per 20 MB.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    separator = b"\r\n" + delimiter
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        found = body.find(separator)
        if found < 0:
            raise HttpError(400, f"multipart body does not contain its boundary {boundary!r}")
        pos = found + len(separator)
    view, names = memoryview(body), []
    header_parser = email.parser.BytesHeaderParser(policy=email.policy.HTTP)
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the body
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            raise HttpError(400, "multipart body is truncated (a part has no headers)")
        head_start = line_end + 2
        head_end = head_start if body.startswith(b"\r\n", head_start) else body.find(b"\r\n\r\n", head_start) + 2
        if head_end < head_start:
            raise HttpError(400, "multipart body is truncated (a part's headers do not end)")
        content_start = head_end + 2
        content_end = body.find(separator, content_start)
        if content_end < 0:
            raise HttpError(400, "multipart body is truncated (no closing boundary)")
        headers = header_parser.parsebytes(body[head_start:head_end])
        name = headers.get_param("name", header="content-disposition")
        if name in FILE_FIELDS:
            return headers.get_filename() or f"field {name!r}", view[content_start:content_end]
        names.append(str(name))
        pos = content_end + len(separator)
    got = ", ".join(repr(n) for n in names) or "no fields"
    raise HttpError(400, f"multipart body has no field 'file' (or 'image') holding the image; it has {got}")
