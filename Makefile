# The one dev loop. Every target sets up .venv itself (Python 3.11), so a fresh
# checkout needs nothing but `make <target>`.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all demo test test-fast fuzz lint format proto proto-check bench clean

all: lint test

# The torch pin, read from pyproject.toml so the message below cannot go stale.
TORCH  := $(shell sed -n 's/.*"torch==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)

# pip runs --quiet (its output is pages of wheels), so say first what takes the time.
$(STAMP): pyproject.toml
	@echo "setting up $(VENV): installing torch $(TORCH) (CPU), transformers, llm-compressor and the dev tools,"
	@echo "about 2 GB of packages: a few minutes the first time (quiet until done), nothing later"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@echo "$(VENV) ready: $$(du -sh $(VENV) | cut -f1)"
	touch $@

## demo: start a server on the embedded default and walk a deployer through miss, publish, hit, fetch
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

## test: the full test suite against real servers on loopback (also checks stub drift)
# One pytest process per core (at most 4: each compile test holds a torch model in memory);
# every process starts its own servers and moto emulators on free ports.
# --dist loadgroup keeps each xdist_group (the fuzz module's one server) in one process.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadgroup

## test-fast: the suite without the tests that run a real torch compile (marker `compile`), on both cores
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4 --dist loadgroup -m "not compile"

## fuzz: the property-based tests with fresh random cases, at least 10,000 in all (counts per rpc printed)
fuzz: $(STAMP)
	$(BIN)/python -m pytest -q -n 0 tests/test_fuzz.py --hypothesis-profile=fuzz

## lint: ruff check, ruff format --check, mypy, and the generated-stub drift check
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python scripts/gen_proto.py --check

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## proto: regenerate the committed stubs from proto/prebake/v1/*.proto
proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

## bench: every row of issue 10 as a ratio against a baseline measured in the same run, and the targets
# (cold vs warm deploy included; results also in bench/results.json). Under 10 minutes on 2 cores.
bench: $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.limits --lookups 200 --stalled 200

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache prebake-data
