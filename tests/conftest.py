"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The project's shared real-text folder (C4 samples).

    ``$NLPRUNE_DATA_DIR`` if set, else ``<repo>/../shared/data`` (CI checks ../shared out
    beside a clean clone). Tests needing it are skipped, with the reason, when it is absent.
    """
    env = os.environ.get("NLPRUNE_DATA_DIR", "").strip()
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data folder {path} not found: CI must run with ../shared beside the clone")
        pytest.skip(f"shared data folder {path} not found (set NLPRUNE_DATA_DIR)")
    return path.resolve()


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M through nlprune's own loader (GGUF converter + tokenizer): loaded once."""
    from nlprune import api

    return api.load("smollm2-135m")
