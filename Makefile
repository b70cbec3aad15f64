# Two entry points for a fresh machine: `make run` (train the tiny preset on the embedded corpus, then
# evaluate, sample and infill) and `make test`. Both create .venv and install what they need.
# torch is pinned to 2.13.0 so pip takes the CPU wheel on disk instead of a multi-GB CUDA build.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CG := $(VENV)/bin/codegen2
RUN_DIR ?= runs/tiny

.PHONY: run test lessons install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.core-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.core-installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.core-installed
install-dev: $(VENV)/.dev-installed

run: $(VENV)/.core-installed
	$(CG) train --preset tiny --out $(RUN_DIR) $$([ -f $(RUN_DIR)/config.toml ] && echo --resume)
	$(CG) eval heldout --checkpoint $(RUN_DIR) --baseline --max-tokens 40000 --n-infill 60
	$(CG) sample --checkpoint $(RUN_DIR) --max-new-tokens 64 --decoder fast --stop $$'\n\n\n' \
		--prompt $$'import os\n\n\ndef read_lines(path):\n    """Return the lines of the file at path."""\n'
	$(CG) infill --checkpoint $(RUN_DIR) --max-new-tokens 32 --decoder fast --show-full \
		--prefix $$'def mean(values):\n    total = 0\n    for value in values:\n' \
		--suffix $$'\n    return total / len(values)\n'

# The CodeGen2 lessons at small scale: 8 arms x 2 seeds, then docs/lessons.md (resumable; about an hour on 2 cores).
lessons: $(VENV)/.core-installed
	$(PY) -m pip install -q -e ".[viz]"
	$(PY) experiments/lessons/study.py

test: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -p no:cacheprovider

clean:
	rm -rf runs .pytest_cache build
