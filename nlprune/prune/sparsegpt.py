"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot"), in JAX, float32 throughout.

Optimal Brain Surgeon applied input column by input column (:mod:`nlprune.prune.obs`), with
the mask chosen as the columns are reached. Unstructured prunes, in each block, the
int(ratio * rows * width) entries of smallest w^2 / d^2 over the whole (rows x block) slab,
chosen when the block is reached (so on weights already updated by the earlier blocks); N:M
chooses, per row, the M - N smallest w^2 / d^2 of each group of M columns when its first
column is reached. Weights sharing an input share the factor U, and same-shape ones are
vmapped (k+v, gate+up).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from nlprune.prune import obs
from nlprune.prune.base import MethodOptions, PruneResult, PruningMethod, option, register_method
from nlprune.prune.stats import LayerStats
from nlprune.sparsity import DEFAULT_BLOCKSIZE, PatternError, SparsityPattern, keep_top_k_last_axis


def _block_step(pattern: SparsityPattern, blocksize: int, rows: int, pad: int, n_blocks: int, last_width: int):
    """OBS over one block, its unstructured mask chosen first over the whole slab (the padding
    of a short last block pruned before any real input, so the real inputs keep their own
    int(ratio * rows * width) count), or N:M groups chosen as they are reached."""
    sub = obs.sub_block_width(blocksize, pattern.m if pattern.is_nm else 1)

    def step(b, wt, u, keep, n_real):
        if pattern.is_nm:
            return obs.obs_block(wt, u, keep, sub, n_real, nm=pattern)
        width = wt.shape[0]
        n_prune = jnp.where(  # Python ints: the exact int(ratio * rows * width) of sparsity.py
            b == n_blocks - 1,
            rows * pad + int(rows * last_width * pattern.ratio),
            int(rows * blocksize * pattern.ratio),
        )
        scores = jnp.square(wt / jnp.diag(u)[:, None])
        scores = jnp.where(jnp.arange(width)[:, None] < n_real, scores, -jnp.inf)
        # ranked in (out, in) order, so ties break as in sparsity.py's "block" group
        keep = keep_top_k_last_axis(scores.T.reshape(rows * width), n_prune).reshape(rows, width).T
        return obs.obs_block(wt, u, keep, sub, n_real)

    return step


def _sparsegpt_one(
    weight: jax.Array, u: jax.Array, dead: jax.Array, pattern: SparsityPattern, blocksize: int
) -> tuple[jax.Array, jax.Array]:
    """(mask, pruned weight in float32) of one (out, in) weight."""
    rows, n = weight.shape
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    step = _block_step(pattern, blocksize, rows, pad, n_blocks, n - (n_blocks - 1) * blocksize)
    return obs.obs_sweep(weight, u, dead, blocksize, step)


@functools.partial(jax.jit, static_argnames=("pattern", "blocksize"))
def _sparsegpt_stacked(
    weights: jax.Array, u: jax.Array, dead: jax.Array, pattern: SparsityPattern, blocksize: int
) -> tuple[jax.Array, jax.Array]:
    """vmap over a stack of same-shape weights (batch, out, in) sharing one input."""
    one = functools.partial(_sparsegpt_one, pattern=pattern, blocksize=blocksize)
    return jax.vmap(one, in_axes=(0, None, None))(weights, u, dead)


def stacked_by_shape(weights: Sequence[jax.Array]) -> list[list[int]]:
    """Indices of ``weights`` grouped by shape (each group is one vmapped call)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(weights):
        by_shape.setdefault(tuple(w.shape), []).append(i)
    return list(by_shape.values())


@dataclasses.dataclass(frozen=True)
class SparseGPTOptions(MethodOptions):
    blocksize: int = option(DEFAULT_BLOCKSIZE, "sparsegpt: input columns per block (128)")
    percdamp: float = option(0.01, "sparsegpt: Hessian damping, a fraction of its mean diagonal (0.01)")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"sparsegpt blocksize must be a positive int, got {self.blocksize!r}.")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not self.percdamp > 0:
            raise ValueError(f"sparsegpt percdamp must be > 0 (e.g. 0.01), got {self.percdamp!r}.")


def check_blocks_fit(blocksize: int, pattern: SparsityPattern) -> None:
    """N:M groups must not straddle two of SparseGPT's column blocks."""
    if pattern.is_nm and blocksize % pattern.m:
        raise PatternError(
            f"sparsegpt with {pattern.name} needs --blocksize to be a multiple of {pattern.m} so "
            f"no group of {pattern.m} columns straddles two blocks; got --blocksize {blocksize}."
        )


@register_method
class SparseGPT(PruningMethod):
    name = "sparsegpt"
    Options = SparseGPTOptions
    uses_hessian = True
    updates_weights = True

    @property
    def kept_weights_damping(self) -> float | None:
        return self.options.percdamp

    def refit_blocksize(self) -> int:
        return self.options.blocksize

    def comparison_group(self, pattern: SparsityPattern) -> tuple[str, int]:
        return "block", self.options.blocksize

    def check_pattern(self, pattern: SparsityPattern) -> None:
        check_blocks_fit(self.options.blocksize, pattern)

    def _prune(self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern) -> PruneResult:
        return self._prune_many([weight], stats, pattern)[0]

    def _prune_many(self, weights: Sequence[jax.Array], stats: LayerStats, pattern: SparsityPattern) -> list[PruneResult]:
        self.check_pattern(pattern)
        u, dead, damping, retries = obs.factor(stats, self.options.percdamp)  # once per shared input
        if retries:  # recorded: the Hessian needed more damping than asked
            self.reports.append({"raised_damping": damping, "retries": retries, "shape": tuple(weights[0].shape)})
        results: list[PruneResult | None] = [None] * len(weights)
        for indices in stacked_by_shape(weights):  # e.g. gate+up, k+v: one vmapped call each
            stacked = jnp.stack([weights[i] for i in indices])
            masks, pruned = _sparsegpt_stacked(stacked, u, dead, pattern, self.options.blocksize)
            for j, i in enumerate(indices):
                results[i] = PruneResult(masks[j], pruned[j].astype(weights[i].dtype))
        return results
