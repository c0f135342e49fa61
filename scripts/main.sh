#!/usr/bin/env bash
# The main job: set up (if needed), prune SmolLM2-135M to 50% with the best method measured
# in BENCHMARKS.md, and print the dense vs pruned C4 perplexity (cpu protocol: calibration
# 8 x 512 from C4 train, evaluation 128 x 512 on C4 validation). Extra flags pass through,
# e.g. `bash scripts/main.sh --prune-method sparsegpt --sparsity-type 2:4`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
shared=$(cd .. && pwd)/shared/data
if [ -z "${NLPRUNE_DATA_DIR:-}" ] && [ -d "$shared" ]; then export NLPRUNE_DATA_DIR=$shared; fi
exec .venv/bin/nlprune prune --model smollm2-135m --prune-method wanda --sparsity-ratio 0.5 \
  --sparsity-type unstructured --nsamples 8 --seqlen 512 --seed 0 \
  --eval --eval-nsamples 128 --eval-seqlen 512 --output runs/main --overwrite "$@"
