"""Headless Debian Chromium, driven by Playwright, for tests of pages served on 127.0.0.1.

`chromium_page()` skips the test (with the reason) when /usr/bin/chromium or playwright is missing.
Playwright never downloads a browser here: it launches the system's Chromium with the flags that keep
it off the network (this machine's network is closed; background fetches would only be refused).
"""

from __future__ import annotations

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
