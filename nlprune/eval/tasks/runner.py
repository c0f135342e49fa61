"""Scoring local zero-shot tasks through lm-evaluation-harness's evaluator.

``run_tasks`` runs lm-eval's ``evaluate`` task by task (zero-shot, lm-eval's own metrics and
standard errors) on ``NlpruneLM`` or any other lm-eval model, and returns a JSON-ready
record: per task acc (and acc_norm, perplexity where lm-eval reports them) with standard
errors, the examples scored, whether that is a subset, seconds, and each example's outcome
(``examples_correct``, which ``paired.compare`` pairs across two records); the mean accuracy.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import LM

from nlprune.cards import file_sha256
from nlprune.eval.harness import NlpruneLM
from nlprune.eval.tasks import load_task_docs, parse_task_list, task_manager
from nlprune.eval.tasks.paired import encode_examples
from nlprune.modeling.llama import LlamaForCausalLM

# Metrics the record keeps (lm-eval's names), with their standard errors.
REPORTED_METRICS = ("acc", "acc_norm", "perplexity")


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """lm-eval's info/warning logs and datasets' progress bars off while tasks run, its
    prints sent to stderr (stdout keeps the results), and bootstrap standard errors computed
    in-process (lm-eval would fork this JAX process)."""
    import datasets

    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    saved_env = os.environ.get("DISABLE_MULTIPROC")
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        if saved_env is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = saved_env


def evaluate_task(lm: LM, manager: Any, name: str, limit: int | None, bootstrap_iters: int) -> tuple[dict, Any]:
    """lm-eval's evaluator on one task, zero-shot: (its results dict, the task object)."""
    from lm_eval.evaluator import evaluate

    loaded = manager.load([name])
    task = loaded["tasks"][name]
    if task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)
    out = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=True)
    return out, task


def predictions(samples: list[dict], task: Any) -> list[dict[str, Any]]:
    """Per-example decisions from lm-eval's logged samples: the chosen answer (argmax of the
    log-likelihoods, and of the length-normalised ones where acc_norm is reported) for
    multiple choice; whether the continuation is the greedy one for loglikelihood tasks."""
    out = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        resps = sample["filtered_resps"]
        lls = np.array([float(r[0]) for r in resps])
        entry: dict[str, Any] = {"doc_id": int(sample["doc_id"]), "loglikelihoods": lls.tolist()}
        if task.OUTPUT_TYPE == "multiple_choice":
            entry["choice"] = int(np.argmax(lls))
            entry["correct"] = bool(sample["acc"])
            if "acc_norm" in sample:
                lengths = np.array([float(len(c)) for c in task.doc_to_choice(sample["doc"])])
                entry["choice_norm"] = int(np.argmax(lls / lengths))
        else:
            entry["greedy"] = bool(resps[0][1])
        out.append(entry)
    return out


def example_outcomes(samples: list[dict]) -> dict[str, Any]:
    """lm-eval's per-example ``acc`` in doc order, compactly (``paired.compare`` pairs two
    records on them)."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return encode_examples([int(s["doc_id"]) for s in ordered], [bool(s["acc"]) for s in ordered])


def task_entry(out: dict, name: str, seconds: float) -> dict[str, Any]:
    metrics = {key.split(",")[0]: value for key, value in out["results"][name].items() if "," in key}
    entry: dict[str, Any] = {}
    for metric in REPORTED_METRICS:
        if metric in metrics:
            entry[metric] = metrics[metric]
            entry[f"{metric}_stderr"] = metrics.get(f"{metric}_stderr")
    counts = out["n-samples"][name]
    entry.update(
        examples=counts["effective"], total_examples=counts["original"],
        subset=counts["effective"] < counts["original"], seconds=seconds,
    )
    return entry


def mean_accuracy(entries: dict[str, dict]) -> tuple[float, float | None]:
    """Unweighted mean of the tasks' acc, and its standard error (tasks independent; None
    when a task has none, as lm-eval gives none for a single example)."""
    accs = [e["acc"] for e in entries.values()]
    errors = [e["acc_stderr"] for e in entries.values()]
    stderr = math.sqrt(sum(s * s for s in errors)) / len(errors) if all(isinstance(s, float) for s in errors) else None
    return float(np.mean(accs)), stderr


def check_task_request(tasks: str | Sequence[str], task_data_dir: str | Path, limit: int | None) -> list[str]:
    """The task names, once every task's files are read and ``limit`` is valid; a clear
    error otherwise (before anything is scored)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be a whole number of examples >= 1, got {limit!r}.")
    names = parse_task_list(tasks)
    for name in names:
        load_task_docs(name, task_data_dir)
    return names


def run_tasks(
    model: LlamaForCausalLM,
    tokenizer: Any,
    tasks: str | Sequence[str],
    task_data_dir: str | Path,
    limit: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    bootstrap_iters: int = 1000,
    keep_predictions: bool = False,
    lm: LM | None = None,
) -> dict[str, Any]:
    """Zero-shot scores of ``model`` on local ``tasks`` through lm-eval's evaluator.

    ``limit``: score only the first N examples of each task (the record says it is a
    subset). ``lm``: score another lm-eval model instead (the parity check passes lm-eval's
    own ``hf`` model here); ``model`` and ``tokenizer`` are then unused."""
    if bootstrap_iters < 0:
        raise ValueError(f"bootstrap_iters must be >= 0, got {bootstrap_iters}.")
    data_dir = Path(task_data_dir)
    names = check_task_request(tasks, data_dir, limit)
    docs = {name: load_task_docs(name, data_dir) for name in names}
    if lm is None:
        lm = NlpruneLM(model, tokenizer, batch_size=batch_size, progress=progress)
    manager = task_manager(data_dir)
    entries, kept, start = {}, {}, time.perf_counter()
    with quiet_lm_eval():
        for name in names:
            task_start = time.perf_counter()
            out, task = evaluate_task(lm, manager, name, limit, bootstrap_iters)
            entries[name] = task_entry(out, name, time.perf_counter() - task_start)
            entries[name].update(
                split=docs[name].split,
                files=[{"path": str(p), "sha256": file_sha256(p)} for p in docs[name].files],
                examples_correct=example_outcomes(out["samples"][name]),
            )
            if keep_predictions:
                kept[name] = predictions(out["samples"][name], task)
    import lm_eval

    mean, stderr = mean_accuracy(entries)
    record: dict[str, Any] = {
        "tasks": entries,
        "mean_acc": mean,
        "mean_acc_stderr": stderr,
        "subset": any(e["subset"] for e in entries.values()),
        "limit": limit,
        "seconds": time.perf_counter() - start,
        "task_data_dir": str(data_dir),
        "protocol": {
            "harness": f"lm-eval {lm_eval.__version__}", "num_fewshot": 0, "batch_size": batch_size,
            "bootstrap_iters": bootstrap_iters,
            "mean_acc": "unweighted mean of the tasks' acc; stderr sqrt(sum of squared stderrs) / tasks",
        },
    }
    if isinstance(lm, NlpruneLM):
        record["forward"] = lm.describe()
    if keep_predictions:
        record["predictions"] = kept
    return record


def format_table(record: dict[str, Any]) -> str:
    """The task scores as a text table (acc and acc_norm with their standard errors)."""

    def cell(entry: dict, metric: str) -> str:
        if metric not in entry:
            return f"{'-':>16}"
        se = entry.get(f"{metric}_stderr")
        return f"{entry[metric]:>7.4f} ± {se:.4f}" if isinstance(se, float) else f"{entry[metric]:>7.4f}        "

    lines = [f"{'task':<16}{'acc':>16}  {'acc_norm':>16}  {'examples':>16}  {'seconds':>8}"]
    for name, entry in record["tasks"].items():
        n = f"{entry['examples']}/{entry['total_examples']}" + (" subset" if entry["subset"] else "")
        extra = f"  (perplexity {entry['perplexity']:.3f})" if "perplexity" in entry else ""
        lines.append(f"{name:<16}{cell(entry, 'acc')}  {cell(entry, 'acc_norm')}  {n:>16}  {entry['seconds']:>8.1f}{extra}")
    mean = {"acc": record["mean_acc"], "acc_stderr": record["mean_acc_stderr"]}
    lines.append(f"{'mean':<16}{cell(mean, 'acc')}")
    return "\n".join(lines)


def agreement(ours: list[dict], theirs: list[dict]) -> dict[str, Any]:
    """How often two models' per-example decisions (``predictions``) are the same: the
    chosen answer (and length-normalised one) for multiple choice, greedy-ness otherwise."""
    if [p["doc_id"] for p in ours] != [p["doc_id"] for p in theirs]:
        raise ValueError("the two prediction lists cover different examples.")
    keys = [k for k in ("choice", "choice_norm", "greedy") if ours and k in ours[0]]
    same = [all(a[k] == b[k] for k in keys) for a, b in zip(ours, theirs)]
    return {
        "items": len(same), "agree": int(sum(same)), "agreement": float(np.mean(same)) if same else float("nan"),
        "compared": keys, "differ": [a["doc_id"] for a, s in zip(ours, same) if not s],
    }
