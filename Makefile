# Four commands: `make dev` (UI on the demo catalogue), `make test`, `make materialize` (every asset, headless)
# and `make bench` (benchmarks). Everything installs from the lock.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The loader's torch extra, pinned to the release that lies on the build machines' disk (a CPU build).
TORCH := torch==2.13.0
# The repo's instance even where the shell exports another DAGSTER_HOME: its dagster.yaml holds what the
# pipeline relies on (one step at a time per dataset pool, 2 runs at once that `auto` Dask memory is shared
# by, run monitoring that frees a killed run's slots), which a user's other instance would silently drop.
# Another on purpose: `make dev DAGSTER_HOME=/path` (with those settings in its dagster.yaml).
export DAGSTER_HOME := $(CURDIR)/dagster_home
export AIFACTORY_HOME ?= $(CURDIR)/.aifactory

.PHONY: setup dev materialize demo test lint bench bench-validation bench-pipeline bench-memory lock clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("aifactory needs Python 3.11+, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/python -m aifactory_assets.demo

dev: demo
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

materialize: demo
	$(BIN)/python -m aifactory_assets.materialize_all $(DATASETS)

test: setup
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: bench-validation bench-pipeline bench-memory

bench-validation: setup
	$(BIN)/python -m benchmarks.run

bench-pipeline: setup
	$(BIN)/python -m benchmarks.pipeline

# 6 GiB of CSV through two Dask workers of 1 GB each (2 GB in all); fails if a worker is killed for memory.
bench-memory: setup
	$(BIN)/python -m benchmarks.pipeline --gb 6 --memory-limit 1GB --only-aifactory --workdir .bench/pipeline6

lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra demo --extra test --universal --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .aifactory .pytest_cache .ruff_cache
	find dagster_home -mindepth 1 ! -name dagster.yaml -exec rm -rf {} +
