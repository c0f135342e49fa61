"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for LLMs").

Score S_ij = |W_ij| * ||X_j||_2: a weight matters in proportion to its size and to the norm
of the input feature it multiplies. Weights compete within their output row, no update.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nlprune.prune.base import PruneResult, PruningMethod, register_method
from nlprune.prune.stats import LayerStats
from nlprune.sparsity import SparsityPattern, mask_from_scores


@functools.partial(jax.jit, static_argnames=("pattern",))
def wanda_prune(weight: jax.Array, sq_norms: jax.Array, pattern: SparsityPattern) -> PruneResult:
    """Prune ``weight`` (out, in) with input feature norms^2 ``sq_norms`` (in,)."""
    scores = jnp.abs(weight.astype(jnp.float32)) * jnp.sqrt(sq_norms)[None, :]
    mask = mask_from_scores(scores, pattern, "row")
    return PruneResult(mask, jnp.where(mask, weight, 0).astype(weight.dtype))


def wanda_scores(weight: jax.Array, norms: jax.Array) -> jax.Array:
    """|W_ij| ||x_j|| over each row's median: a ranking whose top-k per row is Wanda's mask and
    whose scale is the same in every row (a starting point for score-based searches)."""
    s = jnp.abs(weight.astype(jnp.float32)) * norms[None, :]
    return s / jnp.maximum(jnp.median(s, axis=1, keepdims=True), jnp.finfo(jnp.float32).tiny)


@register_method
class Wanda(PruningMethod):
    name = "wanda"

    def _prune(self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern) -> PruneResult:
        return wanda_prune(weight, stats.sq_norms, pattern)
