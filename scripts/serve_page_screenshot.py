"""The README's picture of the `fusionnet serve` page: a real server, a real photo dropped in Chromium.

    python scripts/serve_page_screenshot.py --model models/joint/model.safetensors \
        --image ../shared/data/alphamatting-dev/image/GT04.png --out docs/serve-page.png

Starts `fusionnet serve MODEL` on a free 127.0.0.1 port, opens the page in headless Debian Chromium
(tests/support/browser.py), drops the image as a desktop drag delivers it, waits for alpha, cut-out and
composite, saves a screenshot and stops the server (SIGINT).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"fusionnet serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"fusionnet serve did not answer /health within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--background", default="#2e8b57", help="the page's composite colour")
    args = parser.parse_args()
    if not args.image.is_file():
        raise SystemExit(f"error: {args.image}: no such image")
    from tests.support.browser import all_shown, chromium_page, drop_file

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "fusionnet.cli.main", "serve", args.model, "--port", str(port)],
                              env={**os.environ, "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_healthy(port, server, timeout=300)
        with chromium_page(viewport=(1400, 900)) as page:
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("() => document.getElementById('model').textContent.includes('sha256')")
            drop_file(page, args.image)
            page.wait_for_function(all_shown(1), timeout=600_000)
            if page.locator("#error").is_visible():
                raise SystemExit(f"error shown on the page: {page.locator('#error').text_content()}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
        print(f"{args.out}: screenshot of http://127.0.0.1:{port}/ with {args.image.name}")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
