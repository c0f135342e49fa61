"""Perplexity of a model on token windows: exp(total NLL / predicted tokens).

The forward runs layer by layer with one jitted, batch-vmapped decoder layer (every layer has
the same shapes, so it compiles once), and the loss is computed in chunks of positions so the
(tokens x vocab) logits are never materialised all at once.
"""

from __future__ import annotations

import dataclasses
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nlprune.modeling.forward import hidden_states
from nlprune.modeling.llama import LlamaForCausalLM


@dataclasses.dataclass
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int  # predicted tokens
    windows: int
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@eqx.filter_jit
def window_nll(model: LlamaForCausalLM, h: jax.Array, ids: jax.Array, chunk: int = 256) -> jax.Array:
    """Summed next-token NLL of a batch, from the last hidden states h (batch, seq, hidden).

    Positions are processed ``chunk`` at a time so the logits held at once are
    (batch, chunk, vocab), not (batch, seq, vocab).
    """
    h = model.final_hidden(h)[:, :-1]
    targets = ids[:, 1:]
    b, n, d = h.shape
    pad = (-n) % chunk
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).transpose(1, 0, 2, 3)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk).transpose(1, 0, 2)
    valid = (jnp.arange(n + pad) < n).reshape(-1, chunk)
    w = model.head_weight()

    def chunk_nll(args):
        hc, tc, vc = args
        logits = hc @ w.T
        if model.lm_head is not None and model.lm_head.bias is not None:
            logits = logits + model.lm_head.bias
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return jnp.sum((logz - picked) * vc[None, :])

    return jnp.sum(jax.lax.map(chunk_nll, (h, targets, valid)))


def batch_nll(model: LlamaForCausalLM, ids: jax.Array) -> jax.Array:
    return window_nll(model, hidden_states(model, ids), ids)


def perplexity(
    model: LlamaForCausalLM,
    windows: np.ndarray,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity over non-overlapping windows (nsamples, seqlen) of token ids."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (nsamples, seqlen>=2), got shape {windows.shape}")
    vocab = model.config.vocab_size
    if windows.min() < 0 or windows.max() >= vocab:
        raise ValueError(
            f"token ids range over [{windows.min()}, {windows.max()}] but the model's vocabulary "
            f"has {vocab} entries: the windows were made with another tokenizer."
        )
    start = time.perf_counter()
    total, count = 0.0, 0
    bar = tqdm(total=len(windows), desc=desc, unit="win", disable=not progress)
    for i in range(0, len(windows), batch_size):
        batch = jnp.asarray(windows[i : i + batch_size], dtype=jnp.int32)
        total += float(batch_nll(model, batch))
        count += batch.shape[0] * (batch.shape[1] - 1)
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    bar.close()
    return PerplexityResult(
        perplexity=math.exp(total / count),
        nll_sum=total,
        tokens=count,
        windows=len(windows),
        seconds=time.perf_counter() - start,
    )
