#!/usr/bin/env bash
# The one script a session with a lent GPU runs on the device machine, from the repo root:
#
#   bash bench/gpu_check.sh            (device tool: run(command="bash bench/gpu_check.sh"))
#
# Builds pyattn from source against that machine's torch (CUDA kernels for sm_90a), runs the
# whole test suite on CUDA, runs `pyattn bench --full --device cuda`, and a compute-sanitizer
# memcheck over a small CUDA test subset. Everything lands flat in $OUT (at most 8 files) for
# committing under bench/results/:
#   gpu_check.log  every step, its exit status and time; the build log's tail; the sanitizer
#   tests.log      pytest -q tests
#   bench.log      the benchmark's progress and table
#   bench-cuda.json, bench-cuda.csv, bench-cuda-speedup.png, bench-cuda-memory.png
#
# A failing step does not stop the rest. The whole script keeps inside GPU_CHECK_BUDGET_S
# (default 530 s) so that one device call (10 minutes) holds it with room for the start-up.
set -uo pipefail

OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
BUDGET=${GPU_CHECK_BUDGET_S:-530}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYATTN_CUDA=${PYATTN_CUDA:-1} PYATTN_CUDA_ARCHS=${PYATTN_CUDA_ARCHS:-90a} MAX_JOBS=${MAX_JOBS:-16}
[ -d /usr/local/cuda/bin ] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

log() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# step NAME CAP_S RESERVE_S CMD...: runs CMD with a timeout of min(CAP_S, time left - RESERVE_S)
step() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    local left=$((BUDGET - SECONDS - reserve))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        log "SKIP $name: no time left (budget ${BUDGET}s)"
        return 0
    fi
    log "START $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    log "END $name rc=$rc ($((SECONDS - t0))s)$([ $rc -eq 124 ] && echo ' TIMED OUT')"
    return 0
}

log "repo $(git rev-parse --short HEAD 2>/dev/null || echo '?') in $PWD; budget ${BUDGET}s"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1
    $PY -c 'import triton; print("triton", triton.__version__)' 2>&1
    nvcc --version 2>&1 | tail -n 1
} | tee -a "$LOG"

# 1. Build (editable: pyattn.kernels and pyattn.bench map to kernels/ and bench/).
step build 240 240 bash -c "$PY -m pip install --no-build-isolation --no-deps -e . -v > /tmp/pyattn-build.log 2>&1"
tail -n 40 /tmp/pyattn-build.log >> "$LOG" 2>/dev/null
BENCH=(-m pyattn bench)
if ! $PY -c 'import pyattn._C, pyattn.bench' >> "$LOG" 2>&1; then
    # Fallback: an in-place build on PYTHONPATH, the suite run as the top-level package `bench`.
    step build-inplace 240 200 bash -c "$PY setup.py build_ext --inplace > /tmp/pyattn-build-inplace.log 2>&1"
    tail -n 40 /tmp/pyattn-build-inplace.log >> "$LOG" 2>/dev/null
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    BENCH=(-m bench)
fi
$PY -c 'import pyattn; print("pyattn", pyattn.__version__, "backends", pyattn.backends())' 2>&1 | tee -a "$LOG"

# 2. The whole test suite on CUDA.
step tests 170 200 bash -c "$PY -m pytest -q -p no:cacheprovider tests > '$OUT/tests.log' 2>&1"
tail -n 5 "$OUT/tests.log" >> "$LOG" 2>/dev/null

# 3. The benchmark (results are saved after every case, so a cut-off run still leaves rows).
left=$((BUDGET - SECONDS - 60))
step bench 400 50 bash -c "$PY ${BENCH[*]} --full --device cuda --out '$OUT' --time-budget $((left > 60 ? left - 40 : 20)) > '$OUT/bench.log' 2>&1"
tail -n 3 "$OUT/bench.log" >> "$LOG" 2>/dev/null

# 4. compute-sanitizer memcheck over a small CUDA subset (gpu-marked tests of the CUDA backend).
if command -v compute-sanitizer > /dev/null; then
    step memcheck 120 0 bash -c "set -o pipefail; compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest -q -p no:cacheprovider -x -m gpu -k 'cuda and not slow' tests/test_additive_attention.py 2>&1 | tail -n 30 >> '$LOG'"
else
    log "SKIP memcheck: compute-sanitizer not found"
fi

rm -f "$OUT"/*.tmp
log "done; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
