"""Headless Debian Chromium, driven by Playwright, for tests of pages served on 127.0.0.1.

`drop_file` and `all_shown` drive the `fusionnet serve` page (used by tests/test_server.py and
scripts/serve_page_screenshot.py). `chromium_page()` skips the test (with the reason) when /usr/bin/chromium or playwright is missing.
Playwright never downloads a browser here: it launches the system's Chromium with the flags that keep
it off the network (this machine's network is closed; background fetches would only be refused).
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-features=MediaRouter,OptimizationHints",
]


def chromium_path() -> str | None:
    return os.environ.get("FUSIONNET_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def chromium_page(viewport: tuple[int, int] = (1280, 800)) -> Iterator["object"]:
    """A Playwright `Page` in a fresh headless Chromium profile; closed (and the profile removed) on exit."""
    executable = chromium_path()
    if executable is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does this)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": viewport[0], "height": viewport[1]},
        )
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


# A DataTransfer holding the file, dispatched as dragover + drop on #drop: what a drag from the desktop delivers.
_DROP = """([b64, name]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, { type: "image/png" }));
    const drop = document.getElementById("drop");
    drop.dispatchEvent(new DragEvent("dragover", { dataTransfer: transfer, bubbles: true, cancelable: true }));
    drop.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
}"""


def drop_file(page, path: "os.PathLike | str") -> None:
    """Drop the image file at `path` on the serve page's drop zone, as a desktop drag does."""
    with open(path, "rb") as handle:
        page.evaluate(_DROP, [base64.b64encode(handle.read()).decode(), os.path.basename(path)])


def all_shown(generation: int = 1) -> str:
    """JS predicate for page.wait_for_function: upload number `generation` is answered and its input,
    alpha, cut-out and composite images have all decoded; or the page reports a failure."""
    return f"""() => document.body.dataset.failed || (document.body.dataset.done === '{generation}'
    && ['input', 'alpha', 'rgba', 'composite'].every((id) => document.getElementById(id).dataset.ready === '1'))"""
