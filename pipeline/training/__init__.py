"""Running the training steps: the command line of a step (`launch`, `StepJob`), the step as a Prefect
task and flow (`steps`), one step process (`step_main`), dispatch to a work pool (`dispatch`) with the
shards' DVC version (`datasync`) and the outputs handed back through MLflow (`handoff`)."""
