"""The Python API under the command line: load, evaluate, prune.

    from nlprune import api
    loaded = api.load("smollm2-135m")
    record = api.evaluate("smollm2-135m", data_dir="../shared/data", nsamples=16)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from nlprune import cards, runner
from nlprune.data import evaluation_windows
from nlprune.eval.dense_cache import DensePerplexity, dense_perplexity, forward_code_version  # noqa: F401 (API)
from nlprune.eval.perplexity import perplexity
from nlprune.eval.tasks import DEFAULT_TASKS, resolve_task_data_dir
from nlprune.loaded import Loaded, check_count, load, load_run, machine, score_tasks  # noqa: F401 (API)
from nlprune.modeling.llama import LlamaForCausalLM
from nlprune.runner import MemoryPlanError, PruneRequest  # noqa: F401 (API)
from nlprune.runs import RunDirError


def _model_for_eval(
    model: str | Loaded | None, run_dir: str | Path | None, random_weights: int | None = None
) -> tuple[Loaded, LlamaForCausalLM, dict[str, Any] | None]:
    """(the loaded model, the weights to score, the run's record): a run's pruned weights
    with ``run_dir`` (``model`` defaults to the run's own, a different one is refused: its
    tokenizer would not match), else the model's own."""
    run_record = None
    if run_dir is not None:
        weights, run_record = load_run(run_dir)
        run_model = run_record["model"]
        if model is None and random_weights is None:  # the run's own model, random weights included
            random_weights = (run_model.get("random_weights") or {}).get("seed")
        model = model or run_model.get("card") or run_model["path"]
    loaded = model if isinstance(model, Loaded) else load(model or cards.DEFAULT_MODEL, random_weights)
    if run_record is None:
        weights = loaded.model
    elif loaded.source.weights_sha256() != run_record["model"]["weights_sha256"]:
        raise RunDirError(
            f"{run_dir} was pruned from {run_record['model']['name']} "
            f"({run_record['model']['path']}), not from {loaded.source.name}; leave --model out "
            "to use the run's own model."
        )
    return loaded, weights, run_record


def evaluate(
    model: str | Loaded | None = None,
    run_dir: str | Path | None = None,
    dataset: str = "c4",
    nsamples: int | None = 128,
    seqlen: int = 512,
    data_dir: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    use_cache: bool = True,
    random_weights: int | None = None,
) -> dict[str, Any]:
    """Perplexity of a model (or of a run's pruned model) with a full provenance record.

    With ``run_dir``, ``model`` defaults to the model the run was pruned from, and a
    different one is refused (its tokenizer would not match). ``use_cache=False``
    re-tokenizes the evaluation text instead of reading the token cache."""
    check_count("--batch-size", batch_size, 1)
    if nsamples is not None:
        check_count("--nsamples", nsamples, 1)
    check_count("--seqlen", seqlen, 2)
    loaded, weights, run_record = _model_for_eval(model, run_dir, random_weights)
    windows, provenance = evaluation_windows(
        loaded.tokenizer,
        dataset,
        nsamples,
        seqlen,
        data_dir=data_dir,
        max_seqlen=weights.config.max_position_embeddings,
        progress=progress,
        use_cache=use_cache,
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


def evaluate_tasks(
    model: str | Loaded | None = None,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    run_dir: str | Path | None = None,
    weights: LlamaForCausalLM | None = None,
    task_data_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    bootstrap_iters: int = 1000,
    random_weights: int | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy on local task files through lm-evaluation-harness.

    Scores ``model`` (card, folder, .gguf or a ``Loaded``), a run's pruned model
    (``run_dir``), or ``weights`` (e.g. the model ``prune`` returned) with ``model``'s
    tokenizer. Tasks come from ``task_data_dir``, else ``data_dir/tasks``, else
    ``$NLPRUNE_DATA_DIR/tasks``, never the hub; ``limit`` scores the first N examples of
    each task (the record says it is a subset). The record: per task acc (and acc_norm where
    lm-eval reports it) with standard errors, examples scored, seconds; their mean."""
    from nlprune.eval.tasks.runner import check_task_request

    folder = resolve_task_data_dir(task_data_dir, data_dir)
    names = check_task_request(tasks, folder, limit)  # bad input fails before any loading
    loaded, scored, run_record = _model_for_eval(model, run_dir, random_weights)
    return score_tasks(loaded, weights if weights is not None else scored, names, folder, limit=limit,
                       batch_size=batch_size, progress=progress, bootstrap_iters=bootstrap_iters,
                       run_dir=run_dir, run_record=run_record)


def prune(
    model: str | Loaded = cards.DEFAULT_MODEL,
    prune_method: str = "wanda",
    sparsity_ratio: float | None = 0.5,
    sparsity_type: str = "unstructured",
    **settings: Any,
) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Prune a model layer by layer; returns the pruned model and the results record.

    ``settings`` are the other fields of :class:`nlprune.runner.PruneRequest` (calibration:
    nsamples, seqlen, seed, data_dir; output and overwrite; evaluation: do_eval,
    eval_datasets, ...; the method's ``options`` named as its flags), each documented there.
    With ``output`` the run directory is locked while the run writes it, saved after every
    layer (the same call resumes an interrupted run), and everything that can be checked
    (arguments, output, data files and window counts) is checked before the first layer.
    """
    return runner.run(PruneRequest(model, prune_method, sparsity_ratio, sparsity_type, **settings))


def export_hf(run_dir: str | Path, output: str | Path, overwrite: bool = False, dtype: str | None = None) -> Path:
    """Write a run's pruned model as a Hugging Face folder that ``transformers`` loads as is
    (:func:`nlprune.convert.export.export_run_model`): ``dtype`` float32, bfloat16 or float16,
    default the source checkpoint's (GGUF: float32); config.json records the sparsity."""
    from nlprune.convert.export import check_target, export_run_model, numpy_dtype

    if dtype is not None:
        numpy_dtype(dtype)  # an unknown dtype is refused before anything is loaded
    check_target(Path(output), overwrite)  # before loading anything
    model, record = load_run(run_dir)
    desc = record["model"]
    source = cards.resolve_model(desc.get("card") or desc["path"], (desc.get("random_weights") or {}).get("seed"))
    return export_run_model(model, record, source, cards.load_tokenizer(source), output, overwrite=overwrite, dtype=dtype)
