"""Every benchmark study imports and answers --help (benchmarks/README.md indexes them)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPTS = sorted(p for p in (REPO_ROOT / "benchmarks").rglob("*.py") if p.name != "common.py")


def test_every_study_is_in_the_index():
    index = (REPO_ROOT / "benchmarks" / "README.md").read_text()
    missing = [str(p.relative_to(REPO_ROOT / "benchmarks")) for p in SCRIPTS
               if f"`{p.relative_to(REPO_ROOT / 'benchmarks')}`" not in index]
    assert not missing, f"benchmarks/README.md does not list {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO_ROOT / "benchmarks")))
def test_study_answers_help(script):
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
