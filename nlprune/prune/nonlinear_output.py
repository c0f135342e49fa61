"""The non-linear method beyond the paper: the attention-output objective and re-fitting.

Both work on one layer's attention split into its KV groups (leading axis G = num_kv_heads),
like :mod:`nlprune.prune.nonlinear`, but keep v and o: group g is one ``Attention`` module
with its n_rep query heads' rows of q_proj, its rows of k_proj and v_proj and its n_rep*hd
*columns* of o_proj (its slice of the output projection), so

    out_g(X) = o_g(softmax(q_g k_g^T) v_g)        and    attn(X) = sum_g out_g(X) + b_o.

Attention-output objective (``objective="output"``). Per group and calibration window,
    L_g = 1/2 || out_g(X; M) - out_g(X; 1) ||_F^2
over the masks M of q, k, v and the o slice: softmax(QK^T) V W_O is matched, so v and o are
chosen non-linearly too (the paper's objective only sees q and k). The groups' losses are
decoupled (the cross terms <e_g, e_g'> of the whole layer's error are dropped) so the groups
run independently under ``jax.vmap``, each with its own steps, inside one ``jit``. The masks
are found as in the straight-through variant: scores started from Wanda's, each forward sees
their top-k (per row of each group's slice; N:M per group of M columns) and the gradient
passes straight through. Each of the four tensors gets its own step unit, 1 / RMS of its
initial gradient (their gradients differ by orders of magnitude), and every accepted step
lowers the mini-batch's exact binary-mask loss (backtracking). o's comparison group is each
row *within* a group's slice: every row still loses exactly its share (int(ratio x 192) x 3
= int(ratio x 576) on SmolLM2), and N:M groups never straddle two slices.

Re-fitting the kept weights (``refit_attention``): with the masks fixed, gradient steps on
the kept weights (the effective weight is W o M, so pruned entries stay exactly 0) under the
same kind of loss (the attention probabilities for q/k, or the output), per group, vmapped,
with backtracking: every accepted step descends. The first try moves each tensor by
``eta`` x RMS(W) along its gradient direction (relative steps: one eta fits every layer).
Least-squares re-fitting of v, o and the MLP is :mod:`nlprune.prune.refit`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from nlprune.modeling.llama import Attention, Linear
from nlprune.nonlinear import solver as gd
from nlprune.prune.patterns import SparsityPattern, mask_from_scores

OBJECTIVES = ("probs", "output")
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------------------------
# Per-KV-group modules with v and o
# --------------------------------------------------------------------------------------------


def _o_slices(w: jax.Array, g: int) -> jax.Array:
    """o_proj (hidden, H*hd) -> (G, hidden, rep*hd): group g's columns."""
    return w.reshape(w.shape[0], g, -1).transpose(1, 0, 2)


def _o_full(w: jax.Array) -> jax.Array:
    """(G, hidden, rep*hd) -> (hidden, H*hd)."""
    return w.transpose(1, 0, 2).reshape(w.shape[1], -1)


def to_groups(name: str, a: jax.Array, g: int) -> jax.Array:
    """A full-shape array of linear ``name`` (weight, mask or scores) in per-group shape."""
    return _o_slices(a, g) if name == "o_proj" else a.reshape(g, -1, a.shape[-1])


def from_groups(name: str, a: jax.Array) -> jax.Array:
    """Per-group shape back to the linear's full shape."""
    return _o_full(a) if name == "o_proj" else a.reshape(-1, a.shape[-1])


def split_attention_groups(attn: Attention, masks: dict[str, jax.Array] | None = None) -> Attention:
    """All four attention linears as a stack of per-KV-group modules (leading axis G).

    Weights are the current effective weights (existing masks folded in, so the dense
    reference is what the layer computes now); masks are ``masks[name]`` (full shapes) or all
    ones. o_proj's bias is dropped: it is added once to the whole layer's output, the same in
    the pruned and the dense attention, so it cancels in every error.
    """
    g, hd = attn.num_kv_heads, attn.head_dim
    masks = masks or {}

    def stack(name: str, lin: Linear) -> Linear:
        w = to_groups(name, lin.effective_weight, g)
        m = masks.get(name)
        m = jnp.ones_like(w) if m is None else to_groups(name, jnp.asarray(m, w.dtype), g)
        b = None if (lin.bias is None or name == "o_proj") else lin.bias.reshape(g, -1)
        return Linear(w, b, m)

    return Attention(
        q_proj=stack("q_proj", attn.q_proj), k_proj=stack("k_proj", attn.k_proj),
        v_proj=stack("v_proj", attn.v_proj), o_proj=stack("o_proj", attn.o_proj),
        num_heads=attn.num_heads // g, num_kv_heads=1, head_dim=hd,
    )


def leaf_spec(groups: Attention, names, leaf: str) -> Attention:
    """Filter spec: True at the ``leaf`` ("mask" or "weight") of each linear in ``names``."""
    spec = jax.tree.map(lambda _: False, groups)
    return eqx.tree_at(
        lambda a: tuple(getattr(getattr(a, n), leaf) for n in names), spec, tuple(True for _ in names)
    )


def group_outputs(group: Attention, X, cos, sin) -> jax.Array:
    """One group's attention output (windows, seq, hidden), o_proj bias excluded."""
    return jax.vmap(lambda x: group(x, cos, sin))(X)


def group_probs(group: Attention, X, cos, sin) -> jax.Array:
    return jax.vmap(lambda x: group.attention_probs(*group.project_qk(x, cos, sin)))(X)


def _response(objective: str):
    return group_outputs if objective == "output" else group_probs


@functools.partial(jax.jit, static_argnames=("objective",))
def stacked_response(groups: Attention, X, cos, sin, objective: str) -> jax.Array:
    """Every group's output (G, windows, seq, hidden) or probabilities (G, windows, rep, seq, seq)."""
    return jax.vmap(_response(objective), in_axes=(0, None, None, None))(groups, X, cos, sin)


# --------------------------------------------------------------------------------------------
# One vmapped descent for both problems (masks by straight-through; kept weights)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    config: gd.GDConfig
    rounds: int
    batch: int
    scale: float  # n / batch: mini-batch losses in full-batch units
    objective: str
    ste: SparsityPattern | None  # params are scores whose top-k the forward sees; None: weights
    relative_to_params: bool  # step unit RMS(param)/RMS(g0) (weights) instead of 1/RMS(g0)


def _ste_binary(scores: jax.Array, pattern: SparsityPattern) -> jax.Array:
    binary = mask_from_scores(scores, pattern, "row").astype(scores.dtype)
    return binary + (scores - jax.lax.stop_gradient(scores))


def _loss(params, rest, X, cos, sin, target, st: _Static):
    if st.ste is not None:
        params = jax.tree.map(lambda s: _ste_binary(s, st.ste), params)
    out = _response(st.objective)(eqx.combine(params, rest), X, cos, sin)
    return 0.5 * jnp.sum((out - target) ** 2)


def _rms(a):
    return jnp.sqrt(jnp.mean(jnp.square(a)))


def _solve_one(params, rest, target, eta, X, cos, sin, st: _Static):
    """One group: per-tensor step units from the first mini-batch, then ``rounds`` of gd_core."""
    raw = jax.value_and_grad(_loss)
    n_batches = X.shape[0] // st.batch
    _, g0 = raw(params, rest, X[: st.batch], cos, sin, target[: st.batch], st)
    tiny = jnp.finfo(X.dtype).tiny

    def unit(p, g):
        num = _rms(p) if st.relative_to_params else 1.0
        return num / jnp.maximum(_rms(g), tiny)

    units = jax.tree.map(unit, params, g0)

    def vg(p, Xb, Tb):
        # The step direction is the gradient scaled per tensor (a fixed diagonal
        # preconditioner); backtracking still accepts only steps that lower the exact loss.
        value, grad = raw(p, rest, Xb, cos, sin, Tb, st)
        return st.scale * value, jax.tree.map(lambda g, u: u * g, grad, units)

    def run(p, Xb, Tb):
        return gd.gd_core(vg, p, (Xb, Tb), eta, st.config)

    if st.batch == X.shape[0]:
        p, losses, etas = run(params, X, target)
        return p, losses[None], etas[None]

    def round_(p, r):
        start = (r % n_batches) * st.batch
        Xb = jax.lax.dynamic_slice_in_dim(X, start, st.batch)
        Tb = jax.lax.dynamic_slice_in_dim(target, start, st.batch)
        p, losses, etas = run(p, Xb, Tb)
        return p, (losses, etas)

    p, (losses, etas) = jax.lax.scan(round_, params, jnp.arange(st.rounds))
    return p, losses, etas


@functools.partial(jax.jit, static_argnames=("st",))
def _solve_vmapped(params, rest, targets, eta, X, cos, sin, st: _Static):
    return jax.vmap(_solve_one, in_axes=(0, 0, 0, None, None, None, None, None))(
        params, rest, targets, eta, X, cos, sin, st
    )


@dataclasses.dataclass
class GroupSolution:
    """What one vmapped descent returned, in the linears' full shapes."""

    values: dict[str, jax.Array]  # name -> scores (masks problem) or kept weights (refit)
    losses: np.ndarray  # (G, rounds, steps_per_round + 1)
    step_sizes: np.ndarray  # (G, rounds, steps_per_round)
    seconds: float

    @property
    def n_increases(self) -> int:
        rises = np.diff(self.losses, axis=-1).reshape(-1, self.losses.shape[-1] - 1)
        tol = np.stack([gd.descent_tolerance(l) for l in self.losses.reshape(-1, self.losses.shape[-1])])
        return int(np.sum(~np.isfinite(rises) | (rises > tol)))

    def report(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds, "loss_first": self.losses[:, 0, 0].tolist(),
            "loss_last": self.losses[:, -1, -1].tolist(), "n_increases": self.n_increases,
            "steps_taken": int(np.sum(self.step_sizes > 0)),
        }


def _plan(n_win: int, steps: int, window_batch: int | None) -> tuple[int, int, int]:
    batch = n_win if window_batch is None else int(window_batch)
    if batch > n_win or n_win % batch:
        raise ValueError(
            f"--window-batch {batch} must divide the {n_win} calibration windows (each step uses the "
            "next batch of windows, cycling); pick a divisor of --nsamples."
        )
    return (1, int(steps), batch) if batch == n_win else (int(steps), 1, batch)


def _descend(groups: Attention, names, leaf: str, X, cos, sin, *, objective, steps, eta, window_batch,
             step_rule, ste, relative_to_params) -> GroupSolution:
    start = time.perf_counter()
    X = jnp.asarray(X)
    X = X if jnp.issubdtype(X.dtype, jnp.floating) else X.astype(jnp.float32)
    rounds, per_round, batch = _plan(X.shape[0], steps, window_batch)
    params, rest = eqx.partition(groups, leaf_spec(groups, names, leaf))
    # the dense reference: every mask of the stack at one (the layer as it is now)
    dense = eqx.tree_at(
        lambda a: tuple(getattr(a, n).mask for n in ATTN_LINEARS), groups,
        tuple(jnp.ones_like(getattr(groups, n).weight) for n in ATTN_LINEARS),
    )
    targets = stacked_response(dense, X, cos, sin, objective)
    config = gd.GDConfig(steps=per_round, backtracking=step_rule == "backtracking")
    st = _Static(config, rounds, batch, X.shape[0] / batch, objective, ste, relative_to_params)
    out, losses, etas = _solve_vmapped(params, rest, targets, jnp.float32(eta), X, cos, sin, st)
    values = {n: from_groups(n, getattr(getattr(out, n), leaf)) for n in names}
    jax.block_until_ready(values)
    return GroupSolution(values, np.asarray(losses), np.asarray(etas), time.perf_counter() - start)


def solve_attention_masks(
    attn: Attention, X, cos, sin, pattern: SparsityPattern, init_scores: dict[str, jax.Array], *,
    objective: str = "output", fixed_masks: dict[str, jax.Array] | None = None, steps: int = 20,
    eta: float = 0.1, window_batch: int | None = 1, step_rule: str = "backtracking",
) -> tuple[dict[str, jax.Array], GroupSolution]:
    """Binary masks (full shapes, bool) for the linears of ``init_scores`` by straight-through
    descent on ``objective`` (each group's loss); ``fixed_masks``: masks of other linears,
    held fixed (e.g. q/k already chosen). eta is relative: each tensor's score step is
    eta x its gradient / RMS(its initial gradient)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    names = tuple(n for n in ATTN_LINEARS if n in init_scores)
    if not names:
        raise ValueError("solve_attention_masks needs the initial scores of at least one linear")
    if objective == "probs" and not set(names) <= {"q_proj", "k_proj"}:
        raise ValueError("the probs objective sees only q_proj and k_proj; use objective='output' for v/o")
    masks = dict(fixed_masks or {})
    masks.update(init_scores)
    groups = split_attention_groups(attn, masks)
    sol = _descend(groups, names, "mask", X, cos, sin, objective=objective, steps=steps, eta=eta,
                   window_batch=window_batch, step_rule=step_rule, ste=pattern, relative_to_params=False)
    g = attn.num_kv_heads
    binary = {
        n: from_groups(n, mask_from_scores(to_groups(n, s, g), pattern, "row")) for n, s in sol.values.items()
    }
    return binary, sol


def refit_attention(
    attn: Attention, X, cos, sin, masks: dict[str, jax.Array], names, *, objective: str = "probs",
    steps: int = 10, eta: float = 0.01, window_batch: int | None = 1,
) -> tuple[dict[str, jax.Array], GroupSolution]:
    """Re-fit the kept weights of ``names`` with every mask fixed: backtracking gradient steps
    on ``objective``, each tensor's first try moving it by eta x RMS(W). Returns the new
    weights (full shapes, exactly 0 where masked) of ``names``; ``masks`` holds the binary
    masks of the four linears (a missing one stays dense)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    names = tuple(n for n in ATTN_LINEARS if n in names)
    if objective == "probs" and not set(names) <= {"q_proj", "k_proj"}:
        raise ValueError("the probs objective sees only q_proj and k_proj")
    groups = split_attention_groups(attn, {n: m for n, m in masks.items()})
    sol = _descend(groups, names, "weight", X, cos, sin, objective=objective, steps=steps, eta=eta,
                   window_batch=window_batch, step_rule="backtracking", ste=None, relative_to_params=True)
    weights = {}
    for n, w in sol.values.items():
        m = masks.get(n)
        weights[n] = w if m is None else jnp.where(jnp.asarray(m).astype(bool), w, 0.0).astype(w.dtype)
    return weights, sol


def attention_loss(attn: Attention, X, cos, sin, masks: dict[str, jax.Array], objective: str,
                   weights: dict[str, jax.Array] | None = None) -> float:
    """Sum over groups of 1/2 ||response(masked) - response(dense)||^2 (the solvers' loss, full
    batch): ``weights`` replace the named linears' weights in the masked response."""
    dense = split_attention_groups(attn)
    groups = split_attention_groups(attn, masks)
    for n, w in (weights or {}).items():
        groups = eqx.tree_at(lambda a: getattr(a, n).weight, groups, to_groups(n, w, attn.num_kv_heads))
    a = stacked_response(groups, X, cos, sin, objective)
    b = stacked_response(dense, X, cos, sin, objective)
    return float(0.5 * jnp.sum((a - b) ** 2))


# --------------------------------------------------------------------------------------------
# What the pruning method calls
# --------------------------------------------------------------------------------------------


def wanda_scores(weight: jax.Array, norms: jax.Array) -> jax.Array:
    """|W_ij| ||x_j|| over each row's median: a ranking whose top-k is Wanda's mask."""
    s = jnp.abs(weight.astype(jnp.float32)) * norms[None, :]
    return s / jnp.maximum(jnp.median(s, axis=1, keepdims=True), jnp.finfo(jnp.float32).tiny)


@eqx.filter_jit
def _context_norms(attn: Attention, X, cos, sin) -> jax.Array:
    ctx = jax.vmap(lambda x: attn.context(x, cos, sin))(X)
    return jnp.sqrt(jnp.sum(jnp.square(ctx.reshape(-1, ctx.shape[-1]).astype(jnp.float32)), 0))


def prune_attention_output(
    attn: Attention, X, cos, sin, pattern: SparsityPattern, *, steps: int, eta: float,
    window_batch: int | None, step_rule: str, refit: bool, refit_steps: int, refit_eta: float,
) -> tuple[dict[str, tuple[jax.Array, jax.Array]], dict[str, Any]]:
    """The output objective on one layer: masks of q, k, v, o by straight-through descent
    from Wanda's scores (o's from the dense context's norms); with ``refit`` the kept weights
    of q, k and v are then re-fitted by gradient steps on the same loss (o is re-fitted by
    least squares once its pruned input is known, see :func:`o_stage`).
    Returns name -> (mask, weight) with weight exactly 0 off the mask, and a report."""
    X = jnp.asarray(X)
    norms_x = jnp.sqrt(jnp.sum(jnp.square(X.reshape(-1, X.shape[-1]).astype(jnp.float32)), 0))
    norms_c = _context_norms(attn, X, cos, sin)
    init = {n: wanda_scores(getattr(attn, n).effective_weight, norms_c if n == "o_proj" else norms_x)
            for n in ATTN_LINEARS}
    masks, sol = solve_attention_masks(attn, X, cos, sin, pattern, init, objective="output", steps=steps,
                                       eta=eta, window_batch=window_batch, step_rule=step_rule)
    weights = {n: jnp.where(masks[n], getattr(attn, n).effective_weight, 0.0) for n in ATTN_LINEARS}
    report: dict[str, Any] = {"objective": "output", **sol.report()}
    if refit:
        new, rsol = refit_attention(attn, X, cos, sin, masks, ("q_proj", "k_proj", "v_proj"), objective="output",
                                    steps=refit_steps, eta=refit_eta, window_batch=window_batch)
        weights.update(new)
        report["refit"] = rsol.report()
    dtype = attn.q_proj.weight.dtype
    return {n: (masks[n], weights[n].astype(dtype)) for n in ATTN_LINEARS}, report


def o_stage(layer, dense_layer, stats, hidden, cos, sin, batch_size: int, mask: jax.Array, *,
            refit: bool, corrected: bool, percdamp: float, blocksize: int, cg_iters: int):
    """o_proj on a fixed ``mask``: the dense weight masked, or (``refit``) re-fitted by least
    squares on its pruned input (``stats``: the context of the already-pruned q/k/v). With
    ``corrected`` (and ``hidden``, the layer's calibration inputs) the target is the *dense*
    attention output on the same inputs (:func:`nlprune.prune.refit.corrected_target`), so o
    also absorbs what pruning q, k and v changed."""
    from nlprune.prune import refit as rf
    from nlprune.prune.base import PruneResult
    from nlprune.modeling.forward import attn_context

    w0 = dense_layer.self_attn.o_proj.effective_weight
    mask = jnp.asarray(mask).astype(bool)
    if not refit:
        return PruneResult(mask, jnp.where(mask, w0, 0).astype(w0.dtype))
    target = w0
    if corrected and hidden is not None:
        u, _ = rf.SparseGPT.factor(stats, percdamp)
        cross = None
        for start in range(0, hidden.shape[0], batch_size):
            h = hidden[start : start + batch_size]
            cp = attn_context(layer, h, cos, sin).reshape(-1, w0.shape[1])
            cd = attn_context(dense_layer, h, cos, sin).reshape(-1, w0.shape[1])
            part = jnp.matmul(cp.T, cd, precision=jax.lax.Precision.HIGHEST)
            cross = part if cross is None else cross + part
        target = rf.corrected_target(w0, u, cross, stats.hessian)
    (res,) = rf.obs_refit([w0], [mask], stats, percdamp=percdamp, blocksize=blocksize, targets=[target])
    (res,) = rf.cg_polish([res], [target], stats, cg_iters, percdamp)
    return res


def down_stage(layer, dense_layer, stats, hidden, cos, sin, batch_size: int, weights, masks, *,
               percdamp: float, blocksize: int, cg_iters: int):
    """down_proj re-fitted on its fixed ``masks`` towards the *dense* MLP's output on the
    same residual stream (the already-pruned attention's): its input X_p = act(gate_p, up_p),
    the dense one X_d = act(gate_0, up_0) on the same normalised stream, and the target
    weight :func:`nlprune.prune.refit.corrected_target`, so down also absorbs what pruning gate
    and up changed. ``hidden``: the layer's calibration inputs (None: SparseGPT's target)."""
    from nlprune.prune import refit as rf
    from nlprune.modeling.forward import after_attention, attn_context, mlp_hidden

    (w0,) = weights
    target = w0
    if hidden is not None:
        u, _ = rf.SparseGPT.factor(stats, percdamp)
        cross = None
        for start in range(0, hidden.shape[0], batch_size):
            h = hidden[start : start + batch_size]
            mid = after_attention(layer, h, attn_context(layer, h, cos, sin))
            ap = mlp_hidden(layer, mid).reshape(-1, w0.shape[1])
            ad = mlp_hidden(dense_layer, mid).reshape(-1, w0.shape[1])
            part = jnp.matmul(ap.T, ad, precision=jax.lax.Precision.HIGHEST)
            cross = part if cross is None else cross + part
        target = rf.corrected_target(w0, u, cross, stats.hessian)
    results = rf.obs_refit([w0], masks, stats, percdamp=percdamp, blocksize=blocksize, targets=[target])
    return rf.cg_polish(results, [target], stats, cg_iters, percdamp)
