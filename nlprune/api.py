"""The Python API under the command line: load, evaluate, prune.

    from nlprune import api
    loaded = api.load("smollm2-135m")
    record = api.evaluate("smollm2-135m", data_dir="../shared/data", nsamples=16)
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax

from nlprune import cards
from nlprune.data import eval_windows
from nlprune.eval.perplexity import perplexity
from nlprune.modeling.llama import LlamaForCausalLM

RUN_MODEL_DIR = "model"
RUN_RESULTS = "results.json"


@dataclasses.dataclass
class Loaded:
    model: LlamaForCausalLM
    tokenizer: Any
    source: cards.ModelSource
    load_seconds: float

    def describe(self) -> dict[str, Any]:
        from nlprune.data import tokenizer_fingerprint

        return {**self.source.describe(), "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer)}


def load(model: str = cards.DEFAULT_MODEL) -> Loaded:
    """Resolve ``model`` (card name, HF folder or .gguf), load weights (float32) and tokenizer."""
    start = time.perf_counter()
    source = cards.resolve_model(model)
    weights = cards.load_model(source)
    tokenizer = cards.load_tokenizer(source)
    return Loaded(weights, tokenizer, source, time.perf_counter() - start)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


def load_run(run_dir: str | Path) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """The pruned model of a run directory and its results record."""
    from nlprune.checkpoint import CheckpointError, load_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist.")
    results_path = run_dir / RUN_RESULTS
    if not results_path.is_file():
        raise CheckpointError(
            f"{run_dir} has no {RUN_RESULTS}: the run did not finish (rerun `nlprune prune` "
            "with the same --output to resume it)."
        )
    model, _ = load_model(run_dir / RUN_MODEL_DIR)
    return model, json.loads(results_path.read_text())


def evaluate(
    model: str | Loaded = cards.DEFAULT_MODEL,
    run_dir: str | Path | None = None,
    dataset: str = "c4",
    nsamples: int | None = 128,
    seqlen: int = 512,
    data_dir: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a model (or of a run's pruned model) with a full provenance record."""
    loaded = model if isinstance(model, Loaded) else load(model)
    weights, run_record = loaded.model, None
    if run_dir is not None:
        weights, run_record = load_run(run_dir)
    windows, provenance = eval_windows(
        loaded.tokenizer,
        dataset,
        nsamples,
        seqlen,
        data_dir=data_dir,
        max_seqlen=weights.config.max_position_embeddings,
        progress=progress,
    )
    result = perplexity(weights, windows, batch_size=batch_size, progress=progress)
    record = {
        "perplexity": result.perplexity,
        "tokens": result.tokens,
        "windows": result.windows,
        "seconds": result.seconds,
        "tokens_per_second": result.windows * seqlen / result.seconds,
        "model": loaded.describe(),
        "run": str(run_dir) if run_dir else None,
        "run_method": (run_record or {}).get("args", {}).get("prune_method"),
        "dataset": provenance,
        "protocol": {
            "nsamples": result.windows,
            "seqlen": seqlen,
            "perplexity": "exp(total NLL / predicted tokens), non-overlapping windows",
        },
        "machine": machine(),
    }
    return record
