"""The MLflow model registry: log and pull matting models (`models`), the register stage's decision
(`registration`), the pyfunc wrapper (`pyfunc_model`) and the `models:/` resolver plugin (`resolver`)."""
