"""Zero-shot task accuracy through lm-evaluation-harness, on nlprune's Equinox model.

``NlpruneLM`` wraps a ``LlamaForCausalLM`` and its tokenizer as an ``lm_eval.api.model.LM``,
so a pruned model is scored where it is, without exporting it. Requests are tokenised as
lm-eval's ``hf`` model tokenises them, sorted by length, right-padded to a few bucketed
lengths (XLA compiles one shape per bucket; causal attention means the padding changes
nothing before it) and run through one forward per batch; the log-softmax is taken only at
the continuation positions, so the (batch, seq, vocab) logits never exist.

``nlprune.eval.tasks.runner.run_tasks`` scores the local tasks with it through lm-eval's own
evaluator and metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
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
        self.prefix_text: str | None = None  # the prefix token as text, decoded once
        vocab = model.config.vocab_size
        self.chunk = max(1, 1 << int(math.log2(max(1, LOGITS_PER_CHUNK // vocab))))
        self.stats: dict[str, Any] = {
            "requests": 0, "forwards": 0, "tokens": 0, "padded_tokens": 0, "forward_seconds": 0.0, "shapes": set(),
            "new_shape_seconds": 0.0, "new_shape_padded_tokens": 0, "seen_shape_seconds": 0.0, "seen_shape_padded_tokens": 0,
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
        if self.prefix_text is None:
            self.prefix_text = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and text.startswith(self.prefix_text):
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

    def unique_inputs(
        self, pairs: Sequence[tuple[list[int], list[int]]]
    ) -> tuple[list[tuple[int, ...]], list[list[int]]]:
        """The model's inputs, (context + continuation)[:-1] left-truncated to ``max_length``,
        without repeats (one-token answers to one context share a row), and the pairs scored
        on each."""
        row_of_input: dict[tuple[int, ...], int] = {}
        inputs: list[tuple[int, ...]] = []
        scored_by_input: list[list[int]] = []
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
        return inputs, scored_by_input

    def score_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "scoring", disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy one) per pair."""
        inputs, scored_by_input = self.unique_inputs(pairs)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc=desc, unit="req", disable=disable_tqdm or not self.progress)
        start, tokens_done = time.perf_counter(), 0
        for length, rows, members in self.batches(inputs):
            batch_start = time.perf_counter()
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
            batch_tokens = sum(len(inputs[i]) for i in members)
            tokens_done += batch_tokens
            # A batch of a new shape pays XLA's compilation; the others are the forward alone.
            kind = "seen_shape" if (rows, length) in self.stats["shapes"] else "new_shape"
            self.stats[f"{kind}_seconds"] += time.perf_counter() - batch_start
            self.stats[f"{kind}_padded_tokens"] += rows * length
            self.stats["forwards"] += 1
            self.stats["tokens"] += batch_tokens
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
