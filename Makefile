# `make demo` and `make test` work on a fresh machine: they build .venv first (torch CPU wheel before anything else,
# so pip never pulls a multi-GB CUDA build), then reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m dsmoe demo

test: $(STAMP)
	$(PY) -m ruff check dsmoe tests
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check dsmoe tests
	$(PY) -m ruff format --check dsmoe tests
	$(PY) -m mypy

clean:
	rm -rf $(VENV)
