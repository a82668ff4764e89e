# One entry point for people and CI. Both main targets work from nothing on a fresh Debian machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,dashboard]'
	touch $(STAMP)

## The main job: a demo microgrid on embedded defaults (meter simulator, HOUSEHOLDS node
## processes over libp2p, SQLite ledgers, the dashboard on http://127.0.0.1:8050). It stops after
## ROUNDS settled rounds (Ctrl-C stops it sooner), verifies every ledger, compares the heads.
HOUSEHOLDS ?= 5
ROUNDS ?= 30
demo: $(STAMP)
	rm -rf demo-run
	$(BIN)/microgrid demo --households $(HOUSEHOLDS) --rounds $(ROUNDS) --dir demo-run

## The whole suite: lint, import contracts (pyproject.toml [tool.importlinter]), then every test
## (soak/nemesis runs bounded and seeded).
## PostgreSQL tests use the local Debian server (.ci/postgres.sh starts it; skipped if it can't).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	MICROGRID_TEST_PG=$${MICROGRID_TEST_PG:-$$(bash .ci/postgres.sh 2>/dev/null || true)} \
		$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

## Benchmarks run in their own environment (peer libraries such as pymarket pin old pandas).
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q -e '.[dev,dashboard]' -r bench/requirements.txt
	touch $(BENCH_VENV)/.installed

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python -m bench $(BENCHES)

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info demo-ledger.db* demo-run
