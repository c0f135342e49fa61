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

from nlprune.modeling.forward import after_attention, attn_context, mlp_hidden
from nlprune.prune import obs
from nlprune.prune.base import GroupContext, PruneResult, check_result
from nlprune.prune.sparsegpt import stacked_by_shape
from nlprune.prune.stats import LayerStats
from nlprune.sparsity import DEFAULT_BLOCKSIZE

HIGHEST = obs.HIGHEST
# The least-squares target of o_proj and down_proj: "dense" = the dense sublayer's output on
# the same inputs (corrects the upstream error), "input" = SparseGPT's (the dense weight on the
# pruned inputs). Every other linear's target is its dense weight on its own input.
O_TARGET = "dense"
DOWN_TARGET = "dense"


def _refit_one(weight, keep, u, dead, blocksize: int) -> jax.Array:
    """Re-fitted weight (float32, exactly 0 off the mask) of one (out, in) weight."""
    sub = obs.sub_block_width(blocksize)

    def step(b, wt, u_block, k_block, n_real):
        return obs.obs_block(wt, u_block, k_block, sub, n_real)

    return obs.obs_sweep(weight, u, dead, blocksize, step, keep=keep)[1]


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
    u, dead, _, _ = obs.factor(stats, percdamp)
    src = list(targets) if targets is not None else list(weights)
    results: list[PruneResult | None] = [None] * len(weights)
    for idx in stacked_by_shape(weights):
        w = jnp.stack([jnp.asarray(src[i], jnp.float32) for i in idx])
        k = jnp.stack([jnp.asarray(masks[i]).astype(bool) for i in idx])
        out = _refit_stacked(w, k, u, dead, blocksize)
        for j, i in enumerate(idx):
            results[i] = PruneResult(k[j], out[j].astype(weights[i].dtype))
    return results


@jax.jit
def corrected_target(weight: jax.Array, u: jax.Array, cross: jax.Array, hessian: jax.Array) -> jax.Array:
    """w* (out, in): w*^T = w0^T + (H + damping)^{-1} (X_p^T X_d - H) w0^T with H = X_p^T X_p
    (``hessian``), (H + damping)^{-1} = U^T U (:func:`nlprune.prune.obs.factor`), cross = X_p^T X_d.

    Undamped this is H^{-1} X_p^T X_d w0^T, the least-squares fit of the dense output; written
    as a correction of w0, the damping shrinks the *correction* (towards w0, not towards 0), and
    when X_p = X_d, w* = w0 exactly (SparseGPT's own target)."""
    dot = functools.partial(jnp.matmul, precision=HIGHEST)
    w0t = weight.astype(jnp.float32).T
    delta = dot(cross - hessian.astype(jnp.float32), w0t)
    return (w0t + dot(u.T, dot(u, delta))).T


def linear_error(weight: jax.Array, dense: jax.Array, hessian: jax.Array) -> float:
    """sum_i (w_i - w0_i)^T H (w_i - w0_i) = ||X W^T - X W0^T||_F^2 (float)."""
    d = (weight - dense).astype(jnp.float32)
    return float(jnp.sum(jnp.matmul(d, hessian, precision=HIGHEST) * d))


@functools.partial(jax.jit, static_argnames=("iters",))
def _cg_polish(w, target, keep, h, iters: int):
    """``iters`` conjugate-gradient steps on every row of min (w - t)^T H (w - t) over the
    row's kept support (rows in parallel; gradients projected on the mask, so the iterate
    stays exactly 0 off it). CG on the support is exact after |support| steps; fewer steps
    polish the OBS solution towards the row-wise least squares."""
    dot = functools.partial(jnp.matmul, precision=HIGHEST)
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


# --------------------------------------------------------------------------------------------
# Refit stages of a layer's o_proj and down_proj towards the dense sublayer's output
# --------------------------------------------------------------------------------------------


def _cross(hidden: jax.Array, batch_size: int, inputs_pair) -> jax.Array:
    """X_p^T X_d summed over the calibration windows, batch by batch (``inputs_pair(h)`` gives
    the pruned and the dense input of the linear for one batch, each (tokens, in))."""
    cross = None
    for start in range(0, hidden.shape[0], batch_size):
        xp, xd = inputs_pair(hidden[start : start + batch_size])
        part = jnp.matmul(xp.T, xd, precision=HIGHEST)
        cross = part if cross is None else cross + part
    return cross


def o_stage(layer, dense_layer, stats, hidden, cos, sin, batch_size: int, mask: jax.Array, *,
            refit: bool, corrected: bool, percdamp: float, blocksize: int, cg_iters: int) -> PruneResult:
    """o_proj on a fixed ``mask``: the dense weight masked, or (``refit``) re-fitted by least
    squares on its pruned input (``stats``: the context of the already-pruned q/k/v). With
    ``corrected`` (and ``hidden``, the layer's calibration inputs) the target is the *dense*
    attention output on the same inputs (:func:`corrected_target`), so o also absorbs what
    pruning q, k and v changed."""
    w0 = dense_layer.self_attn.o_proj.effective_weight
    mask = jnp.asarray(mask).astype(bool)
    if not refit:
        return PruneResult(mask, jnp.where(mask, w0, 0).astype(w0.dtype))
    target = w0
    if corrected and hidden is not None:
        u = obs.factor(stats, percdamp).u
        cross = _cross(hidden, batch_size, lambda h: (
            attn_context(layer, h, cos, sin).reshape(-1, w0.shape[1]),
            attn_context(dense_layer, h, cos, sin).reshape(-1, w0.shape[1]),
        ))
        target = corrected_target(w0, u, cross, stats.hessian)
    (res,) = obs_refit([w0], [mask], stats, percdamp=percdamp, blocksize=blocksize, targets=[target])
    (res,) = cg_polish([res], [target], stats, cg_iters, percdamp)
    return res


def down_stage(layer, dense_layer, stats, hidden, cos, sin, batch_size: int, weights, masks, *,
               percdamp: float, blocksize: int, cg_iters: int) -> list[PruneResult]:
    """down_proj re-fitted on its fixed ``masks`` towards the *dense* MLP's output on the
    same residual stream (the already-pruned attention's): its input X_p = act(gate_p, up_p),
    the dense one X_d = act(gate_0, up_0) on the same normalised stream, and the target
    weight :func:`corrected_target`, so down also absorbs what pruning gate and up changed.
    ``hidden``: the layer's calibration inputs (None: SparseGPT's target)."""
    (w0,) = weights
    target = w0
    if hidden is not None:
        u = obs.factor(stats, percdamp).u

        def pair(h):
            mid = after_attention(layer, h, attn_context(layer, h, cos, sin))
            return (mlp_hidden(layer, mid).reshape(-1, w0.shape[1]), mlp_hidden(dense_layer, mid).reshape(-1, w0.shape[1]))

        target = corrected_target(w0, u, _cross(hidden, batch_size, pair), stats.hessian)
    results = obs_refit([w0], masks, stats, percdamp=percdamp, blocksize=blocksize, targets=[target])
    return cg_polish(results, [target], stats, cg_iters, percdamp)


# --------------------------------------------------------------------------------------------
# The refit stage of the pipeline (every method under --refit)
# --------------------------------------------------------------------------------------------


def refit_group(
    ctx: GroupContext, results: dict[str, PruneResult], *, cg_iters: int, percdamp: float, blocksize: int,
    skip: tuple[str, ...] = (), fitted: bool = False,
) -> dict[str, PruneResult]:
    """Re-fit the kept weights of one group's results on their fixed masks.

    o_proj and down_proj: least squares towards the dense sublayer's output on the same
    calibration inputs (:func:`o_stage`, :func:`down_stage`; with true-sequential statistics:
    otherwise their inputs are the dense layer's and the target is the dense weight); every
    other linear of the group: least squares towards its dense weight on its own input
    (SparseGPT's update on the mask, skipped when ``fitted``: the method's kept weights
    already are that), then ``cg_iters`` CG steps. ``skip``: linears the method re-fits
    itself. Linears outside the group (a method may return more) are left as they are.
    """
    out = dict(results)
    dense = ctx.dense_layer.linears()
    corrected = ctx.hidden if ctx.sequential else None
    plain = [n for n in ctx.names if n not in skip and n in results]
    if "o_proj" in plain:
        plain.remove("o_proj")
        out["o_proj"] = o_stage(
            ctx.layer, ctx.dense_layer, ctx.stats, corrected, ctx.cos, ctx.sin, ctx.batch_size,
            results["o_proj"].mask, refit=True, corrected=O_TARGET == "dense", percdamp=percdamp,
            blocksize=blocksize, cg_iters=cg_iters,
        )
    if "down_proj" in plain and corrected is not None and DOWN_TARGET == "dense":
        plain.remove("down_proj")
        w0 = dense["down_proj"].effective_weight
        (out["down_proj"],) = down_stage(
            ctx.layer, ctx.dense_layer, ctx.stats, corrected, ctx.cos, ctx.sin, ctx.batch_size, [w0],
            [results["down_proj"].mask], percdamp=percdamp, blocksize=blocksize, cg_iters=cg_iters,
        )
    if plain:
        targets = [dense[n].effective_weight for n in plain]
        fit = [results[n] for n in plain]
        if not fitted:
            fit = obs_refit(targets, [r.mask for r in fit], ctx.stats, percdamp=percdamp, blocksize=blocksize)
        out.update(zip(plain, cg_polish(fit, targets, ctx.stats, cg_iters, percdamp), strict=True))
    for name in ctx.names:
        if name not in skip:  # the masks are the method's; the refit keeps them exactly
            check_result(out[name], dense[name].weight, ctx.pattern, group=None)
    return out
