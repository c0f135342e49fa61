"""Optimal Brain Surgeon, input column by input column: the machinery SparseGPT and the
least-squares refit share, in JAX, float32 throughout.

With H = X^T X (plus damping) and U the upper Cholesky factor of H^{-1} (d = diag U), pruning
weight w_ij is compensated in the not yet visited columns of row i by

    err_i = (w_ij - q_ij) / d_j,          W[i, j:] -= err_i * U[j, j:]

where q_ij = 0 if pruned, w_ij if kept. Columns are visited in blocks of ``blocksize``: inside
a block each column updates the rest of the block; the columns after the block receive all of
its updates at once (W[:, end:] -= Err @ U[block, end:]), SparseGPT's lazy batch update.
Which entries are kept is the caller's: SparseGPT chooses them block by block
(:mod:`nlprune.prune.sparsegpt`), the refit is given them (:mod:`nlprune.prune.refit`).

Implementation (same arithmetic, arranged for speed and small compiled programs):
  * U comes from one Cholesky factorisation of the axis-reversed H and a triangular
    inverse, both written as recursive 2x2-block matmuls in XLA (no LAPACK call);
  * the sweep works on W^T so that visiting an input column touches contiguous memory;
  * inside a block, columns are visited one at a time within slabs of ~16, each slab then
    updating the rest of the block in one matmul (the same sums, grouped finer);
  * blocks run in a ``fori_loop``; a short last block is padded (zero weights, identity U)
    so that every block has the same shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from nlprune.prune.stats import LayerStats
from nlprune.sparsity import SparsityPattern, sortable_keys

DAMPING_RETRIES = 4  # each retry multiplies the damping by 10
HIGHEST = lax.Precision.HIGHEST
FACTOR_BASE = 192  # below this size the factorisation runs column by column
SUB_BLOCK = 16  # columns visited one at a time before one matmul updates the rest of the block


class HessianFactorError(RuntimeError):
    """The damped Hessian stayed non positive-definite after every damping retry."""


# --------------------------------------------------------------------------------------------
# The factor U of (H + damping)^{-1}
# --------------------------------------------------------------------------------------------


def _small_cholesky_and_inverse(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(L, L^{-1}) of a small SPD matrix, one column / row at a time (NaN if not SPD)."""
    n = h.shape[0]
    rows = jnp.arange(n)
    eye = jnp.eye(n, dtype=h.dtype)

    def cholesky_column(j, lower):  # columns >= j of `lower` are still 0
        v = h[:, j] - jnp.matmul(lower, lower[j], precision=HIGHEST)
        return lower.at[:, j].set(jnp.where(rows >= j, v / jnp.sqrt(v[j]), 0.0))

    lower = lax.fori_loop(0, n, cholesky_column, jnp.zeros_like(h))

    def inverse_row(i, inv):  # forward substitution; rows >= i of `inv` are still 0
        row = (eye[i] - jnp.matmul(lower[i], inv, precision=HIGHEST)) / lower[i, i]
        return inv.at[i].set(row)

    return lower, lax.fori_loop(0, n, inverse_row, jnp.zeros_like(h))


def _cholesky_and_inverse(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(L, L^{-1}) with h = L L^T, recursively on 2x2 blocks so the work is in matmuls.

    Pure XLA on purpose: LAPACK's potrf/trsm run in OpenBLAS's own thread pool, which
    fights XLA's for the cores (BENCHMARKS.md, SparseGPT's factorisation).
    """
    n = h.shape[0]
    if n <= FACTOR_BASE:
        return _small_cholesky_and_inverse(h)
    k = n // 2
    l11, i11 = _cholesky_and_inverse(h[:k, :k])
    l21 = jnp.matmul(h[k:, :k], i11.T, precision=HIGHEST)
    schur = h[k:, k:] - jnp.matmul(l21, l21.T, precision=HIGHEST)
    l22, i22 = _cholesky_and_inverse(schur)
    i21 = -jnp.matmul(i22, jnp.matmul(l21, i11, precision=HIGHEST), precision=HIGHEST)
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
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """(U, dead, damping, ok, retries): U = upper Cholesky factor of (H + damping I)^{-1}.

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
    u, damping, ok, tries = lax.while_loop(failed_and_may_retry, attempt, init)
    return u, dead, damping, ok, tries


class Factor(NamedTuple):
    u: jax.Array  # upper Cholesky factor of (H + damping I)^{-1}
    dead: jax.Array  # inputs never active (their weights are zeroed)
    damping: float  # the damping used
    retries: int  # how often the damping had to be raised 10x (0: percdamp's first try worked)


def factor(stats: LayerStats, percdamp: float) -> Factor:
    """The factor for ``stats``' Hessian; raises HessianFactorError if it cannot factor."""
    u, dead, damping, ok, retries = inverse_hessian_factor(stats.hessian, percdamp)
    if not bool(ok):
        raise HessianFactorError(
            f"the damped Hessian ({stats.in_features} features, {stats.n_tokens} tokens) is "
            f"not positive-definite even with damping {float(damping):.3g} "
            f"(percdamp={percdamp} x 10^{DAMPING_RETRIES}); check the calibration "
            "activations for NaN/inf, or raise percdamp."
        )
    return Factor(u, dead, float(damping), int(retries))


# --------------------------------------------------------------------------------------------
# Visiting columns (the sweep works on W^T, (in, out): visiting input column j of W reads and
# updates row j of W^T, contiguous in memory)
# --------------------------------------------------------------------------------------------


def column_step(i: jax.Array, keep: jax.Array, wt: jax.Array, err: jax.Array, u: jax.Array):
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


def obs_with_mask(wt: jax.Array, u: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """OBS over the inputs of ``wt`` with a known mask: (updated wt, per-input errors)."""

    def visit(i, carry):
        keep_i = lax.dynamic_index_in_dim(keep, i, axis=0, keepdims=False)
        return column_step(i, keep_i, *carry, u)

    return lax.fori_loop(0, wt.shape[0], visit, (wt, jnp.zeros_like(wt)))


def n_m_keep(scores: jax.Array, pattern: SparsityPattern) -> jax.Array:
    """Keep mask of one N:M group laid out (M, out): the N highest scores of each column.

    sparsity.mask_from_scores in this layout (no transposes): rank each entry among its
    group, ties going to the earlier input, and prune the M - N lowest ranks.
    """
    keys = sortable_keys(scores)
    m = pattern.m
    earlier = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[:, :, None]  # [i, j]: j < i
    key_i, key_j = keys[:, None, :], keys[None, :, :]
    lower = (key_j < key_i) | ((key_j == key_i) & earlier)
    return lower.sum(1) >= m - pattern.n


def obs_n_m(wt: jax.Array, u: jax.Array, pattern: SparsityPattern) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OBS choosing an N:M mask group by group: (updated wt, errors, mask^T)."""
    m = pattern.m
    d = jnp.diag(u)

    def visit_group(g, carry):
        wt, err, keep = carry
        start = g * m
        # Chosen when the group's first input is reached: earlier inputs already moved it.
        group_w = lax.dynamic_slice_in_dim(wt, start, m, axis=0)
        group_d = lax.dynamic_slice_in_dim(d, start, m)
        group_keep = n_m_keep(jnp.square(group_w / group_d[:, None]), pattern)

        def visit(c, carry):  # a loop, not unrolled: XLA fuses unrolled steps into slower code
            keep_c = lax.dynamic_index_in_dim(group_keep, c, axis=0, keepdims=False)
            return column_step(start + c, keep_c, *carry, u)

        wt, err = lax.fori_loop(0, m, visit, (wt, err))
        keep = lax.dynamic_update_slice_in_dim(keep, group_keep, start, axis=0)
        return wt, err, keep

    init = (wt, jnp.zeros_like(wt), jnp.ones(wt.shape, bool))
    return lax.fori_loop(0, wt.shape[0] // m, visit_group, init)


def sub_block_width(blocksize: int, group: int = 1) -> int:
    """Width of the input-by-input slabs: a divisor of blocksize, whole groups of ``group``
    columns (N:M), as close to SUB_BLOCK as possible."""
    candidates = [s for s in range(group, blocksize + 1, group) if blocksize % s == 0]
    return min(candidates, key=lambda s: (abs(s - SUB_BLOCK), -s))


def push_errors(wt: jax.Array, err: jax.Array, u: jax.Array, start: jax.Array, end: jax.Array) -> jax.Array:
    """wt[end:] -= u[start:start+k, end:]^T @ err for the k inputs of ``err``, on all of
    wt's rows (static shapes): u's columns are zeroed before ``end``, whose inputs already
    received these errors one by one."""
    u_rows = lax.dynamic_slice_in_dim(u, start, err.shape[0], axis=0)
    later = jnp.arange(u.shape[1])[None, :] >= end
    return wt - jnp.matmul(jnp.where(later, u_rows, 0.0).T, err, precision=HIGHEST)


def push_errors_to_later_blocks(
    wt: jax.Array, err: jax.Array, u: jax.Array, b: jax.Array, n_blocks: int, blocksize: int
) -> jax.Array:
    """SparseGPT's lazy batch update of block b's errors into every later block, one
    block-sized matmul each (one matmul over all inputs would double the work)."""
    u_rows = lax.dynamic_slice_in_dim(u, b * blocksize, blocksize, axis=0)

    def update(c, wt):
        start = c * blocksize
        later = lax.dynamic_slice_in_dim(wt, start, blocksize, axis=0)
        u_later = lax.dynamic_slice_in_dim(u_rows, start, blocksize, axis=1)
        later = later - jnp.matmul(u_later.T, err, precision=HIGHEST)
        return lax.dynamic_update_slice_in_dim(wt, later, start, axis=0)

    return lax.fori_loop(b + 1, n_blocks, update, wt)


def obs_block(
    wt: jax.Array, u: jax.Array, keep: jax.Array, sub: int, n_real: jax.Array,
    nm: SparsityPattern | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """OBS over one block of inputs (wt: (blocksize, out)) with its factor: (wt, err, keep^T).

    Inputs are visited one at a time only inside slabs of ``sub`` (small enough for the
    cache); each slab then updates the rest of the block in one matmul. ``keep`` is the
    block's keep mask (in, out), or with ``nm`` chosen slab by slab per N:M group. Slabs from
    ``n_real`` on are padding and are not visited.
    """

    def visit_slab(s, carry):
        wt, err, keep = carry
        start = s * sub
        slab = lax.dynamic_slice_in_dim(wt, start, sub, axis=0)
        u_slab = lax.dynamic_slice(u, (start, start), (sub, sub))
        if nm is not None:
            slab, slab_err, slab_keep = obs_n_m(slab, u_slab, nm)
            keep = lax.dynamic_update_slice_in_dim(keep, slab_keep, start, axis=0)
        else:
            slab_keep = lax.dynamic_slice_in_dim(keep, start, sub, axis=0)
            slab, slab_err = obs_with_mask(slab, u_slab, slab_keep)
        wt = push_errors(wt, slab_err, u, start, start + sub)
        wt = lax.dynamic_update_slice_in_dim(wt, slab, start, axis=0)
        err = lax.dynamic_update_slice_in_dim(err, slab_err, start, axis=0)
        return wt, err, keep

    n_visit = (n_real + sub - 1) // sub
    return lax.fori_loop(0, n_visit, visit_slab, (wt, jnp.zeros_like(wt), keep))


# (block index, block of W^T, its factor, its keep^T so far, real inputs in it) -> (block, err, keep^T)
BlockStep = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def obs_sweep(
    weight: jax.Array, u: jax.Array, dead: jax.Array, blocksize: int, block_step: BlockStep,
    keep: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(mask, updated weight in float32, exactly 0 off the mask) of one (out, in) weight.

    All blocks run in one ``fori_loop`` (one compiled body, however wide the weight): a
    narrower last block is padded with zero weights and identity factor rows, which receive
    and send no error. ``block_step`` runs OBS over one block (:func:`obs_block`, after
    choosing the block's mask if the caller chooses it); ``keep`` (out, in) is a given mask
    (None: all kept until a block step prunes).
    """
    rows, n = weight.shape
    wt = jnp.where(dead[:, None], 0.0, weight.astype(jnp.float32).T)
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    wt = jnp.pad(wt, ((0, pad), (0, 0)))
    kt = jnp.ones(wt.shape, bool) if keep is None else jnp.pad(keep.T, ((0, pad), (0, 0)), constant_values=True)
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n + pad) >= n).astype(u.dtype)
    last_width = n - (n_blocks - 1) * blocksize

    def visit_block(b, carry):
        wt, kt = carry
        start = b * blocksize
        block = lax.dynamic_slice_in_dim(wt, start, blocksize, axis=0)
        u_block = lax.dynamic_slice(u, (start, start), (blocksize, blocksize))
        k_block = lax.dynamic_slice_in_dim(kt, start, blocksize, axis=0)
        n_real = jnp.where(b == n_blocks - 1, last_width, blocksize)
        block, err, k_block = block_step(b, block, u_block, k_block, n_real)
        wt = push_errors_to_later_blocks(wt, err, u, b, n_blocks, blocksize)
        wt = lax.dynamic_update_slice_in_dim(wt, block, start, axis=0)
        kt = lax.dynamic_update_slice_in_dim(kt, k_block, start, axis=0)
        return wt, kt

    wt, kt = lax.fori_loop(0, n_blocks, visit_block, (wt, kt))
    mask = kt[:n].T
    return mask, jnp.where(mask, wt[:n].T, 0.0)
