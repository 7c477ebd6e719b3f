#!/usr/bin/env bash
# make interop: fine-tune and export (main environment), generate with vLLM (.venv-vllm),
# compare and report into benchmarks/results/interop/ (docs/serving.md).
# Usage: benchmarks/interop/run.sh [OUT]   (STEPS=30, PY, VPY override the defaults)
set -euo pipefail
OUT=${1:-runs/interop}
STEPS=${STEPS:-30}
PY=${PY:-.venv/bin/python}
VPY=${VPY:-.venv-vllm/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" benchmarks/interop/train_export.py --out "$OUT" --steps "$STEPS"
VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VPY" benchmarks/interop/serve_vllm.py "$OUT"
"$PY" benchmarks/interop/compare.py "$OUT" --results benchmarks/results/interop
