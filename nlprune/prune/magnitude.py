"""Magnitude pruning: keep the weights of largest |W|; needs no calibration data."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from nlprune.prune.base import LayerStats, PruneResult, PruningMethod, register_method
from nlprune.prune.patterns import DEFAULT_BLOCKSIZE, SparsityPattern, mask_from_scores


@functools.partial(jax.jit, static_argnames=("pattern", "group"))
def magnitude_prune(weight: jax.Array, pattern: SparsityPattern, group: str = "row") -> PruneResult:
    """Score |W_ij|; unstructured compares within each ``row`` or the whole ``matrix``."""
    mask = mask_from_scores(jnp.abs(weight), pattern, group)
    return PruneResult(mask, jnp.where(mask, weight, 0).astype(weight.dtype))


@register_method
class Magnitude(PruningMethod):
    name = "magnitude"
    needs_hessian = False
    default_options = {"group": "row"}  # "row" or "matrix"

    def comparison_group(self, pattern: SparsityPattern, **options: Any) -> tuple[str, int]:
        return options["group"], DEFAULT_BLOCKSIZE

    def _prune(
        self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern, *, group: str
    ) -> PruneResult:
        if group not in ("row", "matrix"):
            raise ValueError(f"magnitude compares per 'row' or 'matrix', not {group!r}.")
        return magnitude_prune(weight, pattern, group)
