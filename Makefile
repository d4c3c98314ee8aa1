# Two commands on a fresh machine (Python >= 3.10 with venv and pip):
#   make demo   -> creates .venv, installs, runs the main job on offline real data
#   make test   -> creates .venv, installs, runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Parallel test workers (pytest-xdist); the suite is sized for 2 cores.
WORKERS ?= 2

.PHONY: demo test test-papers install clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/demo.py --out results/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --durations=25 tests

# Every paper config of experiments/papers end to end on mocked TFDS data in smoke mode
# (`make test` runs 11 of the 14; this target runs all of them and nothing else).
test-papers: $(STAMP)
	IB_LASSO_PAPER_SMOKE=all $(BIN)/python -m pytest -q -n $(WORKERS) tests/test_pipeline.py -k paper_config_smoke

# Benchmarks print ratios measured side by side (no assertions).
bench: $(STAMP)
	$(BIN)/python experiments/bench_gram.py
	$(BIN)/python experiments/bench_lambda.py
	$(BIN)/python experiments/bench_latency.py

clean:
	rm -rf $(VENV) results .pytest_cache
