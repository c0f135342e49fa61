"""Magnitude pruning: keep the weights of largest |W|; needs no calibration data."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from nlprune.prune.base import MethodOptions, PruneResult, PruningMethod, option, register_method
from nlprune.prune.stats import LayerStats
from nlprune.sparsity import DEFAULT_BLOCKSIZE, SparsityPattern, mask_from_scores

GROUPS = ("row", "matrix")


@functools.partial(jax.jit, static_argnames=("pattern", "group"))
def magnitude_prune(weight: jax.Array, pattern: SparsityPattern, group: str = "row") -> PruneResult:
    """Score |W_ij|; unstructured compares within each ``row`` or the whole ``matrix``."""
    mask = mask_from_scores(jnp.abs(weight), pattern, group)
    return PruneResult(mask, jnp.where(mask, weight, 0).astype(weight.dtype))


@dataclasses.dataclass(frozen=True)
class MagnitudeOptions(MethodOptions):
    group: str = option(
        "row", "magnitude: comparison group: each output row (default), or the whole matrix (what Wanda's "
        "reference code does)", choices=GROUPS,
    )

    def validate(self) -> None:
        super().validate()
        if self.group not in GROUPS:
            raise ValueError(f"magnitude compares per 'row' or 'matrix', not {self.group!r} (--group).")


@register_method
class Magnitude(PruningMethod):
    name = "magnitude"
    Options = MagnitudeOptions

    def comparison_group(self, pattern: SparsityPattern) -> tuple[str, int]:
        return self.options.group, DEFAULT_BLOCKSIZE

    def _prune(self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern) -> PruneResult:
        return magnitude_prune(weight, pattern, self.options.group)
