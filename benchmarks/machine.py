"""What every benchmark prints first and records with its figures: the CPU, its flags, the versions, the load.

`record(name, rows)` writes benchmarks/results/<name>.json ({"machine": machine(), "rows": rows}); each row
is {"what", "command", "result", "target"} as in README's speed table, which `scripts/speed_table.py`
regenerates from these files (`make bench` does both). `command()` is the row's command: the script
and its arguments as run. FUSIONNET_BENCH_RESULTS names another results folder (the tests use one).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fusionnet.hardware import cpu_flags, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "amx_fp16", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def machine() -> dict:
    """CPU model, logical CPUs, the flags that decide precision (of FLAGS), torch/onnxruntime versions, load."""
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "flags": [f for f in FLAGS if f in flags],
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "load": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def header() -> str:
    m = machine()
    return (f"CPU: {m['cpu']}, {m['cpus']} logical CPUs; flags: {' '.join(m['flags']) or 'none of ' + ', '.join(FLAGS)}; "
            f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; load average {' '.join(map(str, m['load']))}")


def command() -> str:
    """The running benchmark's command line as a table cell: `python benchmarks/<script> ARGS...`."""
    return "`" + shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]) + "`"


def results_folder() -> Path:
    """$FUSIONNET_BENCH_RESULTS when set, else benchmarks/results (RESULTS)."""
    return Path(os.environ.get("FUSIONNET_BENCH_RESULTS") or RESULTS)


def record(name: str, rows: list[dict]) -> Path:
    """Write rows (what, command, result, target) to <results_folder()>/<name>.json, atomically."""
    folder = results_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    os.replace(tmp, path)
    return path
