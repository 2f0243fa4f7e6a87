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
