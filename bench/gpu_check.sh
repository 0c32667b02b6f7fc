#!/usr/bin/env bash
# The GPU check: run on a CUDA machine from the repo root, within one 10-minute slot:
#
#   bash bench/gpu_check.sh      (OUT=dir for the result files; GPU_CHECK_TINY=1: CPU rehearsal)
#
# Stages, in order of value; each streams through tee into its own file in $OUT, so a run cut off
# at any point still leaves named results, and a failing stage does not stop the next:
#   env          GPU, driver, python/torch/triton/nvcc versions          -> gpu_check.log
#   build        pip install -e . with CUDA kernels for sm_90a           -> build.log
#   correctness  both ops x triton/cuda backends x fp16/bf16/fp32 on CUDA, one fixed Triton
#                config per kernel (PYATTN_TRITON_AUTOTUNE=0), and the CUDA kernels' attention
#                variants (window, softcap, sinks, ALiBi) against the reference, pytest -v,
#                per-test timeout, xdist                                 -> correctness.log
#   sanitizer    compute-sanitizer memcheck, then racecheck, over small cases of every CUDA
#                kernel (bench/sanitize_cases.py)                        -> sanitizer.log
#   bench        the headline benchmark with full autotuning (pyattn bench --headline): sdpa
#                fwd and fwd+bwd bf16 D=64/128 L=1k-8k, causal and not, vs torch SDPA's default
#                and each torch backend; additive T=512 H=512 vs naive; MultiheadAttention and
#                BERT forward                                            -> bench.log,
#                                                                           bench-cuda.json/.csv
# At most 8 files come back from a device call: these are 7. gpu_check.log has every stage's
# start, end, exit status and time, and the tail of each stage's file.
#
# Time plan (GPU_CHECK_BUDGET_S=540, one 10-minute call with a minute to spare): each stage runs
# under min(its cap, budget left - the reserve kept for the stages after it):
#   stage        cap   reserve  worst-case start -> limit
#   env           60     470      0 -> 60
#   build        200     320     60 -> 160    (6 translation units, MAX_JOBS=16)
#   correctness  130     190    220 -> 130
#   sanitizer     70     120    350 -> 70     (memcheck 35 + racecheck 35)
#   bench          -       5    420 -> 115    (expected: env 10 s, build ~120 s -> bench ~200 s)
# pyattn bench --time-budget stops starting cases 30 s before the bench stage's limit; the
# headline runs the small comparisons first, sdpa (whose autotuning dominates) last.
#
# Environment:
#   GPU_CHECK_BUDGET_S   whole-script budget in seconds (default 540)
#   GPU_CHECK_STAGES     comma list of stages to run (default: all; e.g. "correctness,bench"
#                        for a warm rerun, the build being kept between calls)
#   GPU_CHECK_TINY=1     the control flow on this CPU machine: interpreter, small shapes, no
#                        build (uses the installed pyattn), tests/test_gpu_check.py runs it
#   PYTHON               the interpreter (default python3)
set -uo pipefail

OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
TINY=${GPU_CHECK_TINY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
STAGES=",${GPU_CHECK_STAGES:-env,build,correctness,sanitizer,bench},"
PY=${PYTHON:-python3}
# PYTHONSAFEPATH: `python -m` never puts the checkout on sys.path (docs/design.md, "Layout")
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 PYATTN_CUDA=${PYATTN_CUDA:-1} PYATTN_CUDA_ARCHS=${PYATTN_CUDA_ARCHS:-90a}
export MAX_JOBS=${MAX_JOBS:-16}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ "$TINY" = 1 ]; then
    # no GPU: the Triton kernels through the interpreter, on CPU tensors
    export TRITON_INTERPRET=1 PYATTN_CUDA=0
    DEVICE=cpu
else
    DEVICE=cuda
fi

log() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }
want() { [[ "$STAGES" == *",$1,"* ]]; }

# stage NAME FILE CAP_S RESERVE_S CMD...: CMD under a timeout of min(CAP_S, time left - RESERVE_S),
# its output streamed into $OUT/FILE; the end of FILE is copied into the summary log.
stage() {
    local name=$1 file=$2 cap=$3 reserve=$4
    shift 4
    if ! want "$name"; then
        log "SKIP $name: not in GPU_CHECK_STAGES"
        return 0
    fi
    local left=$((BUDGET - SECONDS - reserve))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        log "SKIP $name: no time left (budget ${BUDGET}s)"
        return 0
    fi
    log "START $name (limit ${limit}s) -> $file"
    if declare -F "$1" > /dev/null; then
        # timeout runs programs, not shell functions: hand it a bash with the functions and
        # the variables they read
        set -- bash -c "$(declare -f); $(declare -p PY TINY SAN SELECT PLUGINS 2> /dev/null); $(printf '%q ' "$@")"
    fi
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$file" > /dev/null
    local rc=${PIPESTATUS[0]}
    local note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" TIMED OUT"
    log "END $name rc=$rc ($((SECONDS - t0))s)$note"
    tail -n 15 "$OUT/$file" 2>/dev/null | sed "s/^/    [$name] /" >> "$LOG"
    return 0
}

log "repo $(git rev-parse --short HEAD 2>/dev/null || echo '?') in $PWD; budget ${BUDGET}s; tiny=$TINY; stages ${STAGES//,/ }"

# 1. environment
env_info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
    $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    $PY -c 'import triton, numpy; print("triton", triton.__version__, "numpy", numpy.__version__)'
    "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -n 1
    echo "nproc $(nproc); CUDA_HOME=${CUDA_HOME:-}"
}
stage env gpu_check.env.tmp 60 470 env_info
cat "$OUT/gpu_check.env.tmp" >> "$LOG" 2>/dev/null

# 2. build (editable: pyattn.kernels and pyattn.bench map to kernels/ and bench/)
if [ "$TINY" = 1 ]; then
    stage build build.log 60 400 $PY -c 'import pyattn, pyattn._C; print("tiny: using the installed pyattn at", pyattn.__file__)'
else
    stage build build.log 200 320 $PY -m pip install --no-build-isolation --no-deps -e . -v
fi
$PY -c 'import pyattn; print("pyattn", pyattn.__version__, "backends", pyattn.backends())' 2>&1 | tee -a "$LOG"

# 3. correctness on the device, bounded: one fixed Triton config per kernel (no autotuning)
if [ "$TINY" = 1 ]; then
    SELECT=(tests/test_sdpa_triton.py -k "test_schemas or opcheck")
    XDIST=()
else
    # the GPU-marked and device-parametrised cases of both ops; test_edge_cases covers the
    # masks/causal/GQA/odd-size matrix across backends; test_attention_variants_cuda runs the
    # CUDA sdpa/varlen variants, forward and backward, against the float64 reference
    SELECT=(tests/test_additive_attention.py tests/test_sdpa.py tests/test_sdpa_triton.py tests/test_edge_cases.py
        tests/test_varlen_attention.py tests/test_attention_variants_cuda.py -k "cuda or triton or gpu")
    XDIST=(-n 8 --dist loadfile)
fi
# a per-test timeout and xdist where their plugins are installed (they are on the device machine)
PLUGINS=()
$PY -c 'import pytest_timeout' 2> /dev/null && PLUGINS+=(--timeout 60)
$PY -c 'import xdist' 2> /dev/null && PLUGINS+=("${XDIST[@]}")
correctness() {
    PYATTN_TRITON_AUTOTUNE=0 $PY -m pytest -v -p no:cacheprovider -o addopts="" -rfE "${PLUGINS[@]}" "${SELECT[@]}"
}
stage correctness correctness.log 130 190 correctness

# 4. compute-sanitizer over small cases of each CUDA kernel
SAN=$(command -v compute-sanitizer || true)
for d in "${CUDA_HOME:-/usr/local/cuda}/bin" /usr/local/cuda/bin /opt/nvidia/*/compute-sanitizer; do
    [ -z "$SAN" ] && [ -x "$d/compute-sanitizer" ] && SAN="$d/compute-sanitizer"
done
sanitize() {
    if [ "$TINY" = 1 ]; then
        echo "tiny: the case script alone, on CPU (no sanitizer)"
        $PY bench/sanitize_cases.py --device cpu
        return $?
    fi
    if [ -z "$SAN" ]; then
        echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
        return 3
    fi
    local rc=0
    for tool in memcheck racecheck; do
        echo "== $tool =="
        timeout 35 "$SAN" --tool "$tool" --error-exitcode 3 --print-limit 20 $PY bench/sanitize_cases.py --device cuda || rc=$?
    done
    return $rc
}
stage sanitizer sanitizer.log 70 120 sanitize

# 5. the headline benchmark, full autotuning; rows are saved after every case
left=$((BUDGET - SECONDS - 15))
if [ "$TINY" = 1 ]; then
    BENCH_ARGS=(--quick --ops sdpa,additive --device cpu)
else
    BENCH_ARGS=(--headline --device cuda)
fi
stage bench bench.log 600 5 $PY -m pyattn bench "${BENCH_ARGS[@]}" --no-plots --out "$OUT" --time-budget $((left > 40 ? left - 30 : 10))

rm -f "$OUT"/*.tmp
log "done in ${SECONDS}s; files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
