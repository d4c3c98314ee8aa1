# Two commands on a fresh machine (Python >= 3.10 with venv and pip):
#   make demo   -> creates .venv, installs, runs the main job on offline real data
#   make test   -> creates .venv, installs, runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Parallel test workers (pytest-xdist); the suite is sized for 2 cores.
WORKERS ?= 2

.PHONY: demo test install clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/demo.py --out results/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --durations=15 tests

clean:
	rm -rf $(VENV) results .pytest_cache
