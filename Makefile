# fusionnet: `make run` rebuilds the whole pipeline on the embedded default data (CPU, minutes);
# `make test` runs the test suite. Both create .venv on first use.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline hygiene: nothing phones home.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
# Tests start Prefect's temporary server; its 20 s start-up limit is too short on a loaded 2-core host.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv run test test-fast bench ui lock clean

venv: $(STAMP)

# constraints.txt pins every transitive version, so a fresh install resolves the same set.
# uv installs that set in ~30 s instead of pip's ~3 min (parallel downloads); pip stays the fallback.
# --compile-bytecode (pip's default): where PYTHONDONTWRITEBYTECODE is set, as on our CI hosts, every
# process would otherwise recompile what it imports (torch + torchvision: 15 s instead of 8 s).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c constraints.txt -e ".[test]" \
	  || $(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	PROFILE=$(PROFILE) bash scripts/run_pipeline.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# Every benchmark, then README's speed table regenerated from benchmarks/results/*.json (scripts/speed_table.py).
# A benchmark that misses its target still lets the others run; the exit status says whether any failed.
# QUICK=1: bench_inference with one timed round and two photos (~half the time). bench_server and bench_cli (seconds
# per photo, `fusionnet matte` vs `fusionnet serve`) serve
# make run's joint model when there is one (bench_video and bench_evaluate pick it up themselves).
# Measured with their defaults on the 2-core AMX host: bench_int8 ~5 min, bench_train ~3 min, bench_evaluate ~1.2 min, the others < 1 min.
BENCH_INFERENCE_ARGS ?= $(if $(QUICK),--quick,)
bench: $(STAMP)
	@failed=""; for b in benchmarks/bench_*.py; do echo "== $$b"; \
	  args=""; [ "$$b" = benchmarks/bench_inference.py ] && args="$(BENCH_INFERENCE_ARGS)"; \
	  case "$$b" in benchmarks/bench_server.py|benchmarks/bench_cli.py) [ -f models/joint/model.safetensors ] && args="--model models/joint/model.safetensors";; esac; \
	  $(BIN)/python $$b $$args || failed="$$failed $$b"; done; \
	$(BIN)/python scripts/speed_table.py; \
	if [ -n "$$failed" ]; then echo "benchmarks that missed a target or failed:$$failed"; exit 1; fi

ui: $(STAMP)
	@echo "runs table: http://127.0.0.1:5000/#/experiments/$$($(BIN)/python -c 'import mlflow; mlflow.set_tracking_uri("sqlite:///mlflow.db"); e = mlflow.get_experiment_by_name("fusionnet"); print(e.experiment_id if e else 0)')"
	$(BIN)/mlflow ui --app-name fusionnet --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# Regenerate the pinned set after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt

clean:
	rm -rf build dist *.egg-info .pytest_cache
