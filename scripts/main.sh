#!/usr/bin/env bash
# The main job: set up (if needed), then evaluate SmolLM2-135M on C4 (pruning joins here
# once `nlprune prune` lands).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
shared=$(cd .. && pwd)/shared/data
export NLPRUNE_DATA_DIR=${NLPRUNE_DATA_DIR:-$([ -d "$shared" ] && echo "$shared" || true)}
mkdir -p runs
exec .venv/bin/nlprune eval --model smollm2-135m --dataset c4 --nsamples 128 --seqlen 512 \
  --output runs/smollm2-135m-dense-eval.json "$@"
