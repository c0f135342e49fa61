"""One prune run as a typed request and four named stages.

:class:`PruneRequest` holds everything a run is asked to do (``api.prune``'s arguments);
:func:`run` takes it through the stages: ``check`` (every cheap check, before anything
loads), ``load_inputs`` (model, calibration and evaluation windows, the sparsity profile),
``prune_layers`` (the pipeline, checkpointed per layer so that the same request resumes) and
``evaluate`` (attention error, perplexities, zero-shot tasks), then the record.
"""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from nlprune.data import EVALUATION_SETS, evaluation_windows
from nlprune.eval.dense_cache import dense_perplexity
from nlprune.eval.perplexity import perplexity
from nlprune.loaded import Loaded, check_count, load, load_streamed, machine, score_tasks
from nlprune.modeling.llama import LlamaForCausalLM
from nlprune.modeling.precision import storage_dtype
from nlprune.plan import ATTN_ERROR_BATCH, config_of
from nlprune.request import PruneRequest
from nlprune.runs import RunDir
from nlprune.shared_run import open_for_writing


@dataclasses.dataclass(frozen=True)
class Checked:
    """What ``check`` resolved from a request, before anything loaded."""

    method: Any  # the configured PruningMethod
    profile_request: Any  # nlprune.prune.layerwise.ProfileRequest
    mesh: Any
    source: Any  # the calibration source
    task_names: list[str] | None
    task_dir: Path | None
    eval_counts: dict[str, int | None]  # evaluation set -> windows (None: the default count)
    config: dict[str, Any]  # the run's flags, as results.json records them

    @property
    def pattern(self):
        return self.profile_request.target


@dataclasses.dataclass
class Inputs:
    """What ``load_inputs`` read: the model and every window the run uses."""

    loaded: Loaded
    calibration: np.ndarray
    calib_prov: dict[str, Any]
    held_out: np.ndarray | None  # the attention-error windows
    eval_sets: dict[str, tuple[np.ndarray, dict[str, Any]]]
    profile: Any  # the realised SparsityProfile
    owl_record: dict[str, Any] | None


class MemoryPlanError(ValueError):
    """A run whose planned memory is far beyond what this machine has."""


REFUSE_ABOVE = 1.5  # x the machine's memory: the plan is within ~20% of measured peaks (BENCHMARKS.md)


def check_memory_plan(model: str | Loaded, method: str, options: dict[str, Any], pattern, nsamples: int,
                      seqlen: int, batch_size: int, mesh, dtype: str = "float32") -> None:
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
                           sparsity_type=pattern.name, dtype=model.dtype if isinstance(model, Loaded) else dtype)
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


def _eval_counts(eval_datasets: Sequence[str]) -> dict[str, int | None]:
    counts: dict[str, int | None] = {}
    for item in eval_datasets:
        name, _, count = str(item).partition(":")
        if count and not count.isdigit():
            raise ValueError(f"--eval-datasets entry {item!r}: write NAME or NAME:WINDOWS (e.g. wikipedia:64).")
        counts[name] = int(count) if count else None
    unknown = [d for d in counts if d not in EVALUATION_SETS]
    if unknown:
        raise ValueError(f"unknown evaluation set(s) {unknown} in --eval-datasets; choose from {', '.join(EVALUATION_SETS)}.")
    return counts


STORAGE_DTYPES = ("float32", "bfloat16")


def check_streamable(req: PruneRequest, profile_req, mesh) -> None:
    """What a streamed run (one decoder layer in memory at a time) cannot do yet, in one line each."""
    from nlprune import parallel

    if req.output is None:
        raise ValueError("--stream keeps each pruned layer only in the run directory: give --output.")
    if isinstance(req.model, Loaded):
        raise ValueError("--stream reads the model from disk: give a card name, folder or .gguf file, not a loaded model.")
    if profile_req.kind == "owl":
        raise ValueError("--stream does not compute OWL's outlier profile (it runs the whole model): run "
                         "`nlprune prune --sparsity-profile owl` without --stream, or give the ratios with --layer-sparsity.")
    if req.tasks:
        raise ValueError("--stream does not score zero-shot tasks (they need the whole model in memory): score the "
                         "finished run with `nlprune eval --run RUN_DIR --tasks ...`.")
    if parallel.axis_sizes(mesh)["data"] * parallel.axis_sizes(mesh)["model"] > 1:
        raise ValueError("--stream runs on one device for now: drop --mesh.")


def check(req: PruneRequest) -> Checked:
    """Every check that needs no model weights, in the order a user meets them."""
    from nlprune import parallel
    from nlprune.data import calibration_source
    from nlprune.methods import get_method
    from nlprune.prune.layerwise import profile_request
    from nlprune.runconfig import check_prune_tasks, config_of_call

    for name, value, minimum in (("--nsamples", req.nsamples, 1), ("--seqlen", req.seqlen, 2), ("--seed", req.seed, 0),
                                 ("--batch-size", req.batch_size, 1), ("--attention-windows", req.attention_windows, 0)):
        check_count(name, value, minimum)
    eval_counts = _eval_counts(req.eval_datasets)
    check_count("--heldout-nsamples", req.heldout_nsamples, 1)
    if req.random_weights is not None:
        check_count("--random-weights", req.random_weights, 0)
    if req.do_eval:
        check_count("--eval-nsamples", req.eval_nsamples, 1)
        check_count("--eval-seqlen", req.eval_seqlen, 2)
    config = dict(req.run_config) if req.run_config is not None else config_of_call(
        {f.name: getattr(req, f.name) for f in dataclasses.fields(req)})
    mesh = parallel.effective(parallel.parse_mesh(req.mesh) if isinstance(req.mesh, str) else req.mesh)
    model = req.model
    uniform = (req.sparsity_profile or "uniform") == "uniform" and req.layer_sparsity is None
    model_config = None if uniform else (model.model.config if isinstance(model, Loaded) else config_of(model)[0])
    profile_req = profile_request(model_config, req.sparsity_type, req.sparsity_ratio, req.sparsity_profile,
                                  req.owl_m, req.owl_lambda, req.layer_sparsity)
    if profile_req.plan is not None:  # the plan itself, not the file's name: the run reruns from its config alone
        config["layer_sparsity"] = profile_req.plan
    storage_dtype(req.dtype)
    method = get_method(req.prune_method, **(req.options or {}))  # options resolved and validated once
    method.check_pattern(profile_req.target)
    if req.stream:
        check_streamable(req, profile_req, mesh)
    else:  # (the plan counts a whole model in memory: a streamed run holds one layer)
        check_memory_plan(model, method.name, req.options or {}, profile_req.target, req.nsamples, req.seqlen,
                          req.batch_size, mesh, req.dtype)
    source = calibration_source(req.calib_dataset)
    task_names, task_dir = check_prune_tasks(req.tasks, req.task_data_dir, req.data_dir, req.limit, req.dense_tasks)
    return Checked(method, profile_req, mesh, source, task_names, task_dir, eval_counts, config)


def load_inputs(req: PruneRequest, checked: Checked) -> Inputs:
    """The model, then every window the run reads: calibration, and the evaluation data too,
    before the first layer (a missing shard or too short a text is found now, not after the
    whole prune); then the sparsity profile (OWL's needs the model and the calibration)."""
    from nlprune import parallel
    from nlprune.data import calibration_windows
    from nlprune.prune.layerwise import build_profile

    if req.stream:
        loaded = load_streamed(req.model, req.random_weights, req.dtype, req.progress)
    else:
        loaded = req.model if isinstance(req.model, Loaded) else load(req.model, req.random_weights, req.dtype)
    if checked.mesh is not None:  # the dense model too: it is evaluated beside the pruned one
        loaded = dataclasses.replace(loaded, model=parallel.place_model(loaded.model, checked.mesh))
    config = loaded.config
    for width in (config.hidden_size, config.num_attention_heads * config.head_dim, config.intermediate_size):
        checked.pattern.check_width(width, f"{loaded.source.name} (a linear layer)")
    calibration, calib_prov = calibration_windows(
        loaded.tokenizer, req.nsamples, req.seqlen, req.seed, data_dir=req.data_dir, dataset=checked.source,
        max_seqlen=config.max_position_embeddings, progress=req.progress,
    )
    eval_kwargs = dict(data_dir=req.data_dir, max_seqlen=config.max_position_embeddings, progress=req.progress,
                       use_cache=req.use_cache)
    held_out, eval_sets = None, {}
    if req.attention_windows:  # the validation split: neither calibration nor test text
        held_out, _ = evaluation_windows(loaded.tokenizer, "c4-validation", req.attention_windows, req.seqlen,
                                         **eval_kwargs)
    if req.do_eval:
        for name, count in checked.eval_counts.items():
            n = count or (req.eval_nsamples if name in ("c4", "wikitext2") else req.heldout_nsamples)
            check_count(f"--eval-datasets {name}:WINDOWS", n, 1)
            eval_sets[name] = evaluation_windows(loaded.tokenizer, name, n, req.eval_seqlen, **eval_kwargs)
    profile, owl_record = build_profile(checked.profile_request, loaded.model, calibration, req.batch_size,
                                        req.progress, checked.mesh, num_layers=config.num_hidden_layers)
    return Inputs(loaded, calibration, calib_prov, held_out, eval_sets, profile, owl_record)


def run_args(req: PruneRequest, checked: Checked) -> dict[str, Any]:
    """The record's ``args``: the request as the run resolved it."""
    from nlprune import parallel

    pattern = checked.pattern
    return {
        "model": None, "prune_method": checked.method.name, "sparsity_ratio": pattern.ratio,
        "sparsity_type": pattern.name, "nsamples": req.nsamples, "seqlen": req.seqlen, "seed": req.seed,
        "options": checked.method.options.as_dict(), "true_sequential": req.true_sequential, "eval": req.do_eval,
        "eval_nsamples": req.eval_nsamples, "eval_seqlen": req.eval_seqlen,
        "eval_datasets": [str(x) for x in req.eval_datasets], "heldout_nsamples": req.heldout_nsamples,
        "attention_windows": req.attention_windows, "mesh": parallel.mesh_spec(checked.mesh),
    }


def fingerprint(args: dict[str, Any], checked: Checked, inputs: Inputs, model_desc: dict[str, Any]) -> dict[str, Any]:
    """What a resumed run must share with the run it resumes: settings, weights, calibration."""
    fp = {
        **{k: args[k] for k in ("prune_method", "sparsity_ratio", "sparsity_type", "nsamples", "seqlen", "seed",
                                "true_sequential")},
        "options": json.loads(json.dumps(checked.method.options.as_dict(), default=str)),
        "weights_sha256": model_desc["weights_sha256"],
        "calibration_sha256": [f["sha256"] for f in inputs.calib_prov["files"]],
        "calibration_windows_sha256": hashlib.sha256(
            np.ascontiguousarray(inputs.calibration, np.int32).tobytes()).hexdigest(),
    }
    if inputs.loaded.dtype != "float32":  # (a float32 run's fingerprint is as it always was)
        fp["dtype"] = inputs.loaded.dtype
    if not inputs.profile.is_uniform:  # (a uniform run's fingerprint is as it always was: its state resumes)
        fp["layer_ratios"] = inputs.profile.layer_ratios and list(inputs.profile.layer_ratios)
        fp["linear_ratios"] = dict(inputs.profile.linear_ratios)
    return fp


def prune_layers(req: PruneRequest, checked: Checked, inputs: Inputs, fp: dict[str, Any], run: RunDir | None):
    """The pipeline from the first layer not yet in ``run`` (all of them without one), each
    finished layer saved there. Returns (pruned model, pipeline report, resumed-from layer,
    the seconds of the layers pruned by earlier segments of a resumed run)."""
    from nlprune import parallel
    from nlprune.prune.pipeline import prune_model

    if req.stream:
        return prune_layers_streamed(req, checked, inputs, fp, run)
    start_layer, hidden, base, earlier = 0, None, inputs.loaded.model, []
    if run is not None:
        start_layer, base, hidden = run.resume(inputs.loaded.model, fp, req.overwrite)
        earlier = list(run.layer_seconds[:start_layer])
        if start_layer:
            base = parallel.place_model(base, checked.mesh)  # restored arrays sit on device 0
    last = [time.perf_counter()]

    def checkpoint_layer(i, layer, outputs):
        seconds = time.perf_counter() - last[0]  # this layer's pruning, as the pipeline times it
        run.save_layer(i, layer, outputs, fp, seconds)
        last[0] = time.perf_counter()

    pruned, report = prune_model(
        base, inputs.calibration, checked.method, inputs.profile, batch_size=req.batch_size, progress=req.progress,
        start_layer=start_layer, hidden=hidden, on_layer_done=checkpoint_layer if run else None,
        true_sequential=req.true_sequential, mesh=checked.mesh,
    )
    return pruned, report, start_layer, earlier


def prune_layers_streamed(req: PruneRequest, checked: Checked, inputs: Inputs, fp: dict[str, Any], run: RunDir):
    """:func:`prune_layers` holding one decoder layer at a time: each is read from the model's
    files when its turn comes and lives on only in ``run``. Returns what it returns, with no
    model (None)."""
    from nlprune.prune.pipeline import layer_zeros, prune_streamed

    reader, config = inputs.loaded.reader, inputs.loaded.config
    start_layer, _, hidden = run.resume(None, fp, req.overwrite)
    earlier = list(run.layer_seconds[:start_layer])
    zeros = [layer_zeros(i, run.pruned_layer(config, i)) for i in range(start_layer)]
    if hidden is None:
        hidden = jax.numpy.asarray(reader.embed_rows(np.asarray(inputs.calibration, np.int32)))
    last, reading = [time.perf_counter()], [0.0]

    def read(i):
        t0 = time.perf_counter()
        layer = reader.layer(i)
        reading[0] += time.perf_counter() - t0
        return layer

    def save(i, layer, outputs):
        seconds = time.perf_counter() - last[0] - reading[0]  # this layer's pruning, without its read
        run.save_layer(i, layer, outputs, fp, seconds, config=config)
        last[0], reading[0] = time.perf_counter(), 0.0

    report = prune_streamed(config, read, hidden, checked.method, inputs.profile, save,
                            batch_size=req.batch_size, progress=req.progress, start_layer=start_layer,
                            true_sequential=req.true_sequential, earlier_zeros=zeros)
    return None, report, start_layer, earlier


def shell_parts(reader) -> dict[str, Any]:
    """The reader's embeddings, final norm and LM head (None when tied) as the layered model
    copies them, a chunk at a time (:func:`nlprune.layered.save_layered_model`): in their stored
    precision, the embeddings and head rounded to bfloat16 under ``--dtype bfloat16``."""
    from nlprune.layered import SHELL_NAMES

    tied = reader.config.tie_word_embeddings
    copy = lambda part: reader.tensor_bytes if part == "norm" else reader.stored_bytes  # norms stay as stored
    return {part: None if (part == "lm_head" and tied) else functools.partial(copy(part), name)
            for part, name in SHELL_NAMES.items()}


def evaluate(record: dict[str, Any], req: PruneRequest, checked: Checked, inputs: Inputs,
             pruned: LlamaForCausalLM | None, run: RunDir | None = None) -> None:
    """Add the attention error, the perplexities and the task scores the request asks for.
    ``pruned`` None (a streamed run): the pruned layers are read from ``run`` one at a time."""
    from nlprune.eval.attention_error import attention_error, attention_error_streamed
    from nlprune.eval.perplexity import perplexity_streamed

    loaded = inputs.loaded
    if pruned is None:
        reader, config = loaded.reader, loaded.config
        shell = reader.shell() if req.do_eval else None

        def pruned_layer(i):
            return run.pruned_layer(config, i)

        def model_perplexity(windows, desc):
            return perplexity_streamed(shell, pruned_layer, windows, batch_size=req.batch_size,
                                       progress=req.progress, desc=desc)
    else:
        def model_perplexity(windows, desc):
            return perplexity(pruned, windows, batch_size=req.batch_size, progress=req.progress, desc=desc)
    if inputs.held_out is not None:
        # one window per call, as plan.py counts it: at seqlen 2048 each window's dense and pruned
        # n x n probabilities (and their scores) are GBs for a 1B model
        if pruned is None:
            per_layer = attention_error_streamed(config, reader.embed_rows, reader.layer, pruned_layer,
                                                 inputs.held_out, batch_size=ATTN_ERROR_BATCH)
        else:
            per_layer = attention_error(loaded.model, pruned, inputs.held_out, batch_size=ATTN_ERROR_BATCH)
        record["attention_error"] = {"per_layer": per_layer, "mean": float(np.mean(per_layer)),
                                     "windows": req.attention_windows, "seqlen": req.seqlen, "split": "c4-validation"}
    if req.do_eval:
        record["perplexities"] = {}
        for name, (windows, prov) in inputs.eval_sets.items():
            ppl = model_perplexity(windows, f"pruned perplexity ({name})")
            dense = dense_perplexity(loaded, windows, req.batch_size, req.progress, use_cache=req.use_cache)
            record["perplexities"][name] = {
                "pruned": ppl.perplexity, "dense": dense.perplexity, "nsamples": len(windows),
                "seqlen": req.eval_seqlen, "tokens": ppl.tokens, "files": prov["files"], "seconds": ppl.seconds,
                "dense_cache": {"cached": dense.cached, "computed": dense.computed, "path": dense.path},
                # which text: a split's definition can change (Wikipedia's halves split by article)
                **{k: prov[k] for k in ("part", "text_sha256") if k in prov},
            }
        if "c4" in inputs.eval_sets:  # the test set's numbers at the top level, as before
            c4 = record["perplexities"]["c4"]
            record.update(
                perplexity=c4["pruned"], dense_perplexity=c4["dense"], dense_perplexity_cache=c4["dense_cache"],
                eval={"dataset": "c4", "nsamples": c4["nsamples"], "seqlen": req.eval_seqlen, "tokens": c4["tokens"],
                      "files": c4["files"], "seconds": c4["seconds"]},
            )
    if checked.task_names:
        kwargs = dict(limit=req.limit, progress=req.progress)
        record["zero_shot"] = score_tasks(loaded, pruned, checked.task_names, checked.task_dir, **kwargs)
        if req.dense_tasks:
            record["dense_zero_shot"] = score_tasks(loaded, loaded.model, checked.task_names, checked.task_dir,
                                                    **kwargs)


def run(req: PruneRequest) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Check, load, prune, evaluate, record (``api.prune``)."""
    from nlprune import parallel, processes
    from nlprune.prune.layerwise import linear_sizes
    from nlprune.provenance import git_state

    if not processes.is_writer():  # several processes (jax.distributed): progress shown by process 0
        req = dataclasses.replace(req, progress=False)
    checked = check(req)
    run_dir = open_for_writing(req.output) if req.output is not None else None  # process 0 writes
    # Claimed at once (a finished run, another writer or a foreign folder is refused before
    # anything loads); released on every exit, and a failure removes what the claim created.
    with run_dir.claimed(req.overwrite) if run_dir is not None else contextlib.nullcontext():
        inputs = load_inputs(req, checked)
        args = {**run_args(req, checked), "model": inputs.loaded.source.name, "dtype": inputs.loaded.dtype}
        model_desc = inputs.loaded.describe()
        fp = fingerprint(args, checked, inputs, model_desc)
        pruned, report, start_layer, earlier = prune_layers(req, checked, inputs, fp, run_dir)
        planned = {**checked.profile_request.describe(),
                   **inputs.profile.planned(linear_sizes(inputs.loaded.config))}
        if inputs.owl_record is not None:
            planned["owl"] = inputs.owl_record
        record: dict[str, Any] = {
            "args": args, "config": checked.config, "code": git_state(), "model": model_desc,
            "calibration": {k: inputs.calib_prov.get(k) for k in ("dataset", "split", "files", "seed", "nsamples",
                                                                   "seqlen", "doc_indices", "starts")},
            "sparsity": {"overall": report.overall_sparsity, "per_layer": report.layer_sparsity,
                         "per_linear": report.sparsity, "planned": planned},
            "prune_seconds": sum(earlier) + report.prune_seconds,  # every segment of a resumed run
            "checkpoint_seconds": report.checkpoint_seconds,
            "layer_seconds": earlier + list(report.layer_seconds),
            "resumed_from_layer": start_layer,
            "mesh": report.mesh or parallel.describe(None),
            "peak_rss_bytes": _peak_rss_bytes(),
            "stream": bool(req.stream),
            **({"read_seconds": report.read_seconds} if req.stream else {}),
            **({"method_reports": checked.method.reports} if checked.method.reports else {}),
            "machine": machine(),
        }
        evaluate(record, req, checked, inputs, pruned, run_dir)
        record["peak_rss_bytes_after_eval"] = _peak_rss_bytes()
        meta = {"args": args, "model": model_desc}
        if pruned is None:
            run_dir.finish_streamed(shell_parts(inputs.loaded.reader), inputs.loaded.config, record, meta)
        elif run_dir is not None:
            run_dir.finish(pruned, record, meta)
        return pruned, record
