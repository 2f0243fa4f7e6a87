"""MLflow's server with the UI opening this project's experiments on their training runs.

    mlflow ui --app-name fusionnet --backend-store-uri sqlite:///mlflow.db      (`make ui`)
    mlflow server --app-name fusionnet ...

Why: MLflow 3.17's UI decides an experiment's landing tab in the browser, not from the store. Its
experiment page (`useExperimentPageRedirect` in the experimentPage chunk) sends a bare
`#/experiments/<id>` to the runs table when the page's workflow type is "machine_learning" and to
the GenAI overview (traces, the "Detect Issues" guidance) when it is "genai". The workflow type is the
URL's `?workflowType=`, else the browser's last choice of the sidebar switch (localStorage
`mlflow.workflowType_v1`), else "genai". The experiment tag `mlflow.experimentKind` is read only when
the switch is off, and 3.17 builds it on (`shouldEnableWorkflowBasedNavigation` is constant true), so
tagging the experiment (pipeline.tracking.runs.experiment_id still does, for other versions) changes
nothing. This app serves MLflow's own UI and API unchanged, except that the page sets the browser's
workflow type to "machine_learning" when the browser has made no choice yet: a click on the experiment
in the experiments list, or a pasted bare link, opens the runs table; a user who switches to GenAI
keeps that choice. It also keeps the assistant panel from opening by itself on a first visit (it
covers a third of the page, and needs an LLM provider this offline project does not have).

Registered as MLflow app plugin `fusionnet` (entry point group `mlflow.app` in pyproject.toml).
"""

from __future__ import annotations

import json
import os

from flask import Flask, Response
from mlflow.server import app as mlflow_app

# localStorage keys of MLflow's useLocalStorage hook (`<key>_v<version>`, JSON values), set only when absent.
BROWSER_DEFAULTS = {
    "mlflow.workflowType_v1": "machine_learning",  # the sidebar switch: Model training
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,  # as if the assistant had opened once already
}
_SCRIPT = (
    "<script>(function(){try{var d=%s;for(var k in d){if(window.localStorage.getItem(k)===null)"
    "{window.localStorage.setItem(k,JSON.stringify(d[k]));}}}catch(e){}})();</script>"
)


def defaults_script() -> str:
    """The inline <script> that writes BROWSER_DEFAULTS into localStorage where a key is absent."""
    return _SCRIPT % json.dumps(BROWSER_DEFAULTS)


def index_html(static_folder: str) -> str:
    """MLflow's index.html with `defaults_script()` first in <head>, so it runs before the UI's bundle."""
    with open(os.path.join(static_folder, "index.html"), encoding="utf-8") as handle:
        page = handle.read()
    return page.replace("<head>", "<head>" + defaults_script(), 1)


def create_app(app: Flask = mlflow_app):
    """MLflow's app with its index page (view `serve`, every UI route) replaced by `index_html`;
    wrapped in MLflow's FastAPI app when the server runs under uvicorn (its default), as
    MLflow's own basic-auth app does."""
    original = app.view_functions["serve"]

    def serve():
        if not os.path.exists(os.path.join(app.static_folder, "index.html")):
            return original()  # MLflow's own message for a source install without the built UI
        return Response(index_html(app.static_folder), mimetype="text/html")

    app.view_functions["serve"] = serve
    from mlflow.environment_variables import _MLFLOW_SGI_NAME

    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app
