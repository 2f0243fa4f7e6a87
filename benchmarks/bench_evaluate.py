"""Wall time and CPU time of the `evaluate` stage on the default data (no MLflow), per phase.

    .venv/bin/python benchmarks/bench_evaluate.py [--composites data/composites] [--models models]
                                                  [--params params.yaml] [--threads N] [--no-photos]

Uses data/composites and models/<step>/model.safetensors when they exist; otherwise it builds the
default composites with the data stages and three random-weight models of params' `model.backbone`
in a temporary folder (the network's cost does not depend on its weights). Prints the phases'
seconds (fusionnet.evaluation.run's own timings) and the process's CPU seconds (children included),
which, on a machine shared with other jobs, is the better guide to the time on two idle cores.
Target (issue 5): under ~90 s on 2 cores for the default composites. Records the figures, naming the
models, in benchmarks/results/evaluate.json (benchmarks/machine.py); exit 1 when the wall time misses the
target (still recorded).
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import command, header, record  # noqa: E402

sys.path.insert(0, str(ROOT))
from fusionnet.train.config import STEPS  # noqa: E402

TARGET_S = 90.0  # issue 5: the evaluate stage on the default composites, 2 cores


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def default_composites(params_path: Path, tmp: Path) -> Path:
    for cmd in (
        ["stages/collect_foregrounds.py", "--params", str(params_path), "--out", str(tmp / "foregrounds")],
        ["stages/composite.py", "--params", str(params_path), "--foregrounds", str(tmp / "foregrounds"),
         "--out", str(tmp / "composites")],
    ):
        subprocess.run([sys.executable, *cmd], cwd=ROOT, check=True, capture_output=True)
    return tmp / "composites"


def random_models(backbone: str, tmp: Path) -> dict[str, Path]:
    import torch

    from fusionnet.model import LateFusionNet, save

    torch.manual_seed(0)
    model = LateFusionNet(backbone)
    paths = {s: tmp / s / "model.safetensors" for s in STEPS}
    save(model, paths["segmentation"])
    with torch.no_grad():
        for p in model.fusion.parameters():  # the fusion step changes only the fusion network
            p.mul_(1.01)
        save(model, paths["fusion"])
        for p in model.parameters():
            p.mul_(1.001)
    save(model, paths["joint"])
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--composites", type=Path, default=ROOT / "data" / "composites")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: params)")
    parser.add_argument("--no-photos", action="store_true", help="leave out the real photographs")
    args = parser.parse_args()

    from fusionnet.evaluation.run import run_evaluation

    print(header())

    params = yaml.safe_load(args.params.read_text())
    evaluate = copy.deepcopy(params.get("evaluate") or {})
    if args.threads is not None:
        evaluate["threads"] = args.threads
    if args.no_photos:
        evaluate.setdefault("photos", {})["root"] = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        composites = args.composites
        if not (composites / "manifest.parquet").is_file():
            print(f"{composites}: absent; building the default composites in a temporary folder")
            composites = default_composites(args.params, tmp)
        checkpoints = {s: args.models / s / "model.safetensors" for s in STEPS}
        shown = os.path.relpath(args.models, ROOT) if args.models.resolve().is_relative_to(ROOT) else args.models
        model_text = f"trained checkpoints {shown}/<step>/model.safetensors"
        if not all(p.is_file() for p in checkpoints.values()):
            backbone = (params.get("model") or {}).get("backbone", "densenet121")
            print(f"{args.models}: no trained models; random-weight {backbone} models instead")
            checkpoints = random_models(backbone, tmp / "models")
            model_text = f"random-weight {backbone} (NO trained model)"
        start_wall, start_cpu = time.perf_counter(), cpu_seconds()
        evaluation = run_evaluation({**params, "evaluate": evaluate}, checkpoints, composites, tmp / "metrics",
                                tmp / "reports", base_dir=args.params.resolve().parent)
        wall, cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu
    details = evaluation["details"]
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, torch threads "
          f"{evaluate.get('threads') or 'all'}, metric workers {evaluate.get('workers', 2)}")
    print(f"images: {details['images']['test']} test composites, {details['images']['photos']} photos; "
          f"network {details['network']['max_side']} px {details['network']['precision']}")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in details["seconds"].items()))
    print(f"evaluation wall {wall:.1f} s, CPU {cpu:.1f} s (this process and its metric workers)")
    record("evaluate", [{
        "what": f"evaluation ({details['images']['test']} test composites, {details['images']['photos']} photos, "
                f"network {details['network']['max_side']} px {details['network']['precision']}); model: {model_text}",
        "command": command(),
        "result": f"{wall:.0f} s wall, {cpu:.0f} s CPU; " + ", ".join(f"{k} {v:.1f}" for k, v in details["seconds"].items()),
        "target": f"< {TARGET_S:.0f} s"}])
    print(f"target < {TARGET_S:.0f} s wall: {'PASS' if wall < TARGET_S else 'FAIL'}")
    return 0 if wall < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
