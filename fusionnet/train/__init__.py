"""Training of the Late Fusion CNN in the paper's three steps (Sec. 3.4): segmentation, fusion, joint.

    from fusionnet.train import StepConfig, run_step
    cfg = StepConfig.from_params(params, "segmentation")
    result = run_step("segmentation", cfg, Path("data/shards"), Path("models/segmentation"))

No DVC, Prefect or MLflow here: the pipeline passes a `TrainLogger`. CLI: `python -m fusionnet.train`.
"""

from fusionnet.train.config import STEP_SECTIONS, STEPS, StepConfig
from fusionnet.train.loop import HISTORY_FILE, MODEL_FILE, run_step
from fusionnet.train.state import STATE_FILE
from fusionnet.train.tracking import PrintLogger, StepResult, TrainLogger

__all__ = [
    "HISTORY_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "STEPS",
    "STEP_SECTIONS",
    "PrintLogger",
    "StepConfig",
    "StepResult",
    "TrainLogger",
    "run_step",
]
