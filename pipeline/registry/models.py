"""MLflow Model Registry for the matting model: log the pyfunc, register it, champion/challenger, pull.

- `log_matting_model` logs a fusionnet model file as an MLflow pyfunc (pipeline/registry/pyfunc_model.py,
  "model from code") with a signature, a copy of the fusionnet package (code_paths) and explicit
  pip requirements (pinned to what is installed: nothing is resolved over the network; no conda).
- `register_version` registers it under `late-fusion-matting`, with the evaluation metrics as
  version tags ("metric.<row>.<region>.<metric>") and the table as the version description.
- `promote` moves alias `champion` to the new version only when it beats the current champion on
  the configured metric (e.g. `raw.band.sad`, lower is better) and both were evaluated on the same
  test set (version tag "fusionnet.test_set": the test composites' data version from
  metrics/details.json); otherwise the new version gets alias `challenger`, and when the test sets
  differ (or one is unrecorded) it says so and does not compare. A first version is champion; a tie
  is not a win.
- `pull` downloads a registered model (e.g. `models:/late-fusion-matting@champion`) to a folder.

The pipeline's `register` step that uses these (reading the evaluation, linking the model to the
training run that produced its weights) is pipeline.registry.registration.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pipeline  # noqa: F401  (offline switches before mlflow is imported)
import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.tracking import store as store_rule
from pipeline.tracking.runs import get_client, parent_run, tracking_uri

MODEL_NAME = "late-fusion-matting"
CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG_PREFIX = "metric."
TEST_SET_TAG = "fusionnet.test_set"  # the data version of the test set the version's metrics come from
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
ONNX_DISTRIBUTIONS = ("onnx", "onnxruntime")  # pinned too when the model carries an ONNX file
# The pyfunc's runtime needs, pinned to the installed versions (an offline environment cannot resolve).
REQUIREMENT_DISTRIBUTIONS = (
    "mlflow", "torch", "torchvision", "numpy", "scipy", "pillow", "safetensors", "numba", "pandas", "pyyaml",
)


def pip_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    """`name==installed version` for every runtime dependency of the pyfunc (and `extra` ones)."""
    pins = []
    for dist in (*REQUIREMENT_DISTRIBUTIONS, *extra):
        try:
            pins.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pins.append(dist)
    return pins


def flatten_metrics(nested: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"raw": {"band": {"sad": 1.0}}} -> {"raw.band.sad": 1.0}; non-numbers are left out."""
    flat: dict[str, float] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _fusionnet_code_copy(tmp: Path) -> Path:
    """A copy of the fusionnet package without caches (numba/pyc files are machine-specific)."""
    import fusionnet

    source = Path(fusionnet.__file__).resolve().parent
    target = tmp / "fusionnet"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
    return target


def log_matting_model(
    run_id: str, weights: Path, settings: Mapping[str, Any], name: str = "model", trained_by: str | None = None,
    also_output_of: tuple[str, ...] = (), tags: Mapping[str, str] | None = None, onnx: Path | None = None,
):
    """Log `weights` (a fusionnet model file) as a pyfunc in run `run_id`; returns MLflow's ModelInfo.

    settings: the pyfunc's inference settings (max_side, precision, refine, radius, eps, device).
    onnx: an ONNX export of the same weights (`fusionnet.onnx.export`), carried as artifact "onnx"
    beside them (a pulled model can then run on ONNX Runtime: `fusionnet matte --model .../x.onnx`).
    The MLflow 3 LoggedModel `name` is an output of run `run_id` (which packaged it), of
    `trained_by` (the run that trained the weights: the model's source run when given) and of the
    runs `also_output_of` (e.g. the pipeline's parent run), so their Models column shows it.
    tags: set on the LoggedModel.
    """
    import numpy as np
    from mlflow.entities import LoggedModelOutput

    from pipeline.registry.pyfunc_model import images_frame, model_signature

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no model file to register")
    if onnx is not None and not Path(onnx).is_file():
        raise FileNotFoundError(f"{onnx}: no ONNX file to register")
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    source_run = trained_by or run_id
    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=source_run, model_type="late-fusion-matting",
        params={k: v[:6000] for k, v in client.get_run(source_run).data.params.items()},
        tags={"fusionnet.packaged_by_run": run_id, **(tags or {})},
    )
    with tempfile.TemporaryDirectory() as tmp:
        settings_path = Path(tmp) / "settings.json"
        settings_path.write_text(json.dumps(dict(settings), indent=2, sort_keys=True))
        code = _fusionnet_code_copy(Path(tmp))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                model_id=logged.model_id,
                python_model=str(PYFUNC_CODE),
                artifacts={"weights": str(weights), "settings": str(settings_path),
                           **({"onnx": str(onnx)} if onnx is not None else {})},
                code_paths=[str(code)],
                signature=model_signature(int(settings["max_side"]), bool(settings["refine"])),
                input_example=images_frame([np.full((32, 32, 3), 128, np.uint8)]),  # also a serving smoke test
                pip_requirements=pip_requirements(ONNX_DISTRIBUTIONS if onnx is not None else ()),
            )
    for other in dict.fromkeys((source_run, *also_output_of)):  # in order, once each
        if other != run_id:
            client.log_outputs(other, [LoggedModelOutput(logged.model_id, step=0)])
    return info


def register_version(
    client: MlflowClient,
    model_uri: str,
    run_id: str,
    metrics: Mapping[str, float],
    description: str,
    tags: Mapping[str, str] | None = None,
    name: str = MODEL_NAME,
):
    """Register `model_uri` under `name`; metrics become tags "metric.<key>". Returns the ModelVersion.

    run_id: the run the version names as its source (the run that trained the weights). A
    `models:/m-<id>` uri (an MLflow 3 LoggedModel) is linked both ways: the version's model_id, and
    the LoggedModel's tag mlflow.modelVersions, from which the UI's Models column shows the version.
    """
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Late Fusion CNN for digital matting (Zhang et al. 2019)")
    all_tags = {f"{METRIC_TAG_PREFIX}{k}": repr(float(v)) for k, v in metrics.items()}
    all_tags.update({k: str(v)[:5000] for k, v in (tags or {}).items()})
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    model_version = client.create_model_version(
        name, source=model_uri, run_id=run_id, tags=all_tags, description=description[:5000], model_id=model_id
    )
    if model_id is not None:
        _list_version_on_model(client, model_id, name, str(model_version.version))
    return model_version


def _list_version_on_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Add {name, version} to LoggedModel `model_id`'s mlflow.modelVersions tag, once (a tracking
    server adds it itself; a SQLite store does not)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if not any(e.get("name") == name and str(e.get("version")) == version for e in listed):
        listed.append({"name": name, "version": version})
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})


@dataclass
class Promotion:
    """What `promote` decided: the alias given to `version` and why."""

    name: str
    version: str
    alias: str
    metric: str
    value: float
    champion_version: str | None
    champion_value: float | None
    reason: str
    test_set: str | None = None
    champion_test_set: str | None = None
    compared: bool = False  # whether the metric was compared with a champion (same test set)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def beats(value: float, other: float, greater_is_better: bool) -> bool:
    """Strictly better (a tie is not a win); NaN never wins."""
    if math.isnan(value):
        return False
    return value > other if greater_is_better else value < other


def promote(
    client: MlflowClient,
    version: str,
    metric: str,
    greater_is_better: bool = False,
    name: str = MODEL_NAME,
    champion_alias: str = CHAMPION,
    challenger_alias: str = CHALLENGER,
) -> Promotion:
    """Give `version` alias champion if it beats the current champion on `metric`, else challenger.

    Both values are read from the versions' "metric.<metric>" tags (set by register_version), and
    compared only when both versions carry the same TEST_SET_TAG: metrics on different test data
    (or on unrecorded data) do not rank models, so then the new version is challenger, the
    champion alias stays, and the reason says why. A missing metric tag reads as NaN:
    - `version` without the metric never takes the alias from an existing champion, whatever the
      test sets and even from a champion that lacks the metric too (challenger, "v<version> has no
      <metric>, ..."); with no champion yet it is champion ("no champion yet; v<version> has no
      <metric>").
    - A champion without the metric (registered by other means) but on the same test set counts as
      beaten by a `version` that has it ("champion v<n> has no <metric>").
    """
    new = client.get_model_version(name, version)
    value = float(new.tags.get(f"{METRIC_TAG_PREFIX}{metric}", "nan"))
    test_set = new.tags.get(TEST_SET_TAG) or None
    try:
        champion = client.get_model_version_by_alias(name, champion_alias)
    except MlflowException:
        champion = None
    champion_value: float | None = None
    champion_test_set = None if champion is None else (champion.tags.get(TEST_SET_TAG) or None)
    compared = False
    if champion is None:
        alias = champion_alias
        reason = "no champion yet" + (f"; v{version} has no {metric}" if math.isnan(value) else "")
    elif str(champion.version) == str(version):
        alias, reason = champion_alias, "already the champion"
    elif math.isnan(value):
        # nothing to rank it by: the champion keeps the alias, also one that lacks the metric too
        alias = challenger_alias
        reason = f"v{version} has no {metric}, so @{champion_alias} stays on v{champion.version}"
    elif test_set is None or test_set != champion_test_set:
        alias = challenger_alias
        reason = (f"not compared with champion v{champion.version}: v{version} was evaluated on test set "
                  f"{test_set or '(unrecorded)'}, the champion on {champion_test_set or '(unrecorded)'}; "
                  f"metrics on different test data do not rank models, so @{champion_alias} stays on "
                  f"v{champion.version} (move it by hand if intended)")
    else:
        compared = True
        champion_value = float(champion.tags.get(f"{METRIC_TAG_PREFIX}{metric}", "nan"))
        direction = "higher" if greater_is_better else "lower"
        if math.isnan(champion_value):
            alias, reason = champion_alias, f"champion v{champion.version} has no {metric}"
        elif beats(value, champion_value, greater_is_better):
            alias = champion_alias
            reason = f"{metric} {value:.6g} beats champion v{champion.version}'s {champion_value:.6g} ({direction} is better)"
        else:
            alias = challenger_alias
            reason = (
                f"{metric} {value:.6g} does not beat champion v{champion.version}'s {champion_value:.6g} "
                f"({direction} is better)"
            )
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), "fusionnet.promotion", reason)
    return Promotion(
        name=name,
        version=str(version),
        alias=alias,
        metric=metric,
        value=value,
        champion_version=None if champion is None else str(champion.version),
        champion_value=champion_value,
        reason=reason,
        test_set=test_set,
        champion_test_set=champion_test_set,
        compared=compared,
    )


# ----------------------------------------------------------------------------- pulling


def model_artifacts(model_dir: str | os.PathLike) -> dict[str, Path]:
    """{artifact name: file} of a downloaded pyfunc model folder, from its MLmodel (weights, settings, onnx)."""
    model_dir = Path(model_dir)
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise FileNotFoundError(f"{model_dir}: not an MLflow model folder (no MLmodel file)")
    spec = yaml.safe_load(mlmodel.read_text())
    try:
        artifacts = spec["flavors"]["python_function"]["artifacts"]
        return {name: model_dir / entry["path"] for name, entry in artifacts.items()}
    except (KeyError, TypeError, AttributeError):
        return {}


def weights_file(model_dir: str | os.PathLike) -> Path:
    """The fusionnet model file inside a downloaded pyfunc model folder (from its MLmodel)."""
    try:
        return model_artifacts(model_dir)["weights"]
    except KeyError as exc:
        raise ValueError(f"{Path(model_dir) / 'MLmodel'}: not a fusionnet matting model (no 'weights' artifact)") from exc


def onnx_file(model_dir: str | os.PathLike) -> Path | None:
    """The ONNX export inside a downloaded pyfunc model folder (artifact "onnx"), or None if it has none."""
    return model_artifacts(model_dir).get("onnx")


PULLED_FILES = ".fusionnet-files"  # in every folder download_model writes: the files it put there


def download_model(uri: str, dest: str | os.PathLike, store_uri: str | None = None) -> Path:
    """Download model `uri` (models:/..., runs:/...) into folder `dest`, atomically; returns dest.

    store_uri: the MLflow store to look `uri` up in and download from, for both the tracking and the
    registry side (default: pipeline.tracking.store's rule, which never creates a store): never
    MLflow's own default, ./mlflow.db of the current folder.
    The files land in a temporary sibling first and are renamed into place when complete; an
    existing `dest` is replaced (callers decide whether it may be: resolver.pull). A file
    `fusionnet-model.json` records the uri it came from (and "onnx", the ONNX file's path in the
    folder, when the model carries one); PULLED_FILES lists every file written.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per file on stderr
    store_uri = store_uri or store_rule.tracking_uri(must_exist=True)
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with _default_store(store_uri):
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(tmp), tracking_uri=store_uri, registry_uri=store_uri
            ))
        model_dir = local if local.is_dir() else tmp  # MLflow 3: runs:/<run>/<name> lands in tmp/<name>
        weights_file(model_dir)  # fail before the rename when this is not a matting model
        onnx = onnx_file(model_dir)
        carried = {"onnx": str(onnx.relative_to(model_dir))} if onnx is not None else {}
        info = describe(uri, MlflowClient(tracking_uri=store_uri, registry_uri=store_uri))
        (model_dir / "fusionnet-model.json").write_text(json.dumps({"uri": uri, **info, **carried}, indent=2))
        written = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
        (model_dir / PULLED_FILES).write_text("\n".join([*written, PULLED_FILES]) + "\n")
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif dest.exists() or dest.is_symlink():
            dest.unlink()
        os.replace(model_dir, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


@contextmanager
def _default_store(store_uri: str) -> Iterator[None]:
    """MLflow's process-wide default tracking and registry store = `store_uri` meanwhile, then exactly as
    before (module state and environment variables; mlflow.set_tracking_uri would leave
    MLFLOW_TRACKING_URI set). A registered version whose source is a LoggedModel (models:/m-<id>) is
    fetched from the default store whatever tracking_uri download_artifacts is given, and MLflow's
    default is ./mlflow.db of the current folder (created if missing)."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri, {n: os.environ.get(n) for n in names})
    mlflow.set_tracking_uri(store_uri)
    mlflow.set_registry_uri(store_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved[0], saved[1]
        for name, value in saved[2].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """"models:/name@alias" -> (name, None, alias); "models:/name/3" -> (name, "3", None)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri}: not a models:/ URI")
    body = uri[len("models:/") :].strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, None, alias.split("/", 1)[0]
    parts = body.split("/")
    return parts[0], (parts[1] if len(parts) > 1 else None), None


def registered_version(uri: str, client: MlflowClient | None = None):
    """The ModelVersion behind a models:/name@alias or models:/name/N uri (None for other URIs), looked
    up in `client`'s registry (default: get_client())."""
    if not uri.startswith("models:/") or uri.startswith("models:/m-"):
        return None
    name, number, alias = parse_models_uri(uri)
    client = client or get_client()
    if alias is not None:
        return client.get_model_version_by_alias(name, alias)
    if number is None:
        raise ValueError(f"{uri}: give a version or an alias, e.g. models:/{name}@{CHAMPION}")
    return client.get_model_version(name, number)


def describe(uri: str, client: MlflowClient | None = None) -> dict[str, str]:
    """Registered name and version behind a models:/name@alias or models:/name/N uri ({} otherwise)."""
    found = registered_version(uri, client)
    if found is None:
        return {}
    _, _, alias = parse_models_uri(uri)
    return {"name": found.name, "version": str(found.version), **({"alias": alias} if alias is not None else {})}


# ----------------------------------------------------------------------------- the pipeline step


@contextmanager
def pipeline_parent(params: Mapping[str, Any], parent_run_id: str | None = None) -> Iterator[str]:
    """`parent_run_id` as is, else pipeline.tracking.runs.parent_run (found or created; FINISHED or FAILED after)."""
    if parent_run_id:
        yield parent_run_id
        return
    with parent_run(params, None) as run_id:
        yield run_id
