"""Offline hygiene for every entry point that runs Prefect, MLflow or DVC.

Without PREFECT_API_URL, Prefect 3 starts a temporary server as a subprocess (uvicorn on
127.0.0.1, a random port in 8000-8999) and talks only to it; that server sends an analytics
heartbeat to sens-o-matic.prefect.io unless PREFECT_SERVER_ANALYTICS_ENABLED is false, and
MLflow asks config.mlflow-telemetry.io for its telemetry config unless telemetry is disabled.
`apply_offline_env` sets those switches (only where the user has not set them), and keeps
Prefect's home (profiles, the temporary server's SQLite database) under the project.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

# The project checkout: pipeline/ sits at its top level.
PROJECT_DIR = Path(__file__).resolve().parents[1]

OFFLINE_ENV: dict[str, str] = {
    "DO_NOT_TRACK": "true",  # read by MLflow (and other tools honouring the convention)
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # the temporary server's telemetry heartbeat
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",  # OTLP export of flow-run CPU/memory
    "DVC_NO_ANALYTICS": "1",
}


def apply_offline_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Set the offline switches in `environ` (default os.environ) unless already set.

    With no PREFECT_API_URL, also allow Prefect's temporary local server and, if Prefect has
    not been imported yet (it reads its home at import), point PREFECT_HOME at
    <project>/.prefect so the local run history stays with the project.
    """
    env = os.environ if environ is None else environ
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    if not env.get("PREFECT_API_URL"):
        env.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
        if "prefect" not in sys.modules:
            env.setdefault("PREFECT_HOME", str(PROJECT_DIR / ".prefect"))


def wait_for_prefect_api(timeout_s: float = 90.0, environ: MutableMapping[str, str] | None = None) -> None:
    """With PREFECT_API_URL set, wait until that server answers /health (e.g. the one `make run` starts
    beside `dvc repro`, still booting when the first training stage begins); no-op without it.
    Raises RuntimeError naming the URL if it does not answer within `timeout_s`."""
    import time
    import urllib.error
    import urllib.request

    url = (os.environ if environ is None else environ).get("PREFECT_API_URL")
    if not url:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"PREFECT_API_URL={url}: no Prefect server answered {url.rstrip('/')}/health within "
                               f"{timeout_s:.0f} s (start one with `prefect server start`, or unset PREFECT_API_URL "
                               "to let each stage start a temporary server)")
        time.sleep(0.5)
