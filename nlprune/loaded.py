"""A loaded model (weights, tokenizer, where they came from) and the small things every entry
point does with one: load it, load a run's pruned model, check a count, describe the machine."""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nlprune import cards
from nlprune.modeling.llama import LlamaForCausalLM
from nlprune.modeling.precision import cast_model, storage_dtype
from nlprune.runs import MODEL, RunDirError, open_finished


@dataclasses.dataclass
class Loaded:
    model: LlamaForCausalLM
    tokenizer: Any
    source: cards.ModelSource
    load_seconds: float
    reader: Any = None  # a streamed run's nlprune.convert.lazy.LayerReader (model is then None)
    dtype: str = "float32"  # the precision the weights are held in (nlprune.modeling.precision)

    @property
    def config(self):
        return self.model.config if self.model is not None else self.reader.config

    def describe(self) -> dict[str, Any]:
        from nlprune.data import tokenizer_fingerprint

        return {**self.source.describe(), "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer)}


def load(model: str = cards.DEFAULT_MODEL, random_weights: int | None = None, dtype: str = "float32") -> Loaded:
    """Resolve ``model`` (card name, HF folder or .gguf), load weights and tokenizer; the
    weights are held in ``dtype`` (float32, or bfloat16: :mod:`nlprune.modeling.precision`).

    ``random_weights=SEED``: seeded random weights of the model's exact config instead of its
    own (nothing downloaded; the record's model description says so, with the seed)."""
    start = time.perf_counter()
    held = storage_dtype(dtype)
    source = cards.resolve_model(model, random_weights=random_weights)
    weights = cast_model(cards.load_model(source), held)
    tokenizer = cards.load_tokenizer(source)
    return Loaded(weights, tokenizer, source, time.perf_counter() - start, dtype=dtype)


def load_streamed(model: str = cards.DEFAULT_MODEL, random_weights: int | None = None,
                  dtype: str = "float32", progress: bool = True) -> Loaded:
    """:func:`load` without the weights: a reader that gives one decoder layer at a time from
    disk, its files checked now, handing out layers in ``dtype``. Random weights are first
    written to disk layer by layer (in ``dtype``), so a model of any size never exists in
    memory whole."""
    start = time.perf_counter()
    storage_dtype(dtype)
    source = cards.resolve_model(model, random_weights=random_weights)
    reader = cards.open_reader(source, dtype=dtype, progress=progress)
    reader.storage = dtype
    reader.check()
    if source.kind == "random":  # the written files' digest: the arrays are never all in memory
        source._sha256 = cards.files_sha256(sorted(reader.folder.glob("*.safetensors")))
    tokenizer = cards.load_tokenizer(source)
    return Loaded(None, tokenizer, source, time.perf_counter() - start, reader, dtype)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }


def load_run(run_dir: str | Path) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """The pruned model of a run directory and its results record."""
    from nlprune.layered import load_any_model

    run = open_finished(run_dir)
    try:
        record = json.loads(run.results_path.read_text())
    except (ValueError, UnicodeDecodeError):
        record = None
    args, desc = (record.get("args"), record.get("model")) if isinstance(record, dict) else (None, None)
    if not (isinstance(args, dict) and "prune_method" in args and isinstance(desc, dict) and "weights_sha256" in desc):
        raise RunDirError(
            f"{run.results_path} is not the record of a pruning run (damaged or overwritten); "
            "rerun `nlprune prune --overwrite` to remake the run."
        )
    model, _ = load_any_model(run.path / MODEL)
    return model, record


def check_count(name: str, value: Any, minimum: int) -> None:
    """Refuse a count below ``minimum`` before anything is loaded."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def score_tasks(loaded: Loaded, weights: LlamaForCausalLM, names: list[str], folder: Path, *, limit: int | None,
                batch_size: int = 32, progress: bool = True, bootstrap_iters: int = 1000,
                run_dir: str | Path | None = None, run_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Zero-shot accuracy of ``weights`` (with ``loaded``'s tokenizer) on checked task files,
    recorded with the model, the run it came from and the machine."""
    from nlprune.eval.tasks.runner import run_tasks

    record = run_tasks(weights, loaded.tokenizer, names, folder, limit=limit, batch_size=batch_size,
                       progress=progress, bootstrap_iters=bootstrap_iters)
    record.update(
        model=loaded.describe(),
        run=str(run_dir) if run_dir else None,
        run_method=(run_record or {}).get("args", {}).get("prune_method"),
        machine=machine(),
    )
    return record
