"""Every benchmark study imports and answers --help (benchmarks/README.md indexes them)."""

from __future__ import annotations

import os
import re
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


@pytest.mark.parametrize("document", ["BENCHMARKS.md", "README.md"])
def test_embedded_tables_are_their_committed_files(document, tmp_path):
    """Every `<!-- NAME table: PATH -->` block holds PATH's contents (scripts/embed_tables.py);
    a block edited by hand, or a table rebuilt and not embedded, is named."""
    run = lambda path: subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "embed_tables.py"), str(path),  # noqa: E731
                                       "--check"], capture_output=True, text=True)
    proc = run(REPO_ROOT / document)
    assert proc.returncode == 0, proc.stdout
    text = (REPO_ROOT / document).read_text()
    marker = re.search(r"<!-- [\w -]+? table: \S+ -->\n", text)
    if marker is None:
        return
    # the check can fail: one changed row of an embedded table is caught
    row = text.index("\n|", marker.end()) + 1
    changed = tmp_path / document
    changed.write_text(text[:row] + "| changed by hand " + text[row:])
    assert run(changed).returncode == 1
