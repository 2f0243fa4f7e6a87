"""Training of the Late Fusion CNN in the paper's three steps (Sec. 3.4): segmentation, fusion, joint.

    from fusionnet.train.config import StepConfig
    from fusionnet.train.loop import run_step
    cfg = StepConfig.from_params(params, "segmentation")
    result = run_step("segmentation", cfg, Path("data/shards"), Path("models/segmentation"))

No DVC, Prefect or MLflow here: the pipeline passes a `TrainLogger` (`tracking`). CLI:
`python -m fusionnet.train`. This package imports nothing itself, so naming the steps
(`config.STEPS`) costs no torch import and makes no DVC stage depend on the training loop.
"""
