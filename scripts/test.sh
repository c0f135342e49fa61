#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Real C4 samples: ../shared/data beside the clone unless NLPRUNE_DATA_DIR says otherwise.
export NLPRUNE_DATA_DIR=${NLPRUNE_DATA_DIR:-$(cd .. && pwd)/shared/data}
export NLPRUNE_CACHE_DIR=${NLPRUNE_CACHE_DIR:-$PWD/.cache/nlprune}
# Two worker processes by default (a 2-core CI machine compiles and runs two test files at
# once; most tests are single-threaded XLA dispatch and compilation). NLPRUNE_TEST_WORKERS=0
# runs everything in this process; --dist loadfile keeps a file's module fixtures in one worker.
workers=${NLPRUNE_TEST_WORKERS:-2}
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest -q --timeout=1200 "$@"
fi
exec .venv/bin/python -m pytest -q --timeout=1200 -n "$workers" --dist loadfile "$@"
