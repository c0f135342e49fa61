"""Perplexity of a model on token windows: exp(total NLL / predicted tokens).

The NLL comes from the evaluation forward (:mod:`nlprune.modeling.inference`): one jitted
decoder layer run for every layer (they share shapes, so it compiles once), then the LM head
fused with the loss, which never holds a window's logits.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nlprune.modeling.inference import batch_token_nll
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


def batch_nll(model: LlamaForCausalLM, ids: jax.Array) -> jax.Array:
    """Summed next-token NLL of a batch of windows (batch, seq)."""
    return jnp.sum(batch_token_nll(model, ids))


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
        batch = windows[i : i + batch_size]
        rows = len(batch)
        if rows < batch_size and len(windows) > batch_size:
            # Pad a short last batch with copies of its first window so it reuses the
            # compiled batch shape; the copies' NLL is dropped.
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - rows, axis=0)])
        nll = batch_token_nll(model, jnp.asarray(batch, dtype=jnp.int32))
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
