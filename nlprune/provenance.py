"""Which code produced a result: the git commit of the nlprune source tree, and whether it
had uncommitted changes (recorded in every run's results.json and in benchmark records)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_state(root: str | Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the git tree at ``root`` (default:
    the one nlprune runs from). None where it is not a git checkout (an installed wheel) or git
    is missing; ``dirty`` counts tracked files only."""
    where = Path(root) if root is not None else REPO_ROOT

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}
