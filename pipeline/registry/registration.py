"""The pipeline's last step, `register`: the joint model -> MLflow registry, champion or challenger.

`register_pipeline_model` reads the evaluation's outputs, logs the model as a pyfunc in child run
"register", links it to the training run that produced its weights (the step run tagged with the
weights' sha256 becomes the LoggedModel's source run and the registered version's run; the
parent run lists the model as an output too), registers it and applies the champion rule
(pipeline.registry.models). With `register.onnx: true` the weights' ONNX export (fusionnet.onnx.export)
is carried beside them as artifact "onnx". `register_task` is the Prefect task around it.

Its own module so that the DVC `register` stage, which runs only this task, depends on none of
the evaluation code (pipeline.tasks holds the others and the order they run in).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from fusionnet.data.crops import CropParams, refuse_moved_scale, working_scale
from fusionnet.io.atomic import write_text_atomic
from fusionnet.io.hashing import file_sha256
import pipeline  # noqa: F401  (offline switches before prefect is imported)
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fusionnet.io.params import load_params
from pipeline.registry.models import CHALLENGER, CHAMPION, MODEL_NAME

TASK_OPTIONS = dict(retries=1, retry_delay_seconds=2, cache_policy=NO_CACHE)


def log_to_run(text: str) -> None:
    """A line in the task run's log (the Prefect UI), or on stdout when called outside a run (.fn)."""
    try:
        get_run_logger().info(text)
    except Exception:
        print(text, flush=True)


@dataclass
class RegisterConfig:
    """The `register:` section of params.yaml."""

    model_name: str = MODEL_NAME
    metric: str = "raw.band.sad"
    greater_is_better: bool = False
    champion_alias: str = CHAMPION
    challenger_alias: str = CHALLENGER
    max_side: int = CropParams.__dataclass_fields__["max_side"].default  # crops.max_side: see from_params
    precision: str = "auto"  # the served model measures its fastest precision on its own host
    refine: bool = True
    # Carry an ONNX export (fusionnet.onnx.export) beside the weights. Off by default: the export
    # takes ~1 min on a loaded 2-core host (tiny densenet121 measured 55-70 s), a lot per test registration.
    onnx: bool = False
    onnx_opset: int = 20

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "RegisterConfig":
        section = dict(params.get("register") or {})
        refuse_moved_scale(section, "register")
        unknown = sorted(set(section) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"params register: unknown keys {unknown}")
        return cls(**section, max_side=working_scale(params))  # served at the scale it was trained at


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (run the evaluate stage first)")
    return json.loads(path.read_text())


def registered_settings(config: RegisterConfig, details: Mapping[str, Any]) -> dict[str, Any]:
    """The registered model's settings.json: serving settings, the guided filter chosen by evaluate
    (details.json), and device "auto" (CUDA where the serving host has one, else CPU; pyfunc_model)."""
    gf = details.get("guided_filter") or {}
    return {
        "max_side": config.max_side, "precision": config.precision, "refine": config.refine, "device": "auto",
        "radius": int(gf.get("radius", 8)), "eps": float(gf.get("eps", 1e-4)),
    }


def training_run_of(client: Any, experiment_id: str, sha256: str, parent_run_id: str | None = None) -> str | None:
    """Id of the finished step run that trained the model file with this sha256 (tag
    TAG_TRAINED_MODEL_SHA), preferring one under `parent_run_id`, else the latest; None if none did."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from pipeline.tracking.runs import TAG_KIND, TAG_TRAINED_MODEL_SHA

    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_TRAINED_MODEL_SHA}` = '{sha256}' and tags.`{TAG_KIND}` = 'step' "
                      "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    same_parent = [r for r in runs if parent_run_id and r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_run_id]
    found = same_parent or runs
    return found[0].info.run_id if found else None


def register_pipeline_model(
    params: Mapping[str, Any],
    weights: Path,
    metrics_dir: Path,
    reports_dir: Path,
    out: Path,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Log `weights` as a pyfunc (child run "register"), register it, apply the champion rule.

    Reads metrics_dir/evaluate.json (the compared metric and the version's metric tags),
    metrics_dir/details.json (the guided filter's radius/eps chosen on validation, the test set's
    data version, stored as tag TEST_SET_TAG) and reports_dir/table.md (the version description).
    The version's run is the training run of `weights` when one is recorded, else "register".
    Writes `out` (JSON: name, version, alias, uri, the decision) atomically and returns the same dict.
    """
    from pipeline.registry.models import (
        TEST_SET_TAG,
        flatten_metrics,
        get_client,
        log_matting_model,
        pipeline_parent,
        promote,
        register_version,
    )
    from pipeline.tracking.runs import get_client as tracking_client
    from pipeline.tracking.runs import start_step_run

    config = RegisterConfig.from_params(params)
    evaluation = _read_json(metrics_dir / "evaluate.json")
    details = _read_json(metrics_dir / "details.json")
    metrics = flatten_metrics(evaluation)
    if config.metric not in metrics:
        raise KeyError(f"params register.metric {config.metric!r} is not in {metrics_dir / 'evaluate.json'}; "
                       f"choose one of {', '.join(sorted(metrics)[:12])}, ...")
    table = (reports_dir / "table.md").read_text() if (reports_dir / "table.md").is_file() else ""
    settings = registered_settings(config, details)
    test_set = (details.get("test_set") or {}).get("version")
    if test_set is not None and not (isinstance(test_set, str) and test_set):
        raise ValueError(f"{metrics_dir / 'details.json'}: test_set.version must be a non-empty string, got {test_set!r}")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{weights}: no model file to register")
    sha = file_sha256(weights)
    onnx_dir = tempfile.TemporaryDirectory(prefix="fusionnet-onnx-") if config.onnx else None
    onnx_path, onnx_info = None, {}
    if onnx_dir is not None:
        onnx_path, onnx_info = _export_onnx(Path(weights), Path(onnx_dir.name), config.onnx_opset, sha)
        log_to_run(f"ONNX export (opset {config.onnx_opset}) in {onnx_info['export_s']} s, carried as artifact 'onnx'")
    client = tracking_client()
    registry = get_client()
    with pipeline_parent(params, parent_run_id) as parent:
        run_id = start_step_run(client, parent, "register", params, None)
        try:
            trained_by = training_run_of(client, client.get_run(run_id).info.experiment_id, sha, parent)
            if trained_by:
                client.set_tag(run_id, "fusionnet.trained_by_run", trained_by)
            info = log_matting_model(run_id, Path(weights), settings, name=config.model_name, trained_by=trained_by,
                                     also_output_of=(parent,), tags={"fusionnet.checkpoint.sha256": sha},
                                     onnx=onnx_path)
            version = register_version(
                registry, info.model_uri, trained_by or run_id, metrics, table,
                tags={"fusionnet.checkpoint": str(weights), "fusionnet.checkpoint.sha256": sha,
                      "fusionnet.settings": json.dumps(settings, sort_keys=True), "fusionnet.register_run": run_id,
                      **({TEST_SET_TAG: test_set} if test_set else {})},
                name=config.model_name,
            )
            decision = promote(registry, str(version.version), config.metric, config.greater_is_better,
                               config.model_name, config.champion_alias, config.challenger_alias)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        finally:
            if onnx_dir is not None:
                onnx_dir.cleanup()
        client.set_terminated(run_id, status="FINISHED")
    result = {
        **decision.to_dict(),
        "uri": f"models:/{config.model_name}/{decision.version}",
        "alias_uri": f"models:/{config.model_name}@{decision.alias}",
        "run_id": run_id,
        "trained_by_run_id": trained_by,
        "model_id": info.model_id,
        "checkpoint": str(weights),
        "sha256": sha,
        "settings": settings,
        **({"onnx": onnx_info} if onnx_info else {}),
    }
    write_text_atomic(out, json.dumps(result, indent=2, allow_nan=True) + "\n")
    return result


def _export_onnx(weights: Path, folder: Path, opset: int, sha: str) -> tuple[Path, dict[str, Any]]:
    """`weights` exported to folder/model.onnx (fp32; fusionnet.onnx.export); the path and {opset, export_s}."""
    import time

    from fusionnet.inference.loading import load_model
    from fusionnet.onnx.export import export_onnx

    started = time.perf_counter()
    path = export_onnx(load_model(weights), folder / "model.onnx", opset=opset, source_sha256=sha)
    return path, {"opset": opset, "export_s": round(time.perf_counter() - started, 1), "artifact": "onnx"}


@task(name="register", **TASK_OPTIONS)
def register_task(
    params_path: Path, model: Path, metrics_dir: Path, reports_dir: Path, out: Path, parent_run_id: str | None
) -> dict[str, Any]:
    """Register `model` (register_pipeline_model): champion or challenger."""
    result = register_pipeline_model(load_params(params_path), Path(model), Path(metrics_dir), Path(reports_dir),
                                     Path(out), parent_run_id)
    log_to_run(f"registered {result['name']} v{result['version']} as @{result['alias']}: {result['reason']}")
    return result
