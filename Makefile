# One entry point for people and CI. Both main targets work from nothing on a fresh Debian machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean pi-test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,dashboard]'
	@# the demo runs its nodes with python -OO (node/tools/demo.py NODE_PYTHON_OPTIONS):
	@# compile the dependencies for it once, not in every node's first start
	-$(BIN)/python -OO -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1
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
		$(BIN)/python -m pytest -q --durations=25

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

## The Raspberry Pi install (packaging/install.sh) proven in an emulated Debian bookworm arm64
## root: debootstrap + qemu-user-static (installed here from apt), then install, init, meter
## test against the simulator, a node answering status, uninstall. Needs root and binfmt_misc.
## Cold: about the time in docs/raspberry-pi.md; the root, apt's and pip's downloads are cached
## under ~/.cache/microgrid-pi-test (MICROGRID_PI_FRESH=1 ignores them, MICROGRID_PI_KEEP=1
## keeps the root).
pi-test: $(STAMP)
	@command -v debootstrap >/dev/null && command -v qemu-aarch64-static >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends debootstrap qemu-user-static >/dev/null; }
	MICROGRID_PI_TEST=1 $(BIN)/python -m pytest -q -s -p no:cacheprovider -m pi tests/pi
