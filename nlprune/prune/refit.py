"""Least-squares re-fitting of the kept weights once a mask is fixed (SparseGPT's update).

For a linear with calibration inputs X (tokens, in), H = X^T X (damped as SparseGPT damps it),
dense weight W0 and a fixed mask, SparseGPT's column-by-column Optimal Brain Surgeon update
with that mask approximately solves, per output row i,

    min_w ||X w - X w0_i||^2    subject to  w_j = 0 where the mask is 0,

pushing each pruned weight's error onto the inputs not yet visited (the same arithmetic as
:mod:`nlprune.prune.sparsegpt`, blocked and lazily updated, but the mask is given instead of
chosen). ``target`` replaces X w0 by another linear target X w* (see :func:`corrected_target`).

:func:`corrected_target`: when the linear's input X_p comes from already-pruned sublayers and
the dense model would have fed it X_d on the same hidden state, the weight whose output X_p w*
is closest to the *dense* output X_d w0 is w*^T = (X_p^T X_p)^{-1} X_p^T X_d w0^T; re-fitting
towards w* (same H) minimises ||X_p w - X_d w0|| on the mask (up to a constant:
||X_p w - X_d w0||^2 = ||X_p (w - w*)||^2 + ||X_p w* - X_d w0||^2), correcting the upstream
error instead of reproducing it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from nlprune.prune.base import LayerStats, PruneResult
from nlprune.prune.patterns import DEFAULT_BLOCKSIZE
from nlprune.prune.sparsegpt import (
    _HIGHEST,
    SparseGPT,
    _obs_with_mask,
    _push_errors,
    _push_errors_to_later_blocks,
)

_SUB = 16  # inputs visited one at a time before one matmul updates the rest of the block


def _refit_block(wt: jax.Array, u: jax.Array, keep: jax.Array, sub: int) -> tuple[jax.Array, jax.Array]:
    """OBS over one block (wt: (blocksize, out)) with a given keep mask: (wt, errors)."""

    def visit_slab(s, carry):
        wt, err = carry
        start = s * sub
        slab = lax.dynamic_slice_in_dim(wt, start, sub, axis=0)
        u_slab = lax.dynamic_slice(u, (start, start), (sub, sub))
        keep_slab = lax.dynamic_slice_in_dim(keep, start, sub, axis=0)
        slab, slab_err = _obs_with_mask(slab, u_slab, keep_slab)
        wt = _push_errors(wt, slab_err, u, start, start + sub)
        wt = lax.dynamic_update_slice_in_dim(wt, slab, start, axis=0)
        err = lax.dynamic_update_slice_in_dim(err, slab_err, start, axis=0)
        return wt, err

    return lax.fori_loop(0, wt.shape[0] // sub, visit_slab, (wt, jnp.zeros_like(wt)))


def _refit_one(weight, keep, u, dead, blocksize: int) -> jax.Array:
    """Re-fitted weight (float32, exactly 0 off the mask) of one (out, in) weight."""
    rows, n = weight.shape
    wt = jnp.where(dead[:, None], 0.0, weight.astype(jnp.float32).T)
    kt = keep.T
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    wt = jnp.pad(wt, ((0, pad), (0, 0)))
    kt = jnp.pad(kt, ((0, pad), (0, 0)), constant_values=True)  # padding: zero weight, kept, no error
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n + pad) >= n).astype(u.dtype)
    sub = max(s for s in range(1, min(_SUB, blocksize) + 1) if blocksize % s == 0)

    def visit_block(b, wt):
        start = b * blocksize
        block = lax.dynamic_slice_in_dim(wt, start, blocksize, axis=0)
        u_block = lax.dynamic_slice(u, (start, start), (blocksize, blocksize))
        k_block = lax.dynamic_slice_in_dim(kt, start, blocksize, axis=0)
        block, err = _refit_block(block, u_block, k_block, sub)
        wt = _push_errors_to_later_blocks(wt, err, u, b, n_blocks, blocksize)
        return lax.dynamic_update_slice_in_dim(wt, block, start, axis=0)

    wt = lax.fori_loop(0, n_blocks, visit_block, wt)
    return jnp.where(keep, wt[:n].T, 0.0)


@functools.partial(jax.jit, static_argnames=("blocksize",))
def _refit_stacked(weights, keeps, u, dead, blocksize: int):
    one = functools.partial(_refit_one, blocksize=blocksize)
    return jax.vmap(one, in_axes=(0, 0, None, None))(weights, keeps, u, dead)


def obs_refit(
    weights: Sequence[jax.Array],
    masks: Sequence[jax.Array],
    stats: LayerStats,
    *,
    percdamp: float = 0.01,
    blocksize: int = DEFAULT_BLOCKSIZE,
    targets: Sequence[jax.Array] | None = None,
) -> list[PruneResult]:
    """SparseGPT's least-squares update of each weight on its fixed mask (same input stats).

    ``targets`` (optional, one per weight): the dense weights to approach instead of
    ``weights`` (e.g. :func:`corrected_target`); the masks are those given, exactly.
    """
    if not stats.has_hessian:
        raise ValueError("the least-squares refit needs the Hessian X^T X: build the statistics with_hessian=True")
    u, dead = SparseGPT.factor(stats, percdamp)
    src = list(targets) if targets is not None else list(weights)
    results: list[PruneResult | None] = [None] * len(weights)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(weights):
        by_shape.setdefault(tuple(w.shape), []).append(i)
    for idx in by_shape.values():
        w = jnp.stack([jnp.asarray(src[i], jnp.float32) for i in idx])
        k = jnp.stack([jnp.asarray(masks[i]).astype(bool) for i in idx])
        out = _refit_stacked(w, k, u, dead, blocksize)
        for j, i in enumerate(idx):
            results[i] = PruneResult(k[j], out[j].astype(weights[i].dtype))
    return results


@jax.jit
def corrected_target(weight: jax.Array, u: jax.Array, cross: jax.Array, hessian: jax.Array) -> jax.Array:
    """w* (out, in): w*^T = w0^T + (H + damping)^{-1} (X_p^T X_d - H) w0^T with H = X_p^T X_p
    (``hessian``), (H + damping)^{-1} = U^T U (:meth:`SparseGPT.factor`), cross = X_p^T X_d.

    Undamped this is H^{-1} X_p^T X_d w0^T, the least-squares fit of the dense output; written
    as a correction of w0, the damping shrinks the *correction* (towards w0, not towards 0), and
    when X_p = X_d, w* = w0 exactly (SparseGPT's own target)."""
    dot = functools.partial(jnp.matmul, precision=_HIGHEST)
    w0t = weight.astype(jnp.float32).T
    delta = dot(cross - hessian.astype(jnp.float32), w0t)
    return (w0t + dot(u.T, dot(u, delta))).T


def linear_error(weight: jax.Array, dense: jax.Array, hessian: jax.Array) -> float:
    """sum_i (w_i - w0_i)^T H (w_i - w0_i) = ||X W^T - X W0^T||_F^2 (float)."""
    d = (weight - dense).astype(jnp.float32)
    return float(jnp.sum(jnp.matmul(d, hessian, precision=_HIGHEST) * d))


@functools.partial(jax.jit, static_argnames=("iters",))
def _cg_polish(w, target, keep, h, iters: int):
    """``iters`` conjugate-gradient steps on every row of min (w - t)^T H (w - t) over the
    row's kept support (rows in parallel; gradients projected on the mask, so the iterate
    stays exactly 0 off it). CG on the support is exact after |support| steps; fewer steps
    polish the OBS solution towards the row-wise least squares."""
    dot = functools.partial(jnp.matmul, precision=_HIGHEST)
    keep = keep.astype(w.dtype)
    w = w * keep
    r = -keep * dot(w - target, h)
    p = r
    rr = jnp.sum(r * r, -1, keepdims=True)
    tiny = jnp.finfo(w.dtype).tiny

    def body(_, carry):
        w, r, p, rr = carry
        hp = keep * dot(p, h)
        alpha = rr / jnp.maximum(jnp.sum(p * hp, -1, keepdims=True), tiny)
        w = w + alpha * p
        r = r - alpha * hp
        rr_new = jnp.sum(r * r, -1, keepdims=True)
        p = r + (rr_new / jnp.maximum(rr, tiny)) * p
        return w, r, p, rr_new

    w, *_ = lax.fori_loop(0, iters, body, (w, r, p, rr))
    return w * keep


def damped_hessian(stats: LayerStats, percdamp: float = 0.01) -> jax.Array:
    """H + percdamp * mean(diag H) I, dead inputs (H_jj = 0) set to 1: the matrix whose
    inverse SparseGPT factors (first try)."""
    h = stats.hessian.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    return h + percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)


def cg_polish(results: Sequence[PruneResult], targets: Sequence[jax.Array], stats: LayerStats,
              iters: int, percdamp: float = 0.01) -> list[PruneResult]:
    """Polish re-fitted weights towards the row-wise least squares on their masks (CG)."""
    if iters <= 0:
        return list(results)
    h = damped_hessian(stats, percdamp)
    out = []
    for r, t in zip(results, targets, strict=True):
        w = _cg_polish(r.weight.astype(jnp.float32), jnp.asarray(t, jnp.float32), r.mask, h, int(iters))
        out.append(PruneResult(r.mask, w.astype(r.weight.dtype)))
    return out
