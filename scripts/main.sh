#!/usr/bin/env bash
# The main job: set up (if needed), prune SmolLM2-135M to 50% unstructured with the recipe
# README recommends for it (recipes/recommended-50.toml: RIA with the refit, damped towards the
# unpruned weights; chosen on validation text in BENCHMARKS.md, "What the non-linear method
# buys"), and print the dense
# vs pruned C4 perplexity (cpu protocol: calibration 8 x 512 from C4 train, evaluation
# 128 x 512 C4 windows). Extra flags pass through and win; a --prune-method given replaces
# the default method and its options, e.g.
# `bash scripts/main.sh --prune-method nonlinear --recipe fast`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
shared=$(cd .. && pwd)/shared/data
if [ -z "${NLPRUNE_DATA_DIR:-}" ] && [ -d "$shared" ]; then export NLPRUNE_DATA_DIR=$shared; fi
method=(--prune-method ria --refit --refit-percdamp 1.0)
for arg in "$@"; do  # a method given on the command line replaces the default one and its options
  case $arg in --prune-method|--prune_method|--prune-method=*|--prune_method=*) method=() ;; esac
done
exec .venv/bin/nlprune prune --model smollm2-135m "${method[@]}" --sparsity-ratio 0.5 --nsamples 8 --seqlen 512 --seed 0 \
  --eval --eval-nsamples 128 --eval-seqlen 512 --output runs/main --overwrite "$@"
