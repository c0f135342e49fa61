"""What a prune run is asked to do: one typed, frozen request.

``api.prune``'s keyword arguments are its fields; the command line fills it from the flags
(``nlprune.cli_prune.prune_request``), and results.json records it under the flags' names
(:data:`FLAG_OF_FIELD`, ``nlprune.runconfig.config_of_call``). A new run option is one field
here: ``option(default, help, **argparse keywords)`` also makes its ``nlprune prune`` flag; a
field whose flag has another name says so in ``RENAMED``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence

from nlprune import cards
from nlprune.sparsity import PROFILE_CHOICES


def option(value: Any, help: str | None = None, /, **argparse_kwargs: Any) -> Any:
    """A request field of default ``value``; with ``help``, also a ``nlprune prune`` flag named after the field
    (``--sparsity-ratio`` and ``--sparsity_ratio``), built from ``help`` and the argparse
    keywords given (type, choices, action, metavar; ``default`` where the command line's
    differs from the API's) by :func:`nlprune.cli_args.add_request_flags`."""
    flag = None if help is None else {"help": help, **argparse_kwargs}
    return dataclasses.field(default=value, metadata={"flag": flag})


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


@dataclasses.dataclass(frozen=True)
class PruneRequest:
    """A prune run, as ``api.prune`` and the command line ask for it."""

    model: Any = option(cards.DEFAULT_MODEL, "card name, HF folder or .gguf file")  # or an api.Loaded model
    prune_method: str = option("wanda", "pruning method", default=None, choices="methods")
    sparsity_ratio: float | None = option(0.5, "fraction of weights removed, in [0, 1)", type=float, default=None)
    sparsity_type: str = option("unstructured", "unstructured, or N:M: keep N of every M consecutive weights of a row "
                                "(2:4 and 4:8 are 50%% sparse, 1:4 is 75%%)")
    nsamples: int = option(8, "calibration windows (default 8)", type=int)  # seeded draws of documents > seqlen
    seqlen: int = option(512, "tokens per calibration window (default 512)", type=int)
    seed: int = option(0, "calibration sampling seed", type=int)
    data_dir: str | Path | None = option(None, "local folder with C4 shards / wiki.test.raw instead of the hub "
                                         "(default: $NLPRUNE_DATA_DIR, else the hub)")
    output: str | Path | None = option(None, "run directory to write (RUN_DIR)")  # saved per layer: it resumes
    overwrite: bool = option(False, "replace the run already in --output once the new one has finished (only an "
                             "nlprune run is ever replaced)", action="store_true")
    do_eval: bool = option(False, "also measure dense and pruned C4 perplexity", action="store_true")
    eval_nsamples: int = option(128, "C4 test windows (default 128)", type=int)
    eval_seqlen: int = option(512, "tokens per evaluation window (default 512)", type=int)
    attention_windows: int = option(4, "C4 validation windows (of --seqlen tokens) on which the per-layer attention "
                                    "error is measured (default 4; 0 skips it)", type=int)
    eval_datasets: Sequence[str] = option(
        ("c4",), "comma-separated evaluation sets of --eval: c4 (the test set, default), c4-validation (the "
        "validation split), wikipedia and lambada (text unlike the calibration set) and their -validation halves, "
        "wikitext2; NAME:N takes N windows", type=comma_list)
    heldout_nsamples: int = option(64, "windows of each --eval-datasets set other than c4 and wikitext2 (default 64)",
                                   type=int)
    batch_size: int = option(8, "windows per forward pass (default 8)", type=int)
    options: dict[str, Any] | None = None  # the method's options, named as its flags (resolved once)
    true_sequential: bool = option(
        True, "calibrate each sublayer (q/k/v, o, gate/up, down) on the already-pruned ones before it, one forward "
        "per layer (default); --no-true-sequential collects all statistics from the dense layer first, as Wanda's "
        "reference code does (a refit then fits each sublayer towards its dense output on those dense inputs)",
        action=argparse.BooleanOptionalAction)
    progress: bool = True
    mesh: Any = None  # a jax Mesh or a --mesh spec ("data=2,model=2"); None: one device
    use_cache: bool = True  # False recomputes the dense perplexity and the evaluation tokens (--no-cache)
    calib_dataset: str | Path | None = option(
        None, "calibration text: c4 (default; its train split), wikitext2 (train), or a local .jsonl / .json.gz "
        "(JSON lines with a 'text' field) or .txt file (one document); the file's sha256 is recorded",
        metavar="{c4,wikitext2,PATH}")
    sparsity_profile: str = option(
        "uniform", "uniform: every linear at --sparsity-ratio (default); owl: each layer its own unstructured ratio "
        "by OWL's outlier ratios (layers with more outliers pruned less), the model-wide sparsity the target",
        choices=PROFILE_CHOICES)
    owl_m: float | None = option(None, "OWL: outliers are Wanda scores above M times the layer's mean (default 5)",
                                 type=float)
    owl_lambda: float | None = option(None, "OWL: the layers' ratios spread over an interval of width 2 x lambda "
                                      "around the target, in [0, 1) (default 0.08)", type=float)
    layer_sparsity: Any = option(None, "a JSON file: a list of one unstructured ratio per layer, or {HF linear name: "
                                 "ratio} (the others at --sparsity-ratio); for any method", metavar="FILE")
    tasks: str | Sequence[str] | None = option(None, "also score the pruned model on these zero-shot tasks, as "
                                               "`nlprune eval --tasks` does (comma-separated names)", metavar="LIST")
    task_data_dir: str | Path | None = option(None, "folder of the task files (default: DATA_DIR/tasks, else "
                                              "$NLPRUNE_DATA_DIR/tasks)", metavar="DIR")
    limit: int | None = option(None, "score only the first N examples of each task (the record says it is a "
                               "subset)", type=int, metavar="N")
    dense_tasks: bool = option(False, "score the dense model on --tasks too", action="store_true")
    run_config: dict[str, Any] | None = None  # the resolved flags to record (None: this request's)
    random_weights: int | None = option(
        None, "seeded random weights of --model's exact config (card, folder with config.json, or .gguf) with its "
        "tokenizer, instead of its own weights: nothing is downloaded; the record says so", type=int, metavar="SEED")
    stream: bool = option(False, "hold one decoder layer in memory at a time: each is read from the model's files when "
                          "its turn comes and kept only in --output (models larger than memory; same masks and "
                          "perplexities)", action="store_true")
    dtype: str = option("float32", "the precision the weights are held in and the run directory stores (linears, "
                        "embeddings, head; with --stream --random-weights also the one they are written to disk in); "
                        "methods, activations, Hessians and perplexity compute in float32 either way",
                        choices=("float32", "bfloat16"))


# Fields the command line sets otherwise: the method's options come from its own flags, the
# mesh is parsed, --no-cache inverts use_cache, the recorded config is the flags themselves,
# progress bars have no flag.
NOT_FLAGS = ("options", "mesh", "use_cache", "run_config", "progress")
RENAMED = {"do_eval": "eval"}  # field -> flag dest, where the flag keeps Wanda's vocabulary
FLAG_OF_FIELD = {f.name: RENAMED.get(f.name, f.name) for f in dataclasses.fields(PruneRequest)
                 if f.name not in NOT_FLAGS}

