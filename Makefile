# Quick start on a fresh machine that has only python3 and pip:
#   make demo   prepare the bundled corpus, train the tiny model, export, release and serve it
#   make test   run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.glassbox-installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch is pinned to 2.13.0 first: that is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/glassbox demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" --durations=20 tests

clean:
	rm -rf $(VENV) demo runs
