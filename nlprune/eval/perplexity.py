"""Perplexity of a model on token windows: exp(total NLL / predicted tokens).

The NLL comes from the evaluation forward (:mod:`nlprune.modeling.inference`): one jitted
decoder layer run for every layer (they share shapes, so it compiles once), then the LM head
fused with the loss, which never holds a window's logits.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nlprune.modeling.inference import batch_token_nll, embed_and_rope, run_layer, token_nll
from nlprune.modeling.llama import DecoderLayer, LlamaForCausalLM


@dataclasses.dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int  # predicted tokens
    windows: int
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def batch_nll(model: LlamaForCausalLM, ids: jax.Array) -> jax.Array:
    """Summed next-token NLL of a batch of windows (batch, seq)."""
    return jnp.sum(batch_token_nll(model, ids))


def _checked(windows: np.ndarray, vocab: int) -> np.ndarray:
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (nsamples, seqlen>=2), got shape {windows.shape}")
    if windows.min() < 0 or windows.max() >= vocab:
        raise ValueError(
            f"token ids range over [{windows.min()}, {windows.max()}] but the model's vocabulary "
            f"has {vocab} entries: the windows were made with another tokenizer."
        )
    return windows


def _batches(windows: np.ndarray, batch_size: int):
    """(batch, real rows) in order; a short last batch is padded with copies of its first
    window so it reuses the compiled batch shape (the copies' NLL is dropped)."""
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        rows = len(batch)
        if rows < batch_size and len(windows) > batch_size:
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - rows, axis=0)])
        yield jnp.asarray(batch, dtype=jnp.int32), rows


def perplexity(
    model: LlamaForCausalLM,
    windows: np.ndarray,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity over non-overlapping windows (nsamples, seqlen) of token ids."""
    windows = _checked(windows, model.config.vocab_size)
    start = time.perf_counter()
    total, count = 0.0, 0
    bar = tqdm(total=len(windows), desc=desc, unit="win", disable=not progress)
    for batch, rows in _batches(windows, batch_size):
        nll = batch_token_nll(model, batch)
        total += float(jnp.sum(nll[:rows]))
        count += rows * (windows.shape[1] - 1)
        bar.update(rows)
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    bar.close()
    return PerplexityResult(
        perplexity=math.exp(total / count),
        nll_sum=total,
        tokens=count,
        windows=len(windows),
        seconds=time.perf_counter() - start,
    )


def perplexity_streamed(
    shell: LlamaForCausalLM,
    read_layer: Callable[[int], DecoderLayer],
    windows: np.ndarray,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """:func:`perplexity` holding one decoder layer at a time: ``shell`` is the model without
    its layers (embeddings, final norm, head), layer i comes from ``read_layer(i)``. Every
    window's hidden states are kept between layers; each batch goes through the same jitted
    steps as in :func:`perplexity`, so the result is the same to the bit."""
    windows = _checked(windows, shell.config.vocab_size)
    start = time.perf_counter()
    batches = list(_batches(windows, batch_size))
    states = [embed_and_rope(shell, ids) for ids, _ in batches]
    cos, sin = states[0][1], states[0][2]
    hidden = [h for h, _, _ in states]
    del states
    layers = shell.config.num_hidden_layers
    bar = tqdm(range(layers), desc=desc, unit="layer", disable=not progress)
    for i in bar:
        layer = read_layer(i)
        hidden = [run_layer(layer, h, cos, sin) for h in hidden]
        del layer
    total, count = 0.0, 0
    for (ids, rows), h in zip(batches, hidden, strict=True):
        total += float(jnp.sum(token_nll(shell, h, ids)[:rows]))
        count += rows * (windows.shape[1] - 1)
    bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    bar.close()
    return PerplexityResult(math.exp(total / count), total, count, len(windows), time.perf_counter() - start)
