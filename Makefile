# `make demo` and `make test` set themselves up on a fresh clone: nothing to install by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.strata-installed
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench ui clean dashboard-pictures

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q "$(TORCH)" 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import strata, torch, ray, mlflow, transformers, peft, bitsandbytes"
	$(PY) -c "from strata.models.brgemm_bf16 import build_where_used; print(build_where_used())"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py

test: $(STAMP)
	$(PY) -m pytest tests --durations=30

lint: $(STAMP)
	$(VENV)/bin/ruff check platform jobs serve_apps benchmarks tests
	$(VENV)/bin/ruff format --check platform jobs serve_apps benchmarks tests

# The README's dashboard pictures, plotted from a live Prometheus by the live dashboards test.
dashboard-pictures: $(STAMP)
	STRATA_DASHBOARD_PICTURES=dashboards/pictures $(PY) -m pytest tests/test_dashboards.py -k live_training -q

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf data runs mlruns benchmarks/results logs serve canary locks

ui: $(STAMP)
	$(VENV)/bin/strata ui
