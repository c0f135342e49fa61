"""Zero-shot task accuracy through lm-evaluation-harness, on nlprune's Equinox model.

``NlpruneLM`` wraps a ``LlamaForCausalLM`` and its tokenizer as an ``lm_eval.api.model.LM``,
so a pruned model is scored where it is, without exporting it. Requests are tokenised as
lm-eval's ``hf`` model tokenises them, sorted by length, right-padded to a few bucketed
lengths (XLA compiles one shape per bucket; causal attention means the padding changes
nothing before it) and run through one forward per batch; the log-softmax is taken only at
the continuation positions, so the (batch, seq, vocab) logits never exist.

``run_tasks`` scores a list of the local tasks (``nlprune.eval.tasks``) with lm-eval's own
evaluator and metrics, one task at a time, and returns a JSON-ready record.
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

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from tqdm.auto import tqdm

from nlprune.modeling.forward import hidden_states
from nlprune.modeling.llama import LlamaForCausalLM

# Padded sequence lengths: about 15% padding at worst, and few shapes to compile.
LENGTH_BUCKETS = (16, 32, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)
# Scored positions are processed this many logits (positions x vocab) at a time.
LOGITS_PER_CHUNK = 1 << 23


class GenerationNotSupported(ValueError):
    """lm-eval asked for text generation, which nlprune's evaluator does not do."""


def length_bucket(n: int) -> int:
    """The padded length for a sequence of ``n`` tokens."""
    for size in LENGTH_BUCKETS:
        if n <= size:
            return size
    return -(-n // 512) * 512


def power_of_two_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@eqx.filter_jit
def gather_positions(h: jax.Array, rows: jax.Array, positions: jax.Array) -> jax.Array:
    """h (batch, seq, hidden) at (rows[i], positions[i]) -> (n, hidden)."""
    return h[rows, positions]


@eqx.filter_jit
def score_positions(model: LlamaForCausalLM, h: jax.Array, targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Log-probability of ``targets`` (n,) from last hidden states h (n, hidden), and whether
    each target is the argmax token; ``chunk`` positions at a time (n is a multiple of it)."""
    w = model.head_weight()
    bias = model.lm_head.bias if model.lm_head is not None else None

    def one_chunk(args):
        hc, tc = args
        logits = model.final_hidden(hc) @ w.T
        if bias is not None:
            logits = logits + bias
        picked = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == tc

    n, d = h.shape
    logp, greedy = jax.lax.map(one_chunk, (h.reshape(n // chunk, chunk, d), targets.reshape(n // chunk, chunk)))
    return logp.reshape(n), greedy.reshape(n)


class NlpruneLM(LM):
    """An lm-eval language model backed by nlprune's Equinox Llama.

    ``batch_size``: most sequences per forward; ``tokens_per_batch``: most padded tokens per
    forward (long buckets get fewer rows). Tokenisation follows lm-eval's ``hf`` model with
    its defaults: the tokenizer's own special-token handling, the BOS token (else EOS) as the
    context of an empty context and of rolling windows, left truncation to ``max_length``.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: Any,
        batch_size: int = 32,
        tokens_per_batch: int = 8192,
        max_length: int | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}.")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.tokens_per_batch = tokens_per_batch
        self._max_length = max_length or model.config.max_position_embeddings
        self.progress = progress
        vocab = model.config.vocab_size
        self.chunk = max(1, 1 << int(math.log2(max(1, LOGITS_PER_CHUNK // vocab))))
        self.stats: dict[str, Any] = {
            "requests": 0, "forwards": 0, "tokens": 0, "padded_tokens": 0, "forward_seconds": 0.0, "shapes": set(),
        }

    # ---- tokenisation, as lm-eval's hf model does it ------------------------------------
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context (or a rolling window) is conditioned on."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """The tokenizer's default special tokens unless told otherwise; none when the text
        already starts with the prefix token."""
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and text.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kwargs = {"add_special_tokens": False}
        return self.tokenizer.encode(text, **kwargs)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens: trailing spaces of the context move to the
        continuation, the whole string is encoded, and the continuation is what follows the
        context's own encoding (so a merge across the boundary stays in the continuation)."""
        if context == "":
            tokens = self.tok_encode(continuation, add_special_tokens=False)
            if tokens and tokens[0] == self.prefix_token_id:
                return tokens[:1], tokens[1:]
            return [self.prefix_token_id], tokens
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        whole = self.tok_encode(stripped + continuation)
        context_tokens = self.tok_encode(stripped)
        return context_tokens, whole[len(context_tokens):]

    # ---- lm-eval's interface -------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        results = self.score_tokens(pairs, desc="loglikelihood", disable_tqdm=disable_tqdm)
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owners = [], []
        for index, req in enumerate(requests):
            (text,) = req.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(index)
        scores = self.score_tokens(pairs, desc="loglikelihood_rolling", disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, scores):
            totals[owner] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise GenerationNotSupported(
            "generate_until (text generation) is not supported by nlprune's evaluator: it scores "
            "loglikelihood and multiple-choice tasks only."
        )

    # ---- the batched forward -------------------------------------------------------------
    def rows_per_batch(self, length: int, remaining: int) -> int:
        """Rows of a batch padded to ``length``: a power of two (few shapes per length), at
        most ``batch_size`` and ``tokens_per_batch`` tokens, no more than needed."""
        rows = max(1, min(self.batch_size, self.tokens_per_batch // length))
        return min(1 << int(math.log2(rows)), power_of_two_at_least(remaining))

    def batches(self, inputs: list[tuple[int, ...]]) -> Iterator[tuple[int, int, list[int]]]:
        """(padded length, rows, input indices) per forward, longest inputs first."""
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        start = 0
        while start < len(order):
            length = length_bucket(len(inputs[order[start]]))
            rows = self.rows_per_batch(length, len(order) - start)
            yield length, rows, order[start : start + rows]
            start += rows

    def score_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "scoring", disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per pair.

        The model reads (context + continuation)[:-1], left-truncated to ``max_length``; pairs
        with the same input (one-token answers to one context) share one row."""
        row_of_input: dict[tuple[int, ...], int] = {}
        inputs: list[tuple[int, ...]] = []
        scored_by_input: list[list[int]] = []  # pair indices scored on each input
        for index, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError("a request's continuation encodes to no tokens: nothing to score.")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}.")
            key = tuple((list(context) + list(continuation))[-(self.max_length + 1):][:-1])
            if key not in row_of_input:
                row_of_input[key] = len(inputs)
                inputs.append(key)
                scored_by_input.append([])
            scored_by_input[row_of_input[key]].append(index)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc=desc, unit="req", disable=disable_tqdm or not self.progress)
        start, tokens_done = time.perf_counter(), 0
        for length, rows, members in self.batches(inputs):
            ids = np.zeros((rows, length), np.int32)
            row_of, position, target, owners = [], [], [], []
            for r, i in enumerate(members):
                n = len(inputs[i])
                ids[r, :n] = inputs[i]
                for index in scored_by_input[i]:
                    continuation = pairs[index][1]
                    c = len(continuation)
                    row_of += [r] * c
                    position += range(n - c, n)
                    target += continuation
                    owners.append((index, c))
            # Scored positions padded to a power of two, or to whole chunks past one chunk.
            step = min(power_of_two_at_least(len(target)), self.chunk)
            pad = -len(target) % step
            h = hidden_states(self.model, jnp.asarray(ids))
            picked = gather_positions(
                h, jnp.asarray(np.array(row_of + [0] * pad, np.int32)), jnp.asarray(np.array(position + [0] * pad, np.int32))
            )
            logp, greedy = score_positions(self.model, picked, jnp.asarray(np.array(target + [0] * pad, np.int32)), step)
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            offset = 0
            for index, c in owners:
                results[index] = (float(logp[offset : offset + c].sum()), bool(greedy[offset : offset + c].all()))
                offset += c
            tokens_done += sum(len(inputs[i]) for i in members)
            self.stats["forwards"] += 1
            self.stats["tokens"] += sum(len(inputs[i]) for i in members)
            self.stats["padded_tokens"] += rows * length
            self.stats["shapes"].add((rows, length))
            bar.update(len(owners))
            bar.set_postfix(len=length, tok_s=f"{tokens_done / max(time.perf_counter() - start, 1e-9):.0f}")
        bar.close()
        self.stats["requests"] += len(pairs)
        self.stats["forward_seconds"] += time.perf_counter() - start
        return results  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        """Forward statistics: requests, forwards, real and padded tokens, compiled shapes."""
        return {**self.stats, "shapes": sorted(self.stats["shapes"])}


# --------------------------------------------------------------------------- running tasks

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


def mean_accuracy(entries: dict[str, dict]) -> tuple[float, float]:
    """Unweighted mean of the tasks' acc, and its standard error (tasks independent)."""
    accs = [e["acc"] for e in entries.values()]
    errors = [e["acc_stderr"] for e in entries.values()]
    mean = float(np.mean(accs))
    stderr = float(math.sqrt(sum(s * s for s in errors)) / len(errors)) if all(isinstance(s, float) for s in errors) else float("nan")
    return mean, stderr


def check_task_request(tasks: str | Sequence[str], task_data_dir: str | Path, limit: int | None) -> list[str]:
    """The task names, once every task's files are read and ``limit`` is valid; a clear
    error otherwise (before anything is scored)."""
    from nlprune.eval.tasks import load_task_docs, parse_task_list

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
    from nlprune.cards import file_sha256
    from nlprune.eval.tasks import load_task_docs, task_manager

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
