"""DVC stage `evaluate`: the three training steps' checkpoints -> the paper's Tables 1/2 rows, claims, pictures.

Reads params `evaluate` and data/foregrounds/manifest.parquet (a real photo that is the source of a
train or val foreground is not scored); writes the DVC metrics
metrics/table/{composites,photos}/<row>.json (the table's numbers only: `dvc metrics show` prints
one line per method), the plain outputs metrics/{evaluate,claims,photos,details}.json,
reports/table.md, reports/per_image*.csv and reports/pictures/, and logs them to MLflow as child
run "evaluate" of the pipeline's parent run. Runs the Prefect tasks `tune-refinement` and
`evaluate` (pipeline.tasks), the same the `train` flow runs after its steps; --no-mlflow calls
their code without Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from fusionnet.evaluation.config import EvalConfig
from fusionnet.io.params import load_params
import pipeline  # noqa: F401  (offline switches first)
from pipeline.env import wait_for_prefect_api
from pipeline.registry.models import pipeline_parent
from pipeline.tasks import evaluate_task, tune_refinement_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--segmentation", type=Path, default=Path("models/segmentation/model.safetensors"))
    parser.add_argument("--fusion", type=Path, default=Path("models/fusion/model.safetensors"))
    parser.add_argument("--joint", type=Path, default=Path("models/joint/model.safetensors"))
    parser.add_argument("--composites", type=Path, default=Path("data/composites"))
    parser.add_argument("--foregrounds", type=Path, default=Path("data/foregrounds"),
                        help="collect_foregrounds output: its manifest says which photos were trained on")
    parser.add_argument("--metrics", type=Path, default=Path("metrics"))
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only")
    args = parser.parse_args(argv)

    try:  # a bad params file is one line naming it, before Prefect or MLflow start or any file is written
        params = load_params(args.params)
        EvalConfig.from_params(params)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        message = " ".join(str(exc).split())
        parser.error(message if str(args.params) in message else f"{args.params}: {message}")
    checkpoints = {"segmentation": args.segmentation, "fusion": args.fusion, "joint": args.joint}
    files = (args.composites, args.metrics, args.reports, args.foregrounds)
    if args.no_mlflow:
        gf = tune_refinement_task.fn(args.params, args.joint, args.composites)
        record = evaluate_task.fn(args.params, checkpoints, *files, gf, None)
    else:
        wait_for_prefect_api()
        with pipeline_parent(params) as parent:  # a failed evaluation marks the pipeline run FAILED
            gf = tune_refinement_task(args.params, args.joint, args.composites)
            record = evaluate_task(args.params, checkpoints, *files, gf, parent)
        print(f"evaluate: logged MLflow run {record['run_id']} (parent {parent})", file=sys.stderr)
    for note in record["notes"]:
        print(f"evaluate: note: {note}", file=sys.stderr)
    held_out = record["photos"].get("held_out")
    if held_out:
        print(f"evaluate: photos scored (held out): {', '.join(held_out['scored']) or 'none'}; excluded: "
              + ("; ".join(f"{k} ({v})" for k, v in held_out["excluded"].items()) or "none"), file=sys.stderr)
    print(f"evaluate: test set {record['details']['test_set']['version']}", file=sys.stderr)
    print(json.dumps(record["details"]["seconds"]))
    print((args.reports / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
