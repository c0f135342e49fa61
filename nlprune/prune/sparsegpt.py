"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot"), in JAX, float32 throughout.

Optimal Brain Surgeon applied input column by input column: with H = X^T X (plus damping) and
U the upper Cholesky factor of H^{-1} (d = diag U), pruning weight w_ij is compensated in the
not yet visited columns of row i by

    err_i = (w_ij - q_ij) / d_j,          W[i, j:] -= err_i * U[j, j:]

where q_ij = 0 if pruned, w_ij if kept. Columns are visited in blocks of ``blocksize``: inside
a block each column updates the rest of the block; the columns after the block receive all of
its updates at once (W[:, end:] -= Err @ U[block, end:]), SparseGPT's lazy batch update.

Mask selection: unstructured prunes, in each block, the int(ratio * rows * width) entries of
smallest w^2 / d^2 over the whole (rows x block) slab, chosen when the block is reached (so
on weights already updated by the earlier blocks); N:M chooses, per row, the M - N smallest
w^2 / d^2 of each group of M columns when its first column is reached.

Implementation (same arithmetic, arranged for speed and small compiled programs):
  * U comes from one Cholesky factorisation of the axis-reversed H and a triangular
    inverse, both written as recursive 2x2-block matmuls in XLA (no LAPACK call);
  * the core works on W^T so that visiting an input column touches contiguous memory;
  * inside a block, columns are visited one at a time within slabs of ~16, each slab then
    updating the rest of the block in one matmul (the same sums, grouped finer);
  * blocks run in a ``fori_loop``; a short last block is padded (zero weights, identity U)
    so that every block has the same shape;
  * weights sharing an input share U, and same-shape ones are vmapped (k+v, gate+up).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from nlprune.prune.base import LayerStats, PruneResult, PruningMethod, register_method
from nlprune.prune.patterns import (
    DEFAULT_BLOCKSIZE,
    PatternError,
    SparsityPattern,
    _keep_top_k_last_axis,
    _sortable_keys,
)

DAMPING_RETRIES = 4  # each retry multiplies the damping by 10
_HIGHEST = lax.Precision.HIGHEST


class HessianFactorError(RuntimeError):
    """The damped Hessian stayed non positive-definite after every damping retry."""


_FACTOR_BASE = 192  # below this size the factorisation runs column by column
_SUB_BLOCK = 16  # columns visited one at a time before one matmul updates the rest of the block


def _small_cholesky_and_inverse(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(L, L^{-1}) of a small SPD matrix, one column / row at a time (NaN if not SPD)."""
    n = h.shape[0]
    rows = jnp.arange(n)
    eye = jnp.eye(n, dtype=h.dtype)

    def cholesky_column(j, lower):  # columns >= j of `lower` are still 0
        v = h[:, j] - jnp.matmul(lower, lower[j], precision=_HIGHEST)
        return lower.at[:, j].set(jnp.where(rows >= j, v / jnp.sqrt(v[j]), 0.0))

    lower = lax.fori_loop(0, n, cholesky_column, jnp.zeros_like(h))

    def inverse_row(i, inv):  # forward substitution; rows >= i of `inv` are still 0
        row = (eye[i] - jnp.matmul(lower[i], inv, precision=_HIGHEST)) / lower[i, i]
        return inv.at[i].set(row)

    return lower, lax.fori_loop(0, n, inverse_row, jnp.zeros_like(h))


def _cholesky_and_inverse(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(L, L^{-1}) with h = L L^T, recursively on 2x2 blocks so the work is in matmuls.

    Pure XLA on purpose: LAPACK's potrf/trsm run in OpenBLAS's own thread pool, which
    fights XLA's for the cores and was 5-20x slower on a 2-core machine.
    """
    n = h.shape[0]
    if n <= _FACTOR_BASE:
        return _small_cholesky_and_inverse(h)
    k = n // 2
    l11, i11 = _cholesky_and_inverse(h[:k, :k])
    l21 = jnp.matmul(h[k:, :k], i11.T, precision=_HIGHEST)
    schur = h[k:, k:] - jnp.matmul(l21, l21.T, precision=_HIGHEST)
    l22, i22 = _cholesky_and_inverse(schur)
    i21 = -jnp.matmul(i22, jnp.matmul(l21, i11, precision=_HIGHEST), precision=_HIGHEST)
    zeros = jnp.zeros((k, n - k), h.dtype)
    return jnp.block([[l11, zeros], [l21, l22]]), jnp.block([[i11, zeros], [i21, i22]])


def upper_cholesky_of_inverse(h: jax.Array) -> jax.Array:
    """Upper-triangular U with U^T U = h^{-1}, without forming h^{-1}.

    If J reverses the axes and J h J = L L^T, then h = R R^T with R = J L J upper triangular,
    so h^{-1} = (R^{-1})^T R^{-1}: U = R^{-1} = J L^{-1} J (positive diagonal, hence the
    unique upper Cholesky factor of h^{-1}). NaN (or inf) when h is not positive-definite.
    """
    _, lower_inv = _cholesky_and_inverse(h[::-1, ::-1])
    return jnp.triu(lower_inv[::-1, ::-1])  # exact zeros below: the column step relies on it


@jax.jit
def inverse_hessian_factor(
    hessian: jax.Array, percdamp: float | jax.Array = 0.01
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(U, dead, damping, ok): U = upper Cholesky factor of (H + damping I)^{-1}.

    Dead inputs (H_jj = 0, never active) get H_jj = 1 (their weights are zeroed by the
    caller). damping = percdamp * mean(diag H), times 10 per retry while the factorisation
    fails (NaN), at most DAMPING_RETRIES times; ``ok`` says whether it finally succeeded.
    """
    h = hessian.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    base = percdamp * jnp.mean(jnp.diag(h))

    def failed_and_may_retry(state):
        _, _, ok, tries = state
        return ~ok & (tries < DAMPING_RETRIES)

    def attempt(state):  # one traced copy of the factorisation, first try included
        tries = state[3] + 1
        damping = base * 10.0**tries
        u = upper_cholesky_of_inverse(h + damping * eye)
        return u, damping, jnp.all(jnp.isfinite(u)), tries

    init = (jnp.zeros_like(h), base, jnp.array(False), jnp.array(-1))
    u, damping, ok, _ = lax.while_loop(failed_and_may_retry, attempt, init)
    return u, dead, damping, ok


# The core works on W^T, (in, out): visiting input column j of W then reads and updates
# row j of W^T, contiguous in memory, which made the column-by-column loop 2x faster on CPU.


def _column_step(i: jax.Array, keep: jax.Array, wt: jax.Array, err: jax.Array, u: jax.Array):
    """Visit input i of a slab (wt: (inputs, out)): zero its pruned weights, push the error.

    u is the slab's upper-triangular factor, so u[i, :i] = 0 and updating every input is
    the same as updating inputs i..end; input i itself becomes q up to rounding (the caller
    multiplies by the mask at the end, so pruned weights are exactly 0).
    """
    w_i = lax.dynamic_index_in_dim(wt, i, axis=0, keepdims=False)
    e = jnp.where(keep, 0.0, w_i) / u[i, i]
    wt = wt - u[i][:, None] * e[None, :]
    err = lax.dynamic_update_index_in_dim(err, e, i, axis=0)
    return wt, err


def _obs_with_mask(wt: jax.Array, u: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """OBS over the inputs of ``wt`` with a known mask: (updated wt, per-input errors)."""

    def visit(i, carry):
        keep_i = lax.dynamic_index_in_dim(keep, i, axis=0, keepdims=False)
        return _column_step(i, keep_i, *carry, u)

    return lax.fori_loop(0, wt.shape[0], visit, (wt, jnp.zeros_like(wt)))


def _n_m_keep(scores: jax.Array, pattern: SparsityPattern) -> jax.Array:
    """Keep mask of one N:M group laid out (M, out): the N highest scores of each column.

    patterns.mask_from_scores in this layout (no transposes): rank each entry among its
    group, ties going to the earlier input, and prune the M - N lowest ranks.
    """
    keys = _sortable_keys(scores)
    m = pattern.m
    earlier = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[:, :, None]  # [i, j]: j < i
    key_i, key_j = keys[:, None, :], keys[None, :, :]
    lower = (key_j < key_i) | ((key_j == key_i) & earlier)
    return lower.sum(1) >= m - pattern.n


def _obs_n_m(
    wt: jax.Array, u: jax.Array, pattern: SparsityPattern
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OBS choosing an N:M mask group by group: (updated wt, errors, mask^T)."""
    m = pattern.m
    d = jnp.diag(u)

    def visit_group(g, carry):
        wt, err, keep = carry
        start = g * m
        # Chosen when the group's first input is reached: earlier inputs already moved it.
        group_w = lax.dynamic_slice_in_dim(wt, start, m, axis=0)
        group_d = lax.dynamic_slice_in_dim(d, start, m)
        group_keep = _n_m_keep(jnp.square(group_w / group_d[:, None]), pattern)

        def visit(c, carry):  # a loop, not unrolled: XLA fused unrolled steps 10x slower
            keep_c = lax.dynamic_index_in_dim(group_keep, c, axis=0, keepdims=False)
            return _column_step(start + c, keep_c, *carry, u)

        wt, err = lax.fori_loop(0, m, visit, (wt, err))
        keep = lax.dynamic_update_slice_in_dim(keep, group_keep, start, axis=0)
        return wt, err, keep

    init = (wt, jnp.zeros_like(wt), jnp.ones(wt.shape, bool))
    return lax.fori_loop(0, wt.shape[0] // m, visit_group, init)


def _sub_block_width(pattern: SparsityPattern, blocksize: int) -> int:
    """Width of the input-by-input slabs: a divisor of blocksize, whole N:M groups, ~_SUB_BLOCK."""
    group = pattern.m if pattern.is_nm else 1
    candidates = [s for s in range(group, blocksize + 1, group) if blocksize % s == 0]
    return min(candidates, key=lambda s: (abs(s - _SUB_BLOCK), -s))


def _push_errors(
    wt: jax.Array, err: jax.Array, u: jax.Array, start: jax.Array, end: jax.Array
) -> jax.Array:
    """wt[end:] -= u[start:start+k, end:]^T @ err for the k inputs of ``err``, on all of
    wt's rows (static shapes): u's columns are zeroed before ``end``, whose inputs already
    received these errors one by one."""
    u_rows = lax.dynamic_slice_in_dim(u, start, err.shape[0], axis=0)
    later = jnp.arange(u.shape[1])[None, :] >= end
    return wt - jnp.matmul(jnp.where(later, u_rows, 0.0).T, err, precision=_HIGHEST)


def _push_errors_to_later_blocks(
    wt: jax.Array, err: jax.Array, u: jax.Array, b: jax.Array, n_blocks: int, blocksize: int
) -> jax.Array:
    """SparseGPT's lazy batch update of block b's errors into every later block, one
    block-sized matmul each (one matmul over all inputs would double the work)."""
    u_rows = lax.dynamic_slice_in_dim(u, b * blocksize, blocksize, axis=0)

    def update(c, wt):
        start = c * blocksize
        later = lax.dynamic_slice_in_dim(wt, start, blocksize, axis=0)
        u_later = lax.dynamic_slice_in_dim(u_rows, start, blocksize, axis=1)
        later = later - jnp.matmul(u_later.T, err, precision=_HIGHEST)
        return lax.dynamic_update_slice_in_dim(wt, later, start, axis=0)

    return lax.fori_loop(b + 1, n_blocks, update, wt)


def _prune_block(
    wt: jax.Array,
    u: jax.Array,
    pattern: SparsityPattern,
    n_real: jax.Array,
    n_prune: jax.Array,
    sub: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OBS over one block of inputs (wt: (blocksize, out)) with its factor: (wt, err, keep^T).

    Inputs are visited one at a time only inside slabs of ``sub`` (small enough for the
    cache); each slab then updates the rest of the block in one matmul. Inputs from
    ``n_real`` on are padding: never visited, and (unstructured) pruned before any real one,
    ``n_prune`` counting them; the real weights of smallest w^2 / d^2 make up the rest.
    """
    width, rows = wt.shape
    if pattern.is_nm:
        keep = jnp.ones(wt.shape, bool)
    else:  # the whole slab competes, on the weights as updated by the earlier blocks
        scores = jnp.square(wt / jnp.diag(u)[:, None])
        scores = jnp.where(jnp.arange(width)[:, None] < n_real, scores, -jnp.inf)
        # ranked in (out, in) order, so ties break as in patterns.py's "block" group
        keep = _keep_top_k_last_axis(scores.T.reshape(rows * width), n_prune)
        keep = keep.reshape(rows, width).T

    def visit_slab(s, carry):
        wt, err, keep = carry
        start = s * sub
        slab = lax.dynamic_slice_in_dim(wt, start, sub, axis=0)
        u_slab = lax.dynamic_slice(u, (start, start), (sub, sub))
        if pattern.is_nm:
            slab, slab_err, slab_keep = _obs_n_m(slab, u_slab, pattern)
            keep = lax.dynamic_update_slice_in_dim(keep, slab_keep, start, axis=0)
        else:
            slab_keep = lax.dynamic_slice_in_dim(keep, start, sub, axis=0)
            slab, slab_err = _obs_with_mask(slab, u_slab, slab_keep)
        wt = _push_errors(wt, slab_err, u, start, start + sub)
        wt = lax.dynamic_update_slice_in_dim(wt, slab, start, axis=0)
        err = lax.dynamic_update_slice_in_dim(err, slab_err, start, axis=0)
        return wt, err, keep

    n_visit = (n_real + sub - 1) // sub
    return lax.fori_loop(0, n_visit, visit_slab, (wt, jnp.zeros_like(wt), keep))


def _sparsegpt_one(
    weight: jax.Array, u: jax.Array, dead: jax.Array, pattern: SparsityPattern, blocksize: int
) -> tuple[jax.Array, jax.Array]:
    """(mask, pruned weight in float32) of one (out, in) weight.

    All blocks run in one ``fori_loop`` (one compiled body, however wide the weight): a
    narrower last block is padded with zero weights and identity factor rows, which receive
    and send no error, and its padding is pruned first so the real inputs keep their own
    int(ratio * rows * width) count.
    """
    rows, n = weight.shape
    wt = jnp.where(dead[:, None], 0.0, weight.astype(jnp.float32).T)
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    wt = jnp.pad(wt, ((0, pad), (0, 0)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n + pad) >= n).astype(u.dtype)
    sub = _sub_block_width(pattern, blocksize)
    last_width = n - (n_blocks - 1) * blocksize

    def visit_block(b, carry):
        wt, keep = carry
        start = b * blocksize
        last = b == n_blocks - 1
        block = lax.dynamic_slice_in_dim(wt, start, blocksize, axis=0)
        u_block = lax.dynamic_slice(u, (start, start), (blocksize, blocksize))
        n_real = jnp.where(last, last_width, blocksize)
        n_prune = jnp.where(  # Python ints: the exact int(ratio * rows * width) of patterns.py
            last,
            rows * pad + int(rows * last_width * pattern.ratio),
            int(rows * blocksize * pattern.ratio),
        )
        block, err, block_keep = _prune_block(block, u_block, pattern, n_real, n_prune, sub)
        wt = _push_errors_to_later_blocks(wt, err, u, b, n_blocks, blocksize)
        wt = lax.dynamic_update_slice_in_dim(wt, block, start, axis=0)
        keep = lax.dynamic_update_slice_in_dim(keep, block_keep, start, axis=0)
        return wt, keep

    wt, keep = lax.fori_loop(0, n_blocks, visit_block, (wt, jnp.ones(wt.shape, bool)))
    mask = keep[:n].T
    return mask, jnp.where(mask, wt[:n].T, 0.0)


@functools.partial(jax.jit, static_argnames=("pattern", "blocksize"))
def _sparsegpt_stacked(
    weights: jax.Array, u: jax.Array, dead: jax.Array, pattern: SparsityPattern, blocksize: int
) -> tuple[jax.Array, jax.Array]:
    """vmap over a stack of same-shape weights (batch, out, in) sharing one input."""
    one = functools.partial(_sparsegpt_one, pattern=pattern, blocksize=blocksize)
    return jax.vmap(one, in_axes=(0, None, None))(weights, u, dead)


@register_method
class SparseGPT(PruningMethod):
    name = "sparsegpt"
    needs_hessian = True
    default_options = {"blocksize": DEFAULT_BLOCKSIZE, "percdamp": 0.01}

    def comparison_group(self, pattern: SparsityPattern, **options: Any) -> tuple[str, int]:
        return "block", options["blocksize"]

    def _prune(
        self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern, **options: Any
    ) -> PruneResult:
        return self._prune_many([weight], stats, pattern, **options)[0]

    def _prune_many(
        self,
        weights: Sequence[jax.Array],
        stats: LayerStats,
        pattern: SparsityPattern,
        *,
        blocksize: int,
        percdamp: float,
    ) -> list[PruneResult]:
        _check_options(pattern, blocksize, percdamp)
        u, dead = self.factor(stats, percdamp)  # once per shared input
        results: list[PruneResult | None] = [None] * len(weights)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, w in enumerate(weights):
            by_shape.setdefault(tuple(w.shape), []).append(i)
        for indices in by_shape.values():  # e.g. gate+up, k+v: one vmapped call each
            stacked = jnp.stack([weights[i] for i in indices])
            masks, pruned = _sparsegpt_stacked(stacked, u, dead, pattern, blocksize)
            for j, i in enumerate(indices):
                results[i] = PruneResult(masks[j], pruned[j].astype(weights[i].dtype))
        return results

    @staticmethod
    def factor(stats: LayerStats, percdamp: float) -> tuple[jax.Array, jax.Array]:
        """(U, dead) for ``stats``' Hessian, raising HessianFactorError if it cannot factor."""
        u, dead, damping, ok = inverse_hessian_factor(stats.hessian, percdamp)
        if not bool(ok):
            raise HessianFactorError(
                f"the damped Hessian ({stats.in_features} features, {stats.n_tokens} tokens) is "
                f"not positive-definite even with damping {float(damping):.3g} "
                f"(percdamp={percdamp} x 10^{DAMPING_RETRIES}); check the calibration "
                "activations for NaN/inf, or raise percdamp."
            )
        return u, dead


def _check_options(pattern: SparsityPattern, blocksize: int, percdamp: float) -> None:
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"sparsegpt blocksize must be a positive int, got {blocksize!r}.")
    if pattern.is_nm and blocksize % pattern.m:
        raise PatternError(
            f"sparsegpt with {pattern.name} needs blocksize to be a multiple of {pattern.m} so "
            f"no group of {pattern.m} columns straddles two blocks; got blocksize={blocksize}."
        )
    if not percdamp > 0:
        raise ValueError(f"sparsegpt percdamp must be > 0 (e.g. 0.01), got {percdamp!r}.")
