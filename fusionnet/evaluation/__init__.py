"""The paper's evaluation (Tables 1-2, Figs. 3-4): evaluation sets (`sets`), table rows (`rows`),
baselines, claims and the report. No MLflow or Prefect here: `pipeline/` logs what this returns."""
