#!/usr/bin/env bash
# The learning-rate sweeps of issue 15 (docs/benchmarks.md, "Learning-rate curves"): three tasks,
# eight methods, 5 rates each (full: 3-4), seed 0 for the sweep, seeds 1 and 2 at each method's
# best rate (chosen on validation loss); issue 26 adds seeds 3 and 4 at the best rates of lora,
# lora-ga, lora-ga-matched, lora-pro and lora-one-init (5 pairs for the paired comparisons), and
# the 'damping' task: LoRA-One's preconditioner lambda at lora-one's best rate (2e-3 on all
# three tasks), then 'damping-seeds'. Resumable: re-running skips every finished run, so the
# sweeps may be completed over several invocations. Usage: benchmarks/lr_sweeps.sh [a|b|c|one ...]
# Each bench process is single-threaded (OMP_NUM_THREADS=1): on 2 cores, run two tasks at once
# (benchmarks/lr_sweeps.sh a & benchmarks/lr_sweeps.sh b); two-thread processes sharing the cores
# with anything else slow down several-fold (OpenMP threads spin while they wait).
# One task over two streams: METHODS=full,lora,lora-ga,lora-ga-matched benchmarks/lr_sweeps.sh c &
# METHODS=lora-one,lora-pro,peft-lora-ga,peft-riemannian benchmarks/lr_sweeps.sh c, then
# benchmarks/lr_sweeps.sh c once more: every run comes from the store and the report covers all.
# The body is one function, so that editing this file never changes a sweep already running.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
cd "$(dirname "$0")/.."
GRADLORA=${GRADLORA:-.venv/bin/gradlora}
METHODS=${METHODS:-full,lora,lora-ga,lora-ga-matched,lora-one,lora-pro,peft-lora-ga,peft-riemannian}
# LoRA-like methods share one grid; the gamma-16 LoRA-GA inits (ours and peft's) move W ~3x
# as far per unit of rate at their first step, so their grid sits 4x lower. Full fine-tuning's
# grids were widened by one rate where the first sweep found its best at the top (MiniLM 2e-4,
# Hamlet 1e-4), and so was the LoRA-like grid of the SmolLM2 tasks (LoRA's best on Hamlet was
# 2e-3, the top; arithmetic's starts at 2e-4 instead of 1e-4), and Hamlet's again to 1e-2
# (LoRA's best was then 5e-3, the new top); full fine-tuning's by one more rate on both SmolLM2
# tasks (its best was again the top: Hamlet 3e-4, arithmetic 1e-4), and peft's lora_ga's on
# MiniLM to 2e-3 (its best was 1e-3, the top); both gamma-16 LoRA-GA grids (ours, then peft's)
# on Hamlet to 1e-3 (each one's best was 5e-4, the top), and peft's again to 2e-3 (then 1e-3);
# peft's lora_ga's on arithmetic to 1e-3 (its best was 5e-4, the top).
lrs() {  # LOW HIGH FULL [PEFT_LORA_GA, default LOW]
  local low=$1 high=$2 full=$3 peft_low=${4:-$1}
  echo --lrs "full=$full" \
    --lrs "lora=$high" --lrs "lora-ga-matched=$high" --lrs "lora-one=$high" \
    --lrs "lora-pro=$high" --lrs "peft-riemannian=$high" \
    --lrs "lora-ga=$low" --lrs "peft-lora-ga=$peft_low"
}
main() {
  # each task's model, data and sizes, shared by its sweep and by the diagnostic (one)
  local minilm="--model minilm --data rotten-tomatoes --steps 100 --batch-size 16 --max-length 64"
  local hamlet="--model smollm2 --data hamlet --steps 40 --batch-size 8 --max-length 32"
  hamlet+=" --val-size 96 --test-size 96"
  local arithmetic="--model smollm2 --data arithmetic --steps 32 --batch-size 8 --max-length 96"
  arithmetic+=" --val-size 96 --test-size 128"
  local seeds="--seeds 0,1,2 --no-progress"
  local five=0,1,2,3,4  # the methods of the paired comparisons get 5 seeds at their best rate
  seeds+=" --seeds-for lora=$five --seeds-for lora-ga=$five --seeds-for lora-ga-matched=$five"
  seeds+=" --seeds-for lora-pro=$five"
  local one="--seeds 0,1,2,3,4 --no-progress"  # lora-one-init alone: every method gets five
  # a user's untuned rate: seeds 0-2 at LoRA's best rate for every method whose grid holds it,
  # so that "keeping your LoRA rate" is paired by seed too (added after issue 26's seeds)
  local at_a="--seeds-at-rate 2e-3=0,1,2" at_b="--seeds-at-rate 5e-3=0,1,2" at_c="--seeds-at-rate 2e-3=0,1,2"
  for task in ${@:-a b c}; do
    case $task in
    a) # MiniLM / Rotten Tomatoes: 100 steps of 16 x 64 tokens
      $GRADLORA bench $minilm --methods $METHODS $seeds $at_a \
        $(lrs 5e-5,1e-4,2e-4,5e-4,1e-3 2e-4,5e-4,1e-3,2e-3,5e-3 2e-5,5e-5,1e-4,2e-4,5e-4 \
          5e-5,1e-4,2e-4,5e-4,1e-3,2e-3) \
        --out benchmarks/results/lr-minilm ;;
    b) # SmolLM2-135M / Hamlet: 40 steps of 8 chunks x 32 tokens
      $GRADLORA bench $hamlet --methods $METHODS $seeds $at_b \
        $(lrs 2e-5,5e-5,1e-4,2e-4,5e-4,1e-3 1e-4,2e-4,5e-4,1e-3,2e-3,5e-3,1e-2 1e-5,3e-5,1e-4,3e-4,1e-3 \
          2e-5,5e-5,1e-4,2e-4,5e-4,1e-3,2e-3) \
        --out benchmarks/results/lr-smollm2-hamlet ;;
    c) # SmolLM2-135M / arithmetic word problems, scored by exact match of greedy generations
      $GRADLORA bench $arithmetic --methods $METHODS $seeds $at_c \
        $(lrs 2e-5,5e-5,1e-4,2e-4,5e-4 2e-4,5e-4,1e-3,2e-3,5e-3 1e-5,3e-5,1e-4,3e-4 \
          2e-5,5e-5,1e-4,2e-4,5e-4,1e-3) \
        --out benchmarks/results/lr-smollm2-arithmetic ;;
    one) # LoRA-One's init with plain AdamW (lora-one-init) on the three tasks, same protocol and
      # LoRA-like grids (Hamlet's from 5e-4): is lora-one behind on the causal LMs because of its
      # init or of its preconditioned AdamW? Added after the sweeps above, as a diagnostic.
      $GRADLORA bench $minilm --methods lora-one-init $one $at_a \
        --lrs lora-one-init=2e-4,5e-4,1e-3,2e-3,5e-3 --out benchmarks/results/lr-lora-one-init-minilm
      $GRADLORA bench $hamlet --methods lora-one-init $one $at_b \
        --lrs lora-one-init=5e-4,1e-3,2e-3,5e-3,1e-2 --out benchmarks/results/lr-lora-one-init-hamlet
      $GRADLORA bench $arithmetic --methods lora-one-init $one $at_c \
        --lrs lora-one-init=2e-4,5e-4,1e-3,2e-3,5e-3 \
        --out benchmarks/results/lr-lora-one-init-arithmetic ;;
    damping) # issue 26: lora-one (preconditioned AdamW) at its best rate (2e-3 on both causal
      # LMs) with the damping lambda of (B^T B + lambda I) and (A A^T + lambda I) at 1e-4, 1e-2
      # and 1 (absolute: added to the r x r Gram matrices); 1e-6, the default, is the sweep's
      # own run. Seed 0 at each lambda; then seeds 1 and 2 at the lambda with the lowest
      # validation loss, chosen by benchmarks/damping.py, which also writes the report.
      for lam in 1e-4 1e-2 1; do
        $GRADLORA bench $hamlet --methods lora-one --seeds 0 --no-progress --lrs lora-one=2e-3 \
          --damping $lam --out benchmarks/results/damping-hamlet/lambda-$lam
        $GRADLORA bench $arithmetic --methods lora-one --seeds 0 --no-progress \
          --lrs lora-one=2e-3 --damping $lam --out benchmarks/results/damping-arithmetic/lambda-$lam
      done ;;
    damping-seeds) # after 'damping': seeds 0, 1, 2 at each causal-LM task's best lambda, on
      # both causal-LM tasks and MiniLM, so that every candidate has pairs against the default
      # everywhere (the verdict needs it ahead on both causal LMs and not behind on MiniLM)
      local lams lam
      lams=$(printf '%s\n' "$(python benchmarks/damping.py --best hamlet)" \
        "$(python benchmarks/damping.py --best arithmetic)" | sort -u | grep -vx 1e-6 || true)
      for lam in $lams; do
        $GRADLORA bench $hamlet --methods lora-one --seeds 0,1,2 --no-progress \
          --lrs lora-one=2e-3 --damping $lam --out benchmarks/results/damping-hamlet/lambda-$lam
        $GRADLORA bench $arithmetic --methods lora-one --seeds 0,1,2 --no-progress \
          --lrs lora-one=2e-3 --damping $lam --out benchmarks/results/damping-arithmetic/lambda-$lam
        $GRADLORA bench $minilm --methods lora-one --seeds 0,1,2 --no-progress \
          --lrs lora-one=2e-3 --damping $lam --out benchmarks/results/damping-minilm/lambda-$lam
      done ;;
    *) echo "unknown task $task (a, b, c, one, damping or damping-seeds)" >&2; exit 2 ;;
    esac
  done
}
main "$@"
