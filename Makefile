# The two commands of the README. Both create .venv on first use (torch pinned to 2.14.1,
# torchattacks installed with --no-deps because its release pins an old requests).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint setup

$(BIN)/dpaat: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps torchattacks==3.5.1
	touch $(BIN)/dpaat

setup: $(BIN)/dpaat

## Set up, then train DPAAT -> evaluate -> predict on the embedded default (no external servers).
demo: setup
	$(BIN)/dpaat demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Set up, lint, type-check and run every test. One torch thread per process: the full-stack
## tests run the API, a worker and pytest side by side on 2 cores, and oversubscribed threads
## spin against each other (measured several-fold slower).
test: lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/pytest
