"""Orchestration (Prefect flows, deployment) and tracking (MLflow) around the fusionnet library.

Importing this package applies the offline switches (`pipeline.env`) before Prefect or MLflow
is imported, so every flow, stage and test that goes through `pipeline` stays on 127.0.0.1.
"""

from pipeline.env import apply_offline_env

apply_offline_env()
