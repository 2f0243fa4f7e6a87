#!/usr/bin/env bash
# GPU check, one command for a CUDA machine (e.g. an H100 lent for ~8 minutes, package registries only):
#   1. install the project as `make venv` does (.venv, constraints.txt, -e ".[test]"; uv, pip as fallback);
#   2. pytest -m cuda (the CUDA-marked tests);
#   3. benchmarks/gpu_check.py: training samples/s per step, inference ms per 800x800 image per precision,
#      and a short three-step training run on the photo profile, into ONE JSON file.
#
#   benchmarks/gpu_check.sh                                   # everything, in --total-s (480) seconds
#   benchmarks/gpu_check.sh --no-install --out results.json   # .venv already there
#   benchmarks/gpu_check.sh --no-install --device cpu --tiny --out /tmp/x.json   # CPU dry run (< 1 min)
#
# Own options: --no-install (or GPU_CHECK_NO_INSTALL=1), --total-s N (or GPU_CHECK_TOTAL_S; the whole
# script's budget: what install and pytest leave goes to gpu_check.py as --budget-s unless one is given),
# --pytest / --no-pytest (default: run it with --device cuda, skip it with --device cpu, where every
# CUDA test would only skip; collecting the suite costs ~20 s on 2 cores); GPU_CHECK_PYTHON: the
# interpreter (default .venv/bin/python). Everything else goes to gpu_check.py (--device, --tiny, --out, --budget-s,
# --sections, ...: `python benchmarks/gpu_check.py --help`). Nothing here reaches beyond the machine
# except the install's package registry. Exit status: gpu_check.py's, or pytest's when tests failed.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

install=1
[ "${GPU_CHECK_NO_INSTALL:-0}" = 1 ] && install=0
total_s=${GPU_CHECK_TOTAL_S:-480}
run_pytest=auto
device=cuda
tiny=0
out=""
budget_given=0
forward=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-install) install=0 ;;
    --total-s) total_s=$2; shift ;;
    --total-s=*) total_s=${1#*=} ;;
    --pytest) run_pytest=yes ;;
    --no-pytest) run_pytest=no ;;
    *)
      case "$1" in
        --device) device=${2:-}; forward+=("$1" "$device"); shift ;;
        --device=*) device=${1#*=}; forward+=("$1") ;;
        --out) out=${2:-}; shift ;;
        --out=*) out=${1#*=} ;;
        --tiny) tiny=1; forward+=("$1") ;;
        --budget-s|--budget-s=*) budget_given=1; forward+=("$1") ;;
        *) forward+=("$1") ;;
      esac ;;
  esac
  shift
done
if [ -z "$out" ]; then
  if [ "$tiny" = 1 ]; then out="${TMPDIR:-/tmp}/gpu_check-tiny.json"; else out="benchmarks/results/gpu_check.json"; fi
fi
why_not="--no-pytest"
if [ "$run_pytest" = auto ]; then
  if [ "$device" = cpu ]; then run_pytest=no; why_not="--device cpu; --pytest runs it"; else run_pytest=yes; fi
fi

# Offline hygiene, as the Makefile: nothing phones home.
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
export PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS=false HF_HUB_OFFLINE=1

# 1. install: the Makefile's `venv` target (README), or its commands where make is missing
if [ "$install" = 1 ]; then
  echo "== install (.venv, constraints.txt)"
  if command -v make >/dev/null 2>&1; then
    make venv
  else
    test -x .venv/bin/python || "${PYTHON:-python3}" -m venv .venv
    .venv/bin/python -m pip install --quiet -c constraints.txt uv
    .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python -c constraints.txt -e ".[test]" \
      || .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
    touch .venv/.installed
  fi
  echo "   install took $((SECONDS - started)) s"
fi
PY=${GPU_CHECK_PYTHON:-.venv/bin/python}  # the tests pass their own interpreter
if [ ! -x "$PY" ]; then
  echo "gpu_check.sh: no $PY; run without --no-install first" >&2
  exit 2
fi

# pymatting compiles its numba kernels into the venv on first import (~70 s of one core): warm that cache
# beside pytest, for the training run's photo data (as scripts/run_pipeline.sh does); not for a dry run
warm_pid=""
cleanup() { if [ -n "$warm_pid" ]; then kill "$warm_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT
if [ "$tiny" = 0 ] && [ -d ../shared/data/alphamatting-dev ]; then
  nice -n 10 "$PY" -c "import pymatting" >/dev/null 2>&1 &
  warm_pid=$!
fi

# 2. pytest -m cuda; exit status 5 means no test carries the cuda marker (recorded, not a failure)
pytest_rc=""
pytest_summary="not run ($why_not)"
if [ "$run_pytest" = yes ]; then
  echo "== pytest -m cuda"
  log=$(mktemp)
  pytest_rc=0
  "$PY" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$log" || pytest_rc=${PIPESTATUS[0]}
  pytest_summary=$(grep -v '^\s*$' "$log" | tail -n 1)
  rm -f "$log"
fi

# 3. the benchmark, in what the budget has left (at least 30 s) unless --budget-s was given
args=(--out "$out")
if [ -n "$pytest_rc" ]; then args+=(--pytest-rc "$pytest_rc"); fi
args+=(--pytest-summary "$pytest_summary")
if [ "$budget_given" = 0 ]; then
  left=$((total_s - (SECONDS - started) - 10))
  [ "$left" -lt 30 ] && left=30
  args+=(--budget-s "$left")
fi
echo "== benchmarks/gpu_check.py ${args[*]} ${forward[*]}"
rc=0
marker=$(mktemp)  # an --out left by an earlier run must not pass for this run's
"$PY" benchmarks/gpu_check.py "${args[@]}" "${forward[@]}" || rc=$?

echo
echo "gpu_check.sh: $((SECONDS - started)) s in all; pytest -m cuda: ${pytest_summary}"
if [ -f "$out" ] && [ "$out" -nt "$marker" ]; then echo "gpu_check.sh: JSON written to $out"; else echo "gpu_check.sh: no JSON written ($out)" >&2; fi
rm -f "$marker"
if [ "$rc" = 0 ] && [ -n "$pytest_rc" ] && [ "$pytest_rc" != 0 ] && [ "$pytest_rc" != 5 ]; then rc=$pytest_rc; fi
exit "$rc"
