"""The non-linear method beyond the paper: the attention-output objective, and re-fitting the
kept attention weights by gradient steps.

Both work on one layer's attention split into its KV groups with v and o
(:func:`nlprune.nonlinear.groups.split_attention_groups`), so

    out_g(X) = o_g(softmax(q_g k_g^T) v_g)        and    attn(X) = sum_g out_g(X) + b_o.

Attention-output objective (``objective="output"``). Per group and calibration window,
    L_g = 1/2 || out_g(X; M) - out_g(X; 1) ||_F^2
over the masks M of q, k, v and the o slice: softmax(QK^T) V W_O is matched, so v and o are
chosen non-linearly too (the paper's objective only sees q and k). The groups' losses are
decoupled (the cross terms <e_g, e_g'> of the whole layer's error are dropped) so the groups
run independently under ``jax.vmap``, each with its own steps, inside one ``jit``. The masks
are found as in the straight-through q/k variant: scores started from Wanda's, each forward
sees their top-k (per row of each group's slice; N:M per group of M columns) and the gradient
passes straight through. Each of the four tensors gets its own step unit, 1 / RMS of its
initial gradient (their gradients differ by orders of magnitude), and every accepted step
lowers the mini-batch's exact binary-mask loss (backtracking). o's comparison group is each
row *within* a group's slice: every row still loses exactly its share, and N:M groups never
straddle two slices.

Re-fitting the kept weights (:func:`refit_attention`): with the masks fixed, gradient steps
on the kept weights (the effective weight is W o M, so pruned entries stay exactly 0) under
the same kind of loss (the attention probabilities for q/k, or the output), per group,
vmapped, with backtracking: every accepted step descends. The first try moves each tensor by
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

from nlprune.modeling.llama import Attention
from nlprune.nonlinear import descent
from nlprune.nonlinear.groups import (
    ATTN_LINEARS,
    from_groups,
    leaf_spec,
    response,
    split_attention_groups,
    stacked_response,
    straight_through,
    to_groups,
)
from nlprune.nonlinear.options import OBJECTIVES
from nlprune.nonlinear.qk import step_rounds, windows_plan
from nlprune.prune.wanda import wanda_scores
from nlprune.sparsity import SparsityPattern, mask_from_scores


@dataclasses.dataclass(frozen=True)
class _Static:
    config: descent.GDConfig
    rounds: int
    batch: int
    scale: float  # n / batch: mini-batch losses in full-batch units
    objective: str
    ste: SparsityPattern | None  # params are scores whose top-k the forward sees; None: weights
    relative_to_params: bool  # step unit RMS(param)/RMS(g0) (weights) instead of 1/RMS(g0)
    round_targets: bool = False  # targets built per round from the dense group, not stored


def _loss(params, rest, X, cos, sin, target, st: _Static):
    if st.ste is not None:
        params = jax.tree.map(lambda s: straight_through(s, st.ste), params)
    out = response(st.objective)(eqx.combine(params, rest), X, cos, sin)
    return 0.5 * jnp.sum((out - target) ** 2)


def _rms(a):
    return jnp.sqrt(jnp.mean(jnp.square(a)))


def _solve_one(params, rest, target, dense, eta, X, cos, sin, st: _Static):
    """One group: per-tensor step units from the first mini-batch, then ``rounds`` of gd_core.
    ``target`` is every window's dense response, or None: then each round's is built from
    ``dense`` (the group as it was before the descent)."""
    make_target = None
    if st.round_targets:
        def make_target(Xb):
            return jax.lax.stop_gradient(response(st.objective)(dense, Xb, cos, sin))

    raw = jax.value_and_grad(_loss)
    t0 = make_target(X[: st.batch]) if target is None else target[: st.batch]
    _, g0 = raw(params, rest, X[: st.batch], cos, sin, t0, st)
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
        return descent.gd_core(vg, p, (Xb, Tb), eta, st.config)

    return descent.minibatch_rounds(run, params, X, target, st.batch, st.rounds, make_target)


@functools.partial(jax.jit, static_argnames=("st",))
def _solve_vmapped(params, rest, targets, dense, eta, X, cos, sin, st: _Static):
    return jax.vmap(_solve_one, in_axes=(0, 0, 0, 0, None, None, None, None, None))(
        params, rest, targets, dense, eta, X, cos, sin, st
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
        tol = np.stack([descent.descent_tolerance(l) for l in self.losses.reshape(-1, self.losses.shape[-1])])
        return int(np.sum(~np.isfinite(rises) | (rises > tol)))

    def report(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds, "loss_first": self.losses[:, 0, 0].tolist(),
            "loss_last": self.losses[:, -1, -1].tolist(), "n_increases": self.n_increases,
            "steps_taken": int(np.sum(self.step_sizes > 0)),
        }


def _descend(groups: Attention, names, leaf: str, X, cos, sin, *, objective, steps, eta, window_batch,
             step_rule, ste, relative_to_params, recompute_targets: bool = False) -> GroupSolution:
    start = time.perf_counter()
    X = jnp.asarray(X)
    X = X if jnp.issubdtype(X.dtype, jnp.floating) else X.astype(jnp.float32)
    batch, _ = windows_plan(X.shape[0], window_batch)
    rounds, per_round = step_rounds(X.shape[0], batch, steps)
    params, rest = eqx.partition(groups, leaf_spec(groups, names, leaf))
    # the dense reference: every mask of the stack at one (the layer as it is now)
    dense = eqx.tree_at(
        lambda a: tuple(getattr(a, n).mask for n in ATTN_LINEARS), groups,
        tuple(jnp.ones_like(getattr(groups, n).weight) for n in ATTN_LINEARS),
    )
    # every window's targets at once, or (recompute_targets) each round's from ``dense``
    targets = None if recompute_targets else stacked_response(dense, X, cos, sin, objective)
    config = descent.GDConfig(steps=per_round, backtracking=step_rule == "backtracking")
    st = _Static(config, rounds, batch, X.shape[0] / batch, objective, ste, relative_to_params,
                 round_targets=recompute_targets)
    out, losses, etas = _solve_vmapped(params, rest, targets, dense if recompute_targets else None,
                                       jnp.float32(eta), X, cos, sin, st)
    values = {n: from_groups(n, getattr(getattr(out, n), leaf)) for n in names}
    jax.block_until_ready(values)
    return GroupSolution(values, np.asarray(losses), np.asarray(etas), time.perf_counter() - start)


def solve_attention_masks(
    attn: Attention, X, cos, sin, pattern: SparsityPattern, init_scores: dict[str, jax.Array], *,
    objective: str = "output", fixed_masks: dict[str, jax.Array] | None = None, steps: int = 20,
    eta: float = 0.1, window_batch: int | None = 1, step_rule: str = "backtracking",
    recompute_targets: bool = False,
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
                   window_batch=window_batch, step_rule=step_rule, ste=pattern, relative_to_params=False,
                   recompute_targets=recompute_targets)
    g = attn.num_kv_heads
    binary = {
        n: from_groups(n, mask_from_scores(to_groups(n, s, g), pattern, "row")) for n, s in sol.values.items()
    }
    return binary, sol


def refit_attention(
    attn: Attention, X, cos, sin, masks: dict[str, jax.Array], names, *, objective: str = "probs",
    steps: int = 10, eta: float = 0.01, window_batch: int | None = 1, recompute_targets: bool = False,
) -> tuple[dict[str, jax.Array], GroupSolution]:
    """Re-fit the kept weights of ``names`` with every mask fixed: backtracking gradient steps
    on ``objective``, each tensor's first try moving it by eta x RMS(W). Returns the new
    weights (full shapes, exactly 0 where masked) of ``names``; ``masks`` holds the binary
    masks of the four linears (a missing one stays dense). ``recompute_targets``: each step
    builds its windows' dense targets instead of storing every window's (memory)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    names = tuple(n for n in ATTN_LINEARS if n in names)
    if objective == "probs" and not set(names) <= {"q_proj", "k_proj"}:
        raise ValueError("the probs objective sees only q_proj and k_proj")
    groups = split_attention_groups(attn, {n: m for n, m in masks.items()})
    sol = _descend(groups, names, "weight", X, cos, sin, objective=objective, steps=steps, eta=eta,
                   window_batch=window_batch, step_rule="backtracking", ste=None, relative_to_params=True,
                   recompute_targets=recompute_targets)
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


@eqx.filter_jit
def _context_norms(attn: Attention, X, cos, sin) -> jax.Array:
    ctx = jax.vmap(lambda x: attn.context(x, cos, sin))(X)
    return jnp.sqrt(jnp.sum(jnp.square(ctx.reshape(-1, ctx.shape[-1]).astype(jnp.float32)), 0))


def prune_attention_output(
    attn: Attention, X, cos, sin, pattern: SparsityPattern, *, steps: int, eta: float,
    window_batch: int | None, step_rule: str, refit: bool, refit_steps: int, refit_eta: float,
    recompute_targets: bool = False,
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
                                       eta=eta, window_batch=window_batch, step_rule=step_rule,
                                       recompute_targets=recompute_targets)
    weights = {n: jnp.where(masks[n], getattr(attn, n).effective_weight, 0.0) for n in ATTN_LINEARS}
    report: dict[str, Any] = {"objective": "output", **sol.report()}
    if refit:
        new, rsol = refit_attention(attn, X, cos, sin, masks, ("q_proj", "k_proj", "v_proj"), objective="output",
                                    steps=refit_steps, eta=refit_eta, window_batch=window_batch,
                                    recompute_targets=recompute_targets)
        weights.update(new)
        report["refit"] = rsol.report()
    dtype = attn.q_proj.weight.dtype
    return {n: (masks[n], weights[n].astype(dtype)) for n in ATTN_LINEARS}, report
