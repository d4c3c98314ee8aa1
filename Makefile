# Two commands on a fresh machine (Python >= 3.10 with venv and pip):
#   make demo   -> creates .venv, installs, runs the main job on offline real data
#   make test   -> creates .venv, installs, runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Parallel test workers (pytest-xdist); the suite is sized for 2 cores. --maxschedchunk=1:
# each worker takes the next test when it is free (xdist's default chunks gave the first
# worker every long test; the conftest orders them longest first).
WORKERS ?= 2
# pip's byte-compilation of every installed module is 40% of the install (85 -> 48 s); with
# --no-compile, Python writes the bytecode of the modules actually imported on first import,
# which needs PYTHONDONTWRITEBYTECODE unset (some machines set it) for our runs.
RUN := PYTHONDONTWRITEBYTECODE= $(BIN)/python
PYTEST := $(RUN) -m pytest -q -n $(WORKERS) --maxschedchunk=1

.PHONY: demo test lint test-papers test-onnx install clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(RUN) experiments/demo.py --out results/demo

# The linter first (seconds), then the package's docstring examples (a process of their own:
# tests/conftest.py gives the tests 4 CPU devices and the fast-compile XLA flags, which an
# earlier import of the package would pre-empt), then the tests. The export tests' depth
# variants run in test-onnx (see tests/test_export.py).
lint: $(STAMP)
	$(BIN)/ruff check ib_lasso_jax tests experiments

# torch comes with the test extra (the reference modules of tests/torch_reference.py): a broken
# install must fail here, not skip the PyTorch comparisons.
test: lint
	$(RUN) -c "import torch, safetensors"
	$(RUN) -m pytest -q -p no:cacheprovider --doctest-modules ib_lasso_jax
	$(PYTEST) --durations=25 tests -m "not depth_variant"

# Every paper config (experiment/configs/papers) end to end on mocked TFDS data in smoke mode, and
# nothing else (`make test` runs them too, with everything else).
test-papers: $(STAMP)
	$(PYTEST) tests/test_pipeline.py -k paper_config_smoke

# The ONNX export tests (tests/test_export.py) and the onnxruntime latency test, skipped by
# `make test` without the optional extra, in a venv of their own with '.[test,onnx]': jax2onnx 0.17 caps orbax-checkpoint below
# 0.11.37, so installing the extra into .venv would downgrade its orbax-checkpoint.
ONNX_VENV  := .venv-onnx
ONNX_STAMP := $(ONNX_VENV)/.installed

$(ONNX_STAMP): pyproject.toml
	$(PYTHON) -m venv $(ONNX_VENV)
	$(ONNX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(ONNX_VENV)/bin/python -m pip install --quiet --no-compile -e '.[test,onnx]'
	touch $(ONNX_STAMP)

# The import first: a broken install must fail here, not skip the tests.
test-onnx: $(ONNX_STAMP)
	$(ONNX_VENV)/bin/python -c "import jax2onnx, onnx, onnxruntime"
	PYTHONDONTWRITEBYTECODE= $(ONNX_VENV)/bin/python -m pytest -q -p no:cacheprovider -rs tests/test_export.py \
		"tests/test_latency.py::test_measure_onnxruntime"

# Benchmarks print ratios measured side by side (no assertions): every one, on the backend JAX
# finds (an accelerator when there is one), into one markdown report, results/bench.md.
bench: $(STAMP)
	$(RUN) experiments/bench_all.py --out results/bench.md

clean:
	rm -rf $(VENV) $(ONNX_VENV) results .pytest_cache
