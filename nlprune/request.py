"""What a prune run is asked to do: one typed, frozen request.

``api.prune``'s keyword arguments are its fields; the command line fills it from the flags
(``nlprune.cli_prune.prune_request``), and results.json records it under the flags' names
(:data:`FLAG_OF_FIELD`, ``nlprune.runconfig.config_of_call``). A new run option is a field
here (with its default and a comment) and its flag in ``nlprune prune``'s parser; a field
whose flag has another name says so in ``FLAG_OF_FIELD``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from nlprune import cards


@dataclasses.dataclass(frozen=True)
class PruneRequest:
    """A prune run, as ``api.prune`` and the command line ask for it."""

    model: Any = cards.DEFAULT_MODEL  # card name, HF folder, .gguf file or an api.Loaded model
    prune_method: str = "wanda"  # nlprune.methods.available_methods()
    sparsity_ratio: float | None = 0.5  # fraction removed per linear, [0, 1); None for N:M
    sparsity_type: str = "unstructured"  # or N:M (keep N of every M consecutive weights of a row)
    nsamples: int = 8  # calibration windows, seeded draws of documents longer than seqlen
    seqlen: int = 512
    seed: int = 0
    data_dir: str | Path | None = None  # local C4 shards (else $NLPRUNE_DATA_DIR, else the hub)
    output: str | Path | None = None  # run directory, saved per layer (the same request resumes)
    overwrite: bool = False  # replace a finished run in output
    do_eval: bool = False  # perplexity of the pruned and the dense model on eval_datasets
    eval_nsamples: int = 128  # windows of the test sets (c4, wikitext2)
    eval_seqlen: int = 512
    attention_windows: int = 4  # C4 validation windows of the attention-error metric (0: skip)
    eval_datasets: Sequence[str] = ("c4",)  # nlprune.data.EVALUATION_SETS; NAME:N takes N windows
    heldout_nsamples: int = 64  # windows of every other evaluation set
    batch_size: int = 8  # windows per forward pass
    options: dict[str, Any] | None = None  # the method's options, named as its flags (resolved once)
    true_sequential: bool = True  # False: every sublayer's statistics from the dense layer (Wanda's order)
    progress: bool = True
    mesh: Any = None  # a jax Mesh or a --mesh spec ("data=2,model=2"); None: one device
    use_cache: bool = True  # False recomputes the dense perplexity and the evaluation tokens
    calib_dataset: str | Path | None = None  # c4 (default), wikitext2 or a local text file
    sparsity_profile: str = "uniform"  # or owl (per-layer ratios)
    owl_m: float | None = None
    owl_lambda: float | None = None
    layer_sparsity: Any = None  # per-layer / per-linear ratios: a JSON file, list or dict
    tasks: str | Sequence[str] | None = None  # zero-shot tasks after the prune
    task_data_dir: str | Path | None = None
    limit: int | None = None  # first N examples of each task
    dense_tasks: bool = False  # the dense model's task scores too
    run_config: dict[str, Any] | None = None  # the resolved flags to record (None: this request's)
    random_weights: int | None = None  # a seed: seeded random weights of the model's config
    stream: bool = False  # one decoder layer in memory at a time: read from disk, kept only in output
    dtype: str = "float32"  # weights held and written in float32 or bfloat16 (computed in float32)


# Fields the command line sets otherwise: the method's options come from its own flags, the
# mesh is parsed, --no-cache inverts use_cache, the recorded config is the flags themselves,
# progress bars have no flag.
NOT_FLAGS = ("options", "mesh", "use_cache", "run_config", "progress")
RENAMED = {"do_eval": "eval"}  # field -> flag dest, where the flag keeps Wanda's vocabulary
FLAG_OF_FIELD = {f.name: RENAMED.get(f.name, f.name) for f in dataclasses.fields(PruneRequest)
                 if f.name not in NOT_FLAGS}

