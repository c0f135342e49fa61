"""The Python API under the command line: load, evaluate, prune.

    from nlprune import api
    loaded = api.load("smollm2-135m")
    record = api.evaluate("smollm2-135m", data_dir="../shared/data", nsamples=16)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from nlprune import cards
from nlprune.data import EVALUATION_SETS, evaluation_windows
from nlprune.eval.dense_cache import DensePerplexity, dense_perplexity, forward_code_version  # noqa: F401 (API)
from nlprune.eval.perplexity import perplexity
from nlprune.eval.tasks import DEFAULT_TASKS, resolve_task_data_dir
from nlprune.modeling.llama import LlamaForCausalLM
from nlprune.plan import ATTN_ERROR_BATCH, config_of
from nlprune.runs import MODEL, RunDir, RunDirError, open_finished


@dataclasses.dataclass
class Loaded:
    model: LlamaForCausalLM
    tokenizer: Any
    source: cards.ModelSource
    load_seconds: float

    def describe(self) -> dict[str, Any]:
        from nlprune.data import tokenizer_fingerprint

        return {**self.source.describe(), "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer)}


def load(model: str = cards.DEFAULT_MODEL, random_weights: int | None = None) -> Loaded:
    """Resolve ``model`` (card name, HF folder or .gguf), load weights (float32) and tokenizer.

    ``random_weights=SEED``: seeded random weights of the model's exact config instead of its
    own (nothing downloaded; the record's model description says so, with the seed)."""
    start = time.perf_counter()
    source = cards.resolve_model(model, random_weights=random_weights)
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
    from nlprune.checkpoint import load_model

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
    model, _ = load_model(run.path / MODEL)
    return model, record


def check_count(name: str, value: Any, minimum: int) -> None:
    """Refuse a count below ``minimum`` before anything is loaded."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


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
    from nlprune.eval.tasks.runner import check_task_request, run_tasks

    folder = resolve_task_data_dir(task_data_dir, data_dir)
    names = check_task_request(tasks, folder, limit)  # bad input fails before any loading
    loaded, scored, run_record = _model_for_eval(model, run_dir, random_weights)
    record = run_tasks(
        weights if weights is not None else scored, loaded.tokenizer, names, folder, limit=limit,
        batch_size=batch_size, progress=progress, bootstrap_iters=bootstrap_iters,
    )
    record.update(
        model=loaded.describe(),
        run=str(run_dir) if run_dir else None,
        run_method=(run_record or {}).get("args", {}).get("prune_method"),
        machine=machine(),
    )
    return record


class MemoryPlanError(ValueError):
    """A run whose planned memory is far beyond what this machine has."""


REFUSE_ABOVE = 1.5  # x the machine's memory: the plan is within ~20% of measured peaks (BENCHMARKS.md)


def check_memory_plan(model: str | Loaded, method: str, options: dict[str, Any], pattern, nsamples: int,
                      seqlen: int, batch_size: int, mesh) -> None:
    """Plan the run's memory (nlprune plan) before anything loads, on a CPU where the device's
    memory is the process's: refuse a run planned beyond 1.5x the machine's memory (it would
    swap for hours or be killed), warn above 1x. Nothing is refused where the plan cannot be
    made (an unusual model folder): the run then finds out as it always did."""
    from nlprune import parallel
    from nlprune.plan import gib, plan_memory

    if jax.default_backend() != "cpu":
        return
    try:
        config, name = (model.model.config, model.source.name) if isinstance(model, Loaded) else config_of(model)
        sizes = parallel.axis_sizes(mesh)
        plan = plan_memory(config, name, method=method, options=options, nsamples=nsamples, seqlen=seqlen,
                           batch_size=batch_size, data=sizes["data"], model=sizes["model"],
                           sparsity_type=pattern.name)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except Exception:  # noqa: BLE001  (planning is advice; the run itself checks what it must)
        return
    need = plan.cpu_process_bytes or plan.peak_bytes
    if need > REFUSE_ABOVE * total:
        raise MemoryPlanError(
            f"this run is planned to need {gib(need)} and the machine has {gib(total)}: lower --nsamples or "
            f"--seqlen (`nlprune plan` with the same flags shows where the memory goes and what lowers it)"
        )
    if need > total:
        warnings.warn(f"this run is planned to need {gib(need)}, more than the machine's {gib(total)}: it may "
                      "swap; `nlprune plan` with the same flags shows what lowers it", stacklevel=2)


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def prune(
    model: str | Loaded = cards.DEFAULT_MODEL,
    prune_method: str = "wanda",
    sparsity_ratio: float | None = 0.5,
    sparsity_type: str = "unstructured",
    nsamples: int = 8,
    seqlen: int = 512,
    seed: int = 0,
    data_dir: str | Path | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    do_eval: bool = False,
    eval_nsamples: int = 128,
    eval_seqlen: int = 512,
    attention_windows: int = 4,
    eval_datasets: Sequence[str] = ("c4",),
    heldout_nsamples: int = 64,
    batch_size: int = 8,
    options: dict[str, Any] | None = None,
    true_sequential: bool = True,
    progress: bool = True,
    mesh: str | jax.sharding.Mesh | None = None,
    use_cache: bool = True,
    calib_dataset: str | Path | None = None,
    sparsity_profile: str = "uniform",
    owl_m: float | None = None,
    owl_lambda: float | None = None,
    layer_sparsity: str | Path | list | dict | None = None,
    tasks: str | Sequence[str] | None = None,
    task_data_dir: str | Path | None = None,
    limit: int | None = None,
    dense_tasks: bool = False,
    run_config: dict[str, Any] | None = None,
    random_weights: int | None = None,
) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Prune a model layer by layer; returns the pruned model and the results record.

    With ``output`` the run directory is locked while the run writes it, and everything that
    can be checked (arguments, output, data files and window counts for calibration and
    evaluation) is checked before the first layer.

    Args:
        model: a card name (``nlprune models``), a Hugging Face folder, a ``.gguf`` file, or an
            already loaded model (:func:`load`).
        random_weights: a seed: prune seeded random weights of ``model``'s exact config (its
            tokenizer, no download; recorded in the model description).
        prune_method: ``magnitude``, ``wanda``, ``sparsegpt`` or ``nonlinear``
            (``nlprune.methods.available_methods()``).
        sparsity_ratio: fraction of each linear's weights removed, in [0, 1); may be None for
            N:M (implied by the pattern).
        sparsity_type: ``unstructured`` or ``N:M`` (keep N of every M consecutive weights of
            a row, e.g. ``2:4``).
        nsamples, seqlen, seed: the calibration windows: ``nsamples`` windows of ``seqlen``
            tokens drawn (seeded) from documents longer than ``seqlen`` (C4 train by default).
        data_dir: a local folder with the C4 shards (else ``$NLPRUNE_DATA_DIR``, else the hub).
        calib_dataset: ``c4`` (default), ``wikitext2`` or a local .jsonl / .json.gz / .txt file.
        sparsity_profile, owl_m, owl_lambda, layer_sparsity: per-layer unstructured ratios by
            OWL (``"owl"``) or from a JSON file / list / dict (:mod:`nlprune.prune.layerwise`).
        tasks, task_data_dir, limit, dense_tasks: zero-shot scores (:func:`evaluate_tasks`).
        run_config: the resolved command-line flags to record as ``config`` (None: this call's).
        output: a run directory to write (results.json, the Orbax model, the packed masks),
            saved after every layer so that the same call resumes an interrupted run; None
            writes nothing.
        overwrite: replace a finished run already in ``output``.
        do_eval, eval_nsamples, eval_seqlen: also measure the pruned and the dense model's
            perplexity on ``eval_nsamples`` windows of ``eval_seqlen`` tokens of the C4 test set.
        eval_datasets: the evaluation sets of ``do_eval`` (``nlprune.data.EVALUATION_SETS``):
            ``c4`` (test), ``c4-validation`` (the validation split), ``wikipedia`` and
            ``lambada`` (text unlike the calibration set) and their ``-validation`` halves,
            ``wikitext2``; ``NAME:N`` takes N windows of that set.
        heldout_nsamples: windows of each set other than the test sets (c4, wikitext2).
        attention_windows: windows (of ``seqlen`` tokens) of the C4 validation split on which
            the per-layer attention error is measured (0: skip it).
        batch_size: windows per forward pass.
        options: the method's options as the command line's flags name them (e.g.
            ``{"blocksize": 64}`` for sparsegpt, ``{"recipe": "best"}`` for nonlinear); they
            are resolved and validated once, before the model is loaded, and recorded.
        true_sequential: calibrate each sublayer on the already-pruned sublayers before it
            (default); False: every sublayer's statistics from the dense layer first, as
            Wanda's reference code does.
        progress: show progress bars.
        use_cache: False recomputes the dense perplexity and the evaluation tokens.
        mesh: a device mesh or a --mesh spec (``"data=2,model=2"``; ``""`` = every device on
            'data'); None = one device. A run may be resumed on another mesh.
    """
    from nlprune import parallel
    from nlprune.data import calibration_source, calibration_windows
    from nlprune.eval.attention_error import attention_error
    from nlprune.methods import get_method
    from nlprune.prune.layerwise import build_profile, linear_sizes, profile_request
    from nlprune.prune.pipeline import prune_model
    from nlprune.provenance import git_state
    from nlprune.runconfig import check_prune_tasks, config_of_call

    # Validate everything cheap before loading anything heavy.
    for name, value, minimum in (("--nsamples", nsamples, 1), ("--seqlen", seqlen, 2), ("--seed", seed, 0),
                                 ("--batch-size", batch_size, 1), ("attention_windows", attention_windows, 0)):
        check_count(name, value, minimum)
    eval_request, eval_counts = [str(x) for x in eval_datasets], {}  # "name" or "name:windows"
    for item in eval_datasets:
        name, _, count = str(item).partition(":")
        if count and not count.isdigit():
            raise ValueError(f"--eval-datasets entry {item!r}: write NAME or NAME:WINDOWS (e.g. wikipedia:64).")
        eval_counts[name] = int(count) if count else None
    eval_datasets = list(eval_counts)
    unknown = [d for d in eval_datasets if d not in EVALUATION_SETS]
    if unknown:
        raise ValueError(f"unknown evaluation set(s) {unknown} in --eval-datasets; choose from {', '.join(EVALUATION_SETS)}.")
    check_count("--heldout-nsamples", heldout_nsamples, 1)
    if random_weights is not None:
        check_count("--random-weights", random_weights, 0)
    if do_eval:
        check_count("--eval-nsamples", eval_nsamples, 1)
        check_count("--eval-seqlen", eval_seqlen, 2)
    config_given = dict(run_config) if run_config is not None else config_of_call(locals())
    if isinstance(mesh, str):
        mesh = parallel.parse_mesh(mesh)
    mesh = parallel.effective(mesh)
    uniform = (sparsity_profile or "uniform") == "uniform" and layer_sparsity is None
    model_config = None if uniform else (model.model.config if isinstance(model, Loaded) else config_of(model)[0])
    request = profile_request(model_config, sparsity_type, sparsity_ratio, sparsity_profile, owl_m, owl_lambda,
                              layer_sparsity)
    pattern = request.target
    if request.plan is not None:  # the plan itself, not the file's name: the run reruns from its config alone
        config_given["layer_sparsity"] = request.plan
    method = get_method(prune_method, **(options or {}))  # options resolved and validated once
    method.check_pattern(pattern)
    check_memory_plan(model, method.name, options or {}, pattern, nsamples, seqlen, batch_size, mesh)
    source = calibration_source(calib_dataset)
    task_names, task_dir = check_prune_tasks(tasks, task_data_dir, data_dir, limit, dense_tasks)
    run = RunDir(output) if output is not None else None
    # Claimed at once (a finished run, another writer or a foreign folder is refused before
    # anything loads); released on every exit, and a failure removes what the claim created.
    with run.claimed(overwrite) if run is not None else contextlib.nullcontext():
        loaded = model if isinstance(model, Loaded) else load(model, random_weights)
        if mesh is not None:  # the dense model too: it is evaluated beside the pruned one
            loaded = dataclasses.replace(loaded, model=parallel.place_model(loaded.model, mesh))
        config = loaded.model.config
        for width in (config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size):
            pattern.check_width(width, f"{loaded.source.name} (a linear layer)")

        calibration, calib_prov = calibration_windows(
            loaded.tokenizer, nsamples, seqlen, seed, data_dir=data_dir, dataset=source,
            max_seqlen=config.max_position_embeddings, progress=progress,
        )
        # The evaluation data too, before the first layer: a missing shard or too short a text
        # is found now, not after the whole prune.
        eval_kwargs = dict(data_dir=data_dir, max_seqlen=config.max_position_embeddings, progress=progress,
                           use_cache=use_cache)
        held_out, eval_sets = None, {}
        if attention_windows:  # the validation split: neither calibration nor test text
            held_out, _ = evaluation_windows(loaded.tokenizer, "c4-validation", attention_windows, seqlen, **eval_kwargs)
        if do_eval:
            for name in eval_datasets:
                n = eval_counts[name] or (eval_nsamples if name in ("c4", "wikitext2") else heldout_nsamples)
                check_count(f"--eval-datasets {name}:WINDOWS", n, 1)
                eval_sets[name] = evaluation_windows(loaded.tokenizer, name, n, eval_seqlen, **eval_kwargs)
        profile, owl_record = build_profile(request, loaded.model, calibration, batch_size, progress, mesh)
        args = {
            "model": loaded.source.name, "prune_method": method.name, "sparsity_ratio": pattern.ratio,
            "sparsity_type": pattern.name, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "options": method.options.as_dict(), "true_sequential": true_sequential, "eval": do_eval, "eval_nsamples": eval_nsamples, "eval_seqlen": eval_seqlen,
            "eval_datasets": eval_request, "heldout_nsamples": heldout_nsamples, "attention_windows": attention_windows,
            "mesh": parallel.mesh_spec(mesh),
        }
        model_desc = loaded.describe()
        fingerprint = {
            **{k: args[k] for k in ("prune_method", "sparsity_ratio", "sparsity_type", "nsamples", "seqlen", "seed", "true_sequential")},
            "options": json.loads(json.dumps(method.options.as_dict(), default=str)),
            "weights_sha256": model_desc["weights_sha256"],
            "calibration_sha256": [f["sha256"] for f in calib_prov["files"]],
            "calibration_windows_sha256": hashlib.sha256(np.ascontiguousarray(calibration, np.int32).tobytes()).hexdigest(),
        }
        if not profile.is_uniform:  # (a uniform run's fingerprint is as it always was: its state resumes)
            fingerprint["layer_ratios"] = profile.layer_ratios and list(profile.layer_ratios)
            fingerprint["linear_ratios"] = dict(profile.linear_ratios)

        start_layer, hidden, base, earlier = 0, None, loaded.model, []
        if run is not None:
            start_layer, base, hidden = run.resume(loaded.model, fingerprint, overwrite)
            earlier = list(run.layer_seconds[:start_layer])  # earlier segments of a resumed run
            if start_layer:
                base = parallel.place_model(base, mesh)  # restored arrays sit on device 0
        last = [time.perf_counter()]

        def checkpoint_layer(i, current, outputs):
            seconds = time.perf_counter() - last[0]  # this layer's pruning, as the pipeline times it
            run.save_layer(i, current.model.layers[i], outputs, fingerprint, seconds)
            last[0] = time.perf_counter()

        pruned, report = prune_model(
            base, calibration, method, profile, batch_size=batch_size, progress=progress,
            start_layer=start_layer, hidden=hidden, on_layer_done=checkpoint_layer if run else None,
            true_sequential=true_sequential, mesh=mesh,
        )
        planned = {**request.describe(), **profile.planned(linear_sizes(config))}
        if owl_record is not None:
            planned["owl"] = owl_record
        record: dict[str, Any] = {
            "args": args,
            "config": config_given,
            "code": git_state(),
            "model": model_desc,
            "calibration": {k: calib_prov.get(k) for k in ("dataset", "split", "files", "seed", "nsamples", "seqlen", "doc_indices", "starts")},
            "sparsity": {"overall": report.overall_sparsity, "per_layer": report.layer_sparsity,
                         "per_linear": report.sparsity, "planned": planned},
            "prune_seconds": sum(earlier) + report.prune_seconds,  # every segment of a resumed run
            "checkpoint_seconds": report.checkpoint_seconds,
            "layer_seconds": earlier + list(report.layer_seconds),
            "resumed_from_layer": start_layer,
            "mesh": report.mesh or parallel.describe(None),
            "peak_rss_bytes": _peak_rss_bytes(),
            **({"method_reports": method.reports} if method.reports else {}),  # e.g. nonlinear: per-layer GD
            "machine": machine(),
        }
        if held_out is not None:
            # one window per call, as plan.py counts it: at seqlen 2048 each window's dense and pruned
            # n x n probabilities (and their scores) are GBs for a 1B model
            per_layer = attention_error(loaded.model, pruned, held_out, batch_size=ATTN_ERROR_BATCH)
            record["attention_error"] = {"per_layer": per_layer, "mean": float(np.mean(per_layer)), "windows": attention_windows,
                                         "seqlen": seqlen, "split": "c4-validation"}
        if do_eval:
            record["perplexities"] = {}
            for name, (windows, prov) in eval_sets.items():
                pruned_ppl = perplexity(pruned, windows, batch_size=batch_size, progress=progress,
                                        desc=f"pruned perplexity ({name})")
                dense = dense_perplexity(loaded, windows, batch_size, progress, use_cache=use_cache)
                record["perplexities"][name] = {
                    "pruned": pruned_ppl.perplexity, "dense": dense.perplexity, "nsamples": len(windows),
                    "seqlen": eval_seqlen, "tokens": pruned_ppl.tokens, "files": prov["files"],
                    "seconds": pruned_ppl.seconds,
                    "dense_cache": {"cached": dense.cached, "computed": dense.computed, "path": dense.path},
                }
            if "c4" in eval_sets:  # the test set's numbers at the top level, as before
                c4 = record["perplexities"]["c4"]
                record.update(
                    perplexity=c4["pruned"], dense_perplexity=c4["dense"], dense_perplexity_cache=c4["dense_cache"],
                    eval={"dataset": "c4", "nsamples": c4["nsamples"], "seqlen": eval_seqlen, "tokens": c4["tokens"],
                          "files": c4["files"], "seconds": c4["seconds"]},
                )
        if task_names:
            task_kwargs = dict(tasks=task_names, task_data_dir=task_dir, limit=limit, progress=progress)
            record["zero_shot"] = evaluate_tasks(loaded, weights=pruned, **task_kwargs)
            if dense_tasks:
                record["dense_zero_shot"] = evaluate_tasks(loaded, **task_kwargs)
        if run is not None:
            run.finish(pruned, record, {"args": args, "model": model_desc})
        return pruned, record


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
