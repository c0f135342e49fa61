#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Real C4 samples: ../shared/data beside the clone unless NLPRUNE_DATA_DIR says otherwise.
export NLPRUNE_DATA_DIR=${NLPRUNE_DATA_DIR:-$(cd .. && pwd)/shared/data}
export NLPRUNE_CACHE_DIR=${NLPRUNE_CACHE_DIR:-$PWD/.cache/nlprune}
exec .venv/bin/python -m pytest -q --timeout=1200 "$@"
