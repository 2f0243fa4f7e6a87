"""MLflow tracking: the pipeline run and its child runs (`runs`), provenance tags and flattened params
(`provenance`), and the evaluation's child run (`evaluation`)."""
