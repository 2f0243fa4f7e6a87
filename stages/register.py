"""DVC stage `register`: the joint model -> MLflow pyfunc `late-fusion-matting`, champion or challenger.

Reads params `register` (and the evaluation's metrics/ and reports/table.md); writes
models/registered.json (name, version, alias, uri, the decision and why). The new version is
compared with the champion only when both were evaluated on the same test set (details.json's
test_set.version, stored as tag fusionnet.test_set); otherwise it becomes challenger and says so.
Runs the Prefect task `register` (pipeline.tasks), the same the `train` flow runs last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pipeline  # noqa: F401  (offline switches first)
from pipeline.env import wait_for_prefect_api
from pipeline.registry.registration import register_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, default=Path("models/joint/model.safetensors"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics"))
    parser.add_argument("--reports", type=Path, default=Path("reports"))
    parser.add_argument("--out", type=Path, default=Path("models/registered.json"))
    args = parser.parse_args(argv)

    wait_for_prefect_api()
    result = register_task(args.params, args.model, args.metrics, args.reports, args.out, None)
    print(json.dumps(result, indent=2))
    print(f"register: {result['name']} v{result['version']} -> @{result['alias']}: {result['reason']}", file=sys.stderr)
    if result["champion_version"] not in (None, result["version"]) and not result["compared"]:
        print(f"register: NOT COMPARED: test set {result['test_set'] or '(unrecorded)'} differs from champion "
              f"v{result['champion_version']}'s {result['champion_test_set'] or '(unrecorded)'}; champion alias "
              "not moved", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
