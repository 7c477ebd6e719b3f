#!/usr/bin/env bash
# GPU check (issue 27), one command from the repository root, nothing fetched from a network:
#
#   benchmarks/gpu_check.sh OUTDIR                     # on a GPU: cuda tests, then the benchmark
#   benchmarks/gpu_check.sh OUTDIR --device cpu --tiny # the same benchmark, tiny, on a CPU
#
# 1. `pytest -m cuda tests/test_cuda.py` (skipped with --device cpu), its log and junit report in
#    OUTDIR/cuda_tests.{log,xml}; at most CHECK_TEST_TIMEOUT seconds (default 180).
# 2. benchmarks/gpu_check.py OUTDIR [args]: writes OUTDIR/gpu_check.{json,md} and its log
#    OUTDIR/gpu_check.log; at most CHECK_BENCH_TIMEOUT seconds (default 270).
# Together under 8 minutes. gradlora is imported from src/ (PYTHONPATH), not installed. Wheels
# found in .whl/ (e.g. bitsandbytes, or the pinned transformers / peft, downloaded beforehand
# with `pip download --no-deps`, see docs/gpu.md) are installed offline into a temporary folder
# first. PYTHON picks the interpreter (default python3). Exit status: 0 when both steps passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: benchmarks/gpu_check.sh OUTDIR [--device cpu --tiny] [gpu_check.py options]" >&2
    exit 2
fi
out=$1
shift
mkdir -p "$out" || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        .whl/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:$site"  # after src/: gradlora is always this checkout's
fi

device=cuda  # gpu_check.py's default; --device cpu skips the cuda tests
prev=
for arg in "$@"; do
    [[ $prev == --device ]] && device=$arg
    [[ $arg == --device=* ]] && device=${arg#--device=}
    prev=$arg
done
tests_rc=0
if [[ $device == cuda ]]; then
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader
    timeout "${CHECK_TEST_TIMEOUT:-180}" "$PY" -m pytest -m cuda tests/test_cuda.py -q -rs \
        -p no:cacheprovider -o timeout=120 --junitxml "$out/cuda_tests.xml" 2>&1 \
        | tee "$out/cuda_tests.log"
    tests_rc=${PIPESTATUS[0]}
    echo "cuda tests: exit status $tests_rc"
fi
[[ $device == cuda ]] && export GPU_CHECK_TESTS_RC=$tests_rc  # into gpu_check.json
timeout "${CHECK_BENCH_TIMEOUT:-270}" "$PY" benchmarks/gpu_check.py "$out" "$@" 2>&1 \
    | tee "$out/gpu_check.log"
bench_rc=${PIPESTATUS[0]}
echo "benchmark: exit status $bench_rc"
ls "$out"/gpu_check.json "$out"/gpu_check.md 2>/dev/null
[[ $tests_rc == 0 && $bench_rc == 0 ]]
