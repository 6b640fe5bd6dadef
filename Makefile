# Two commands are all a fresh machine needs (Python 3.11+ and make): `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench dev mutate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/shoal demo

# Test files are shared among TEST_WORKERS processes, each with its own nats-server (0: one process).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

dev: $(STAMP)
	$(BIN)/shoal dev

mutate: $(STAMP)
	$(BIN)/python -m pip install --quiet "mutmut>=3.8,<4"
	$(BIN)/python tests/mutation.py

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .shoal-dev .pytest_cache
