"""Non-linear attention pruning on real Llama layers (Liang et al., ICLR 2025; METHOD.md §3).

The merged-W form of :mod:`nlprune.nonlinear` masks W = W_Q W_K^T, which sparsifies no stored
weight. Here the masks sit on the weights themselves: one mask per row of ``q_proj`` and of
``k_proj`` (shaped like the weights), and the attention is computed exactly as the model
computes it (RoPE, the 1/sqrt(hd) scale, the causal mask, GQA) by the model's own
``Attention.project_qk`` and ``Attention.attention_probs``. For one layer with calibration
inputs X_1..X_k (input_layernorm(h) of each window):

    L(M_Q, M_K) = sum_i sum_heads 1/2 ||P_i(M_Q, M_K) - P_i(1, 1)||_F^2
                  + lam/2 (||M_Q||_F^2 + ||M_K||_F^2)

differentiated with JAX. Given X, each KV group (its W_K slice (hd, hidden) and its n_rep
query heads' W_Q slices) is an independent problem: the layer's q/k are split into a stack of
per-group ``Attention`` modules (leading axis = group, ``num_heads = n_rep``,
``num_kv_heads = 1``), the mask leaves are selected with ``eqx.partition``, and all groups run
Algorithm 1 (the solver's :func:`~nlprune.nonlinear.solver.gd_core` and its step rules) at
once under ``jax.vmap`` inside one ``jit``. The relaxed masks are then binarised
(:func:`~nlprune.nonlinear.solver.binarize`). Each step may see a mini-batch of the windows
(``window_batch``, its loss scaled to full-batch units) and the gradient may be accumulated
over chunks of windows (``window_chunk``, bounded memory at long seqlen).

Step rules on real layers (the factorised form has no global Lipschitz constant):
  ``fixed``           the paper's eta (0.005 on real models); nothing guaranteed.
  ``certified``       eta = 1/L with L certified on the box [0, 1] of masks (see
                      :func:`certified_qk_bound`); the masks are projected onto [0, 1] after
                      every step, so the descent lemma applies.
  ``certified_local`` each step certified on the segment it travels
                      (:func:`make_segment_bound`); no box needed.
  ``backtracking``    Armijo: every accepted step descends.

Straight-through variant (``straight_through``; beyond the paper). Measured on SmolLM2-135M
(scripts/nonlinear_layers.py), the relaxed recipe loses to Wanda by orders of magnitude: with
a stable step, T = 100 steps move M by < 1%, so the top-k of M_T ranks first-order noise, and
the relaxed optimum (L2 keeps M dense and small) is not a good binary mask either. The
variant optimises the binary mask's own attention error: the params are scores initialised
from Wanda (a ranking whose top-k is Wanda's mask), each step's attention sees their top-k
mask, and the gradient with respect to that mask is applied to the scores (a straight-through
estimator). The forward is exact, so backtracking on the mini-batch's loss still applies: a
step that would raise the binary masks' loss is shrunk (a fixed eta diverged on some KV
groups). eta is relative to the initial gradient's RMS, so one value fits every layer.

The "paper recipe" method :class:`NonLinear` prunes q/k this way and v, o, gate, up, down with a
linear method (Wanda by default), all at the same ratio. It needs the pipeline's q/k hook
(:meth:`NonLinear.prune_qk`): q/k see the raw layer inputs, cos/sin and the layer itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from nlprune import parallel
from nlprune.modeling.llama import Attention, DecoderLayer, Linear
# Module references, not names: nlprune.nonlinear.solver imports nlprune.prune (patterns), so
# either package may be the one half-initialised when the other is imported.
from nlprune.nonlinear import lipschitz as lip
from nlprune.nonlinear import solver as gd
from nlprune.prune.base import (
    LayerStats,
    PruneResult,
    PruningMethod,
    check_result,
    get_method,
    register_method,
)
from nlprune.prune import nonlinear_output as nlo
from nlprune.prune import refit as rf
from nlprune.prune.patterns import DEFAULT_BLOCKSIZE, SparsityPattern, mask_from_scores
from nlprune.prune.wanda import wanda_prune

STEP_RULES = ("fixed", "certified", "certified_local", "backtracking")
MASK_INITS = ("ones", "wanda")
LINEAR_METHODS = ("wanda", "sparsegpt", "magnitude")
BINARIZE_CHOICES = ("row", "matrix", "magnitude")  # = solver.BINARIZE_MODES (import-cycle free)
PAPER_LAMBDA = 0.05  # Section 6.2 (Llama 3.2-1B)
# Defaults of the options left None: the paper's recipe, or (straight_through) the variant
# measured on SmolLM2-135M (scripts/nonlinear_layers.py): backtracking from eta = 0.1 / RMS of
# the initial gradient, T = 20, cut the held-out attention error of q/k to 0.63x Wanda's
# (geometric mean over 7 layers, better on every one) at ~3 s per layer; with a fixed eta,
# 0.03 already diverged on some KV groups (layers 25, 29).
PAPER_DEFAULTS = {"step_rule": "fixed", "steps": 100, "mask_init": "ones", "eta_relative": False}
STE_DEFAULTS = {"step_rule": "backtracking", "steps": 20, "mask_init": "wanda", "eta": 0.1, "eta_relative": True}
OBJECTIVES = nlo.OBJECTIVES
# --refit's settings left None: q/k (and v under the output objective) take refit_steps
# backtracking gradient steps from a first try of refit_eta x RMS(W); v/o/MLP least squares
# (SparseGPT's update on the fixed mask) then refit_cg CG steps. Measured on 4 SmolLM2 layers
# (scripts/nonlinear_variants.py, benchmarks/nonlinear/variants_*.json): 20 CG steps cut the
# layer-output error by ~4% more (50 no better). 10 gradient steps on q/k changed one layer's
# output error by < 0.2%, but the whole model's C4 perplexity by -0.5 (58.73 -> 58.21 at 50%,
# benchmarks/nonlinear/table.md) for ~+25 s, so they are on.
REFIT_DEFAULTS = {"refit_steps": 10, "refit_eta": 0.01, "refit_cg": 20}
# Named presets (--recipe); flags the user gives override them. "paper" is METHOD.md's default.
# "best" keeps every beyond-paper option that lowered SmolLM2-135M's whole-model C4 perplexity
# (benchmarks/nonlinear/table.md, cpu protocol): straight-through q/k (71420 -> 63.3 at 50%),
# refit with its q/k steps (63.6 -> 58.2; SparseGPT 64.2), at 2:4 107.4 vs SparseGPT's 125.3.
# Left out: --objective output (with refit, no q/k steps: 59.11 vs 58.73 without it, at 2.1x
# the prune time). "fast" is best with half the q/k steps, no q/k gradient refit and 10 CG
# steps: 58.31 at 50% and 106.90 at 2:4 (benchmarks/nonlinear/table_cheap.md) in ~60% of
# best's time (4.7x SparseGPT's instead of 7.7x).
_BEST = {"straight_through": True, "linear_method": "sparsegpt", "refit": True}
RECIPES = {
    "paper": {},
    "best": _BEST,
    "fast": {**_BEST, "steps": 10, "refit_steps": 0, "refit_cg": 10},
}
# o_proj's least-squares target under --refit: "dense" = the dense attention output on the same
# inputs (corrects the upstream q/k/v error), "input" = SparseGPT's (dense o on the pruned context)
REFIT_O_TARGET = "dense"
# down_proj's: "dense" = the dense MLP's output on the same (pruned-attention) residual stream
# (corrects the gate/up error), "input" = SparseGPT's (dense down on the pruned activations)
REFIT_DOWN_TARGET = "dense"
_BOX_SAFETY = 1e-9  # relative margin of the float64 host bound
_CURVATURE_ITERS = 20  # power iterations for the backtracking rule's first eta


# --------------------------------------------------------------------------------------------
# Per-KV-group modules
# --------------------------------------------------------------------------------------------


def split_groups(attn: Attention) -> Attention:
    """The layer's q/k as a stack of per-KV-group ``Attention`` modules with all-ones masks.

    Every array leaf gets a leading group axis G = num_kv_heads: q_proj (G, n_rep*hd, hidden),
    k_proj (G, hd, hidden) (rows of HF's weights: query head h belongs to group h // n_rep).
    v/o are dropped (None): the softmax does not see them. Existing masks are folded in, so
    the dense reference is what the layer computes now.
    """
    g, hd = attn.num_kv_heads, attn.head_dim
    rep = attn.num_heads // g

    def stack(lin: Linear, rows: int) -> Linear:
        w = lin.effective_weight.reshape(g, rows, -1)
        b = None if lin.bias is None else lin.bias.reshape(g, rows)
        return Linear(w, b, jnp.ones_like(w))

    return Attention(
        q_proj=stack(attn.q_proj, rep * hd),
        k_proj=stack(attn.k_proj, hd),
        v_proj=None,
        o_proj=None,
        num_heads=rep,
        num_kv_heads=1,
        head_dim=hd,
    )


def qk_mask_spec(groups: Attention) -> Attention:
    """Filter spec for ``eqx.partition``: True exactly at the q_proj and k_proj mask leaves."""
    spec = jax.tree.map(lambda _: False, groups)
    return eqx.tree_at(lambda a: (a.q_proj.mask, a.k_proj.mask), spec, (True, True))


def partition_masks(groups: Attention) -> tuple[Attention, Attention]:
    """(masks, rest): the mask leaves (the GD parameters) and everything else."""
    return eqx.partition(groups, qk_mask_spec(groups))


def with_qk_masks(groups: Attention, mask_q: jax.Array, mask_k: jax.Array) -> Attention:
    """``groups`` with the given masks, in full-weight shapes (H*hd, hidden), (KV*hd, hidden)."""
    g = groups.q_proj.weight.shape[0]
    return eqx.tree_at(
        lambda a: (a.q_proj.mask, a.k_proj.mask),
        groups,
        (mask_q.reshape(g, -1, mask_q.shape[-1]), mask_k.reshape(g, -1, mask_k.shape[-1])),
    )


def full_masks(masks: Attention) -> tuple[jax.Array, jax.Array]:
    """Stacked per-group masks back in the shapes of q_proj.weight and k_proj.weight."""
    mq, mk = masks.q_proj.mask, masks.k_proj.mask
    return mq.reshape(-1, mq.shape[-1]), mk.reshape(-1, mk.shape[-1])


def _ones_like_masks(masks: Attention) -> Attention:
    return jax.tree.map(jnp.ones_like, masks)


def group_probs(group: Attention, X: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """One group's causal attention (windows, n_rep, seq, seq), by the model's own code."""
    return jax.vmap(lambda x: group.attention_probs(*group.project_qk(x, cos, sin)))(X)


@eqx.filter_jit
def stacked_probs(groups: Attention, X: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Every group's attention: (G, windows, n_rep, seq, seq)."""
    return jax.vmap(group_probs, in_axes=(0, None, None, None))(groups, X, cos, sin)


# --------------------------------------------------------------------------------------------
# The loss, its chunked value-and-gradient, the segment certificate
# --------------------------------------------------------------------------------------------


def _attention_loss(masks: Attention, rest: Attention, X, cos, sin, target) -> jax.Array:
    """sum over windows and the group's heads of 1/2 ||P(M) - P(1)||_F^2.

    ``target=None`` recomputes the dense attention here (memory O(windows in this call))."""
    if target is None:
        dense = eqx.combine(_ones_like_masks(masks), rest)
        target = jax.lax.stop_gradient(group_probs(dense, X, cos, sin))
    p = group_probs(eqx.combine(masks, rest), X, cos, sin)
    return 0.5 * jnp.sum((p - target) ** 2)


def _sq_norm(tree) -> jax.Array:
    return sum(jnp.sum(m * m) for m in jax.tree.leaves(tree))


def _chunks(X, target, chunk: int | None):
    """Windows (and targets) reshaped to (n_chunks, chunk, ...) for a scan."""
    Xc = X.reshape(-1, chunk, *X.shape[1:])
    Tc = None if target is None else target.reshape(-1, chunk, *target.shape[1:])
    return Xc, Tc


def straight_through(scores: jax.Array, pattern: SparsityPattern) -> jax.Array:
    """The binary top-k-per-row mask of ``scores`` in the forward pass, the identity in the
    backward pass (a straight-through estimator)."""
    binary = mask_from_scores(scores, pattern, "row").astype(scores.dtype)
    return binary + (scores - jax.lax.stop_gradient(scores))  # exactly binary in the forward


def make_value_and_grad(chunk: int | None, scale: float, ste: SparsityPattern | None = None):
    """(masks, rest, X, cos, sin, target, lam) -> (L, grad L) for one group.

    ``scale`` multiplies the attention term (n / b for mini-batches of b of n windows, so a
    mini-batch loss is in full-batch units and eta keeps its meaning); ``chunk`` windows at a
    time bounds the memory of the backward pass (gradients are accumulated over chunks).
    ``ste``: the params are scores and the attention sees their binarised masks (top-k per
    row under this pattern), with straight-through gradients.
    """

    def loss(masks, rest, X, cos, sin, target):
        if ste is not None:
            masks = jax.tree.map(lambda m: straight_through(m, ste), masks)
        return _attention_loss(masks, rest, X, cos, sin, target)

    vg_att = jax.value_and_grad(loss)

    def value_and_grad(masks, rest, X, cos, sin, target, lam):
        if chunk is None or chunk >= X.shape[0]:
            value, grad = vg_att(masks, rest, X, cos, sin, target)
        else:
            Xc, Tc = _chunks(X, target, chunk)

            def body(acc, xs):
                v, g = vg_att(masks, rest, xs[0], cos, sin, xs[1])
                return (acc[0] + v, jax.tree.map(jnp.add, acc[1], g)), None

            zero = (jnp.zeros((), X.dtype), jax.tree.map(jnp.zeros_like, masks))
            (value, grad), _ = jax.lax.scan(body, zero, (Xc, Tc))
        value = scale * value + 0.5 * lam * _sq_norm(masks)
        grad = jax.tree.map(lambda g, m: scale * g + lam * m, grad, masks)
        return value, grad

    return value_and_grad


def _causal_range(t: jax.Array, C: jax.Array) -> jax.Array:
    return jnp.max(jnp.where(C, t, -jnp.inf), -1) - jnp.min(jnp.where(C, t, jnp.inf), -1)


def _causal_centred_norm(t: jax.Array, C: jax.Array) -> jax.Array:
    count = jnp.arange(1, t.shape[-1] + 1, dtype=t.dtype)[:, None]
    mean = jnp.sum(jnp.where(C, t, 0.0), -1, keepdims=True) / count
    return jnp.sqrt(jnp.sum(jnp.where(C, (t - mean) ** 2, 0.0), -1))


def _segment_rows(masks, direction, rest, X, cos, sin, target) -> jax.Array:
    """Sum over rows of sup_tau |d^2/dtau^2 g_row(s(M + tau D))| for tau in [0, 1].

    The logits are bilinear in (M_Q, M_K), so along the segment s(tau) = s0 + tau s1 +
    tau^2 s2 exactly, with s1 = (u k^T + q v^T)/sqrt(hd), s2 = u v^T/sqrt(hd) (q, k at M;
    u, v the direction's RoPE'd projections without bias). Then
    d^2 g/dtau^2 = D^2 g[s1 + 2 tau s2, .] + 2 grad g . s2, and for every s, row-wise,
    |D^2 g[t, t]| <= min((5/8 + beta) rho(t)^2/4, (5/16 + beta/2) ||t - mean t||^2)
    (lipschitz.py, Lemma 1) and |grad g . t| = |(p - b)^T J t| <= rho(t)/2, with
    rho(s1 + 2 tau s2) <= rho(s1) + 2 rho(s2) (same for the centred norm)."""
    at = eqx.combine(masks, rest)
    no_bias = eqx.tree_at(
        lambda a: (a.q_proj.bias, a.k_proj.bias), rest, (None, None), is_leaf=lambda x: x is None
    )
    dr = eqx.combine(direction, no_bias)
    if target is None:
        dense = eqx.combine(_ones_like_masks(masks), rest)
        target = group_probs(dense, X, cos, sin)
    hd = at.head_dim
    n = X.shape[1]
    C = jnp.tril(jnp.ones((n, n), bool))
    scale = 1.0 / jnp.sqrt(jnp.float32(hd))

    def one(x, b):
        q, k = at.project_qk(x, cos, sin)  # (rep, n, hd), (1, n, hd)
        u, v = dr.project_qk(x, cos, sin)
        s1 = (jnp.einsum("rqd,kd->rqk", u, k[0]) + jnp.einsum("rqd,kd->rqk", q, v[0])) * scale
        s2 = jnp.einsum("rqd,kd->rqk", u, v[0]) * scale
        r1, r2 = _causal_range(s1, C), _causal_range(s2, C)
        c1, c2 = _causal_centred_norm(s1, C), _causal_centred_norm(s2, C)
        beta = _causal_range(b, C)
        curv = jnp.minimum(
            (lip.ROW_CONSTANT + beta) * (r1 + 2 * r2) ** 2 / 4,
            (lip.L2_ROW_CONSTANT + beta / 2) * (c1 + 2 * c2) ** 2,
        )
        return jnp.sum(curv + r2)

    return jnp.sum(jax.vmap(one)(X, target))


def make_segment_bound(chunk: int | None, scale: float):
    """(masks, D, rest, X, cos, sin, target, lam) -> C_D >= sup_tau D^2 L(M + tau D)[D, D]."""

    def bound(masks, direction, rest, X, cos, sin, target, lam):
        if chunk is None or chunk >= X.shape[0]:
            rows = _segment_rows(masks, direction, rest, X, cos, sin, target)
        else:
            Xc, Tc = _chunks(X, target, chunk)
            rows = jax.lax.map(
                lambda xs: _segment_rows(masks, direction, rest, xs[0], cos, sin, xs[1]), (Xc, Tc)
            ).sum()
        return (lam * _sq_norm(direction) + scale * rows) * (1 + lip.SEGMENT_MARGIN)

    return bound


# --------------------------------------------------------------------------------------------
# The certified bound on the box [0, 1]
# --------------------------------------------------------------------------------------------


@eqx.filter_jit
def _row_ranges(group: Attention, x, cos, sin) -> jax.Array:
    n = x.shape[1]
    return _causal_range(group_probs(group, x, cos, sin), jnp.tril(jnp.ones((n, n), bool)))


def _row_target_ranges(group: Attention, X, cos, sin, chunk: int) -> np.ndarray:
    """beta (windows, n_rep, seq): range of each dense attention row over its causal entries."""
    return np.concatenate(
        [np.asarray(_row_ranges(group, X[i : i + chunk], cos, sin)) for i in range(0, X.shape[0], chunk)]
    )


def certified_qk_bound(
    group: Attention, X, cos, sin, lam: float, window_batch: int | None = None, chunk: int = 8
) -> float:
    """A certified Lipschitz constant of grad L for one KV group on the box M in [0, 1].

    Along a direction V = (V_Q^h per head h, V_K), with A_h = ||V_Q^h||_F, B = ||V_K||_F, q_a,
    k_b the RoPE'd projections at M and u_a, v_b those of V (RoPE is orthogonal):
      D^2 L[V, V] = lam ||V||^2 + sum_rows D^2 g[s1, s1] + 2 grad g . s2,
      s1_ab = (u_a.k_b + q_a.v_b)/sqrt(hd), s2_ab = u_a.v_b/sqrt(hd).
    On the box, ||q_a|| <= Qbar_a = || |W_Q^h| |x_a| + |b| ||, ||k_b|| <= Kbar_b (same for K),
    and by Cauchy-Schwarz per row ||u_a||^2 <= A_h^2 alpha_a, alpha_a = max_r sum_j W_rj^2
    x_aj^2 (gamma_b likewise for K). With |D^2 g[t, t]| <= (5/16 + beta/2) ||t||^2 and
    |grad g . t| <= rho(t)/2 <= max |t| (lipschitz.py), summing over rows b <= a:
      |D^2 L - lam ||V||^2| <= sum_h A_h^2 cA_h + B^2 cB <= max(max_h cA_h, cB) ||V||^2,
      cA_h = sum_{i,a} (5/16 + beta/2)(2/hd) alpha_a sum_{b<=a} Kbar_b^2 + sqrt(alpha_a) G_a/sqrt(hd),
      cB   = sum_h sum_{i,a} (5/16 + beta/2)(2/hd) Qbar_a^2 sum_{b<=a} gamma_b
             + sqrt(alpha_a) G_a/sqrt(hd),      G_a = max_{b<=a} sqrt(gamma_b)
    (2 A B <= A^2 + B^2 splits the s2 term). With mini-batches of ``window_batch`` windows,
    each step's loss is (n / b) x the batch's attention term: the bound is the max over
    batches. Computed in float64 on the host; ``group`` is one (unstacked) group.
    """
    X64 = np.asarray(X, np.float64)
    n_win, n, _ = X64.shape
    hd, rep = group.head_dim, group.num_heads
    beta = _row_target_ranges(group, X, cos, sin, chunk).astype(np.float64)  # (k, rep, n)
    kappa = lip.L2_ROW_CONSTANT + beta / 2

    Wq = np.asarray(group.q_proj.weight, np.float64).reshape(rep, hd, -1)
    Wk = np.asarray(group.k_proj.weight, np.float64)
    bq = np.zeros((rep, hd)) if group.q_proj.bias is None else np.abs(np.asarray(group.q_proj.bias, np.float64)).reshape(rep, hd)
    bk = np.zeros(hd) if group.k_proj.bias is None else np.abs(np.asarray(group.k_proj.bias, np.float64))
    absX, X2 = np.abs(X64), X64**2
    Qbar2 = ((np.einsum("kaj,hrj->khar", absX, np.abs(Wq)) + bq[None, :, None, :]) ** 2).sum(-1)
    alpha = np.einsum("kaj,hrj->khar", X2, Wq**2).max(-1)  # (k, rep, n)
    Kbar2 = ((absX @ np.abs(Wk).T + bk) ** 2).sum(-1)  # (k, n)
    gamma = (X2 @ (Wk**2).T).max(-1)  # (k, n)
    sum_K = np.cumsum(Kbar2, -1)[:, None, :]
    sum_g = np.cumsum(gamma, -1)[:, None, :]
    G = np.maximum.accumulate(np.sqrt(gamma), -1)[:, None, :]
    cross = np.sqrt(alpha) * G / math.sqrt(hd)
    per_win_A = (kappa * (2 / hd) * alpha * sum_K + cross).sum(-1)  # (k, rep)
    per_win_B = (kappa * (2 / hd) * Qbar2 * sum_g + cross).sum((-1, -2))  # (k,)

    b = n_win if window_batch is None else window_batch
    worst = 0.0
    for start in range(0, n_win, b):
        s = n_win / b
        cA = s * per_win_A[start : start + b].sum(0).max()
        cB = s * per_win_B[start : start + b].sum()
        worst = max(worst, float(cA), float(cB))
    return float(lam) + worst * (1 + _BOX_SAFETY)


# --------------------------------------------------------------------------------------------
# Solving all groups of a layer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static settings of one compiled solve (hashable)."""

    config: gd.GDConfig
    rounds: int  # mini-batch rounds (1 = full batch)
    batch: int  # windows per step
    chunk: int | None  # windows per gradient chunk
    scale: float  # n / batch
    store_target: bool
    ste: SparsityPattern | None  # straight-through forward (None = relaxed masks, the paper's)


def _solve_one(masks, rest, target, eta, floor, X, cos, sin, lam, st: _Static):
    """Algorithm 1 for one KV group: ``rounds`` calls of gd_core, each on the next mini-batch."""
    vg = make_value_and_grad(st.chunk, st.scale, st.ste)
    seg = make_segment_bound(st.chunk, st.scale) if st.config.local else None
    n_batches = X.shape[0] // st.batch

    def run(params, Xb, Tb):
        return gd.gd_core(vg, params, (rest, Xb, cos, sin, Tb, lam), eta, st.config, seg, floor)

    if st.batch == X.shape[0]:  # full batch: one gd_core call of all the steps
        p, losses, etas = run(masks, X, target)
        return p, losses[None], etas[None]

    def round_(params, r):
        start = (r % n_batches) * st.batch
        Xb = jax.lax.dynamic_slice_in_dim(X, start, st.batch)
        Tb = None if target is None else jax.lax.dynamic_slice_in_dim(target, start, st.batch)
        p, losses, etas = run(params, Xb, Tb)
        return p, (losses, etas)

    p, (losses, etas) = jax.lax.scan(round_, masks, jnp.arange(st.rounds))
    return p, losses, etas


@functools.partial(jax.jit, static_argnames=("st",))
def _solve_vmapped(masks, rest, targets, eta, floor, X, cos, sin, lam, st: _Static):
    return jax.vmap(_solve_one, in_axes=(0, 0, 0, 0, 0, None, None, None, None, None))(
        masks, rest, targets, eta, floor, X, cos, sin, lam, st
    )


@functools.partial(jax.jit, static_argnames=("st",))
def _solve_single(masks, rest, target, eta, floor, X, cos, sin, lam, st: _Static):
    return _solve_one(masks, rest, target, eta, floor, X, cos, sin, lam, st)


@functools.partial(jax.jit, static_argnames=("chunk", "scale", "ste"))
def _initial_grad_rms(masks, rest, targets, X, cos, sin, chunk, scale, ste):
    """RMS of each group's attention-term gradient at M_0 (the unit of a relative eta)."""
    vg = make_value_and_grad(chunk, scale, ste)

    def one(m, r, t):
        g = vg(m, r, X, cos, sin, t, 0.0)[1]
        leaves = jax.tree.leaves(g)
        return jnp.sqrt(sum(jnp.sum(a * a) for a in leaves) / sum(a.size for a in leaves))

    return jax.vmap(one)(masks, rest, targets)


@functools.partial(jax.jit, static_argnames=("chunk", "scale"))
def _curvature_vmapped(masks, rest, targets, X, cos, sin, lam, chunk, scale):
    """|lambda_max| of each group's (mini-batch) loss Hessian at its M_0, by power iteration."""
    vg = make_value_and_grad(chunk, scale)

    def one(m, r, t):
        return gd.curvature_estimate(vg, m, (r, X, cos, sin, t, lam), _CURVATURE_ITERS)

    return jax.vmap(one)(masks, rest, targets)


def _tree_index(tree, i: int):
    return jax.tree.map(lambda a: a[i], tree)


@dataclasses.dataclass
class QKSolution:
    """The relaxed masks (full weight shapes) and what the descent did, per KV group."""

    mask_q: jax.Array  # (H*hd, hidden), M_T
    mask_k: jax.Array  # (KV*hd, hidden)
    losses: np.ndarray  # (G, rounds, steps_per_round + 1): each round's mini-batch losses
    step_sizes: np.ndarray  # (G, rounds, steps_per_round)
    eta: np.ndarray  # (G,): the (first) eta of each group
    lipschitz: np.ndarray | None  # (G,): certified L on the box (rule "certified")
    rule: str
    seconds: float

    @property
    def n_increases(self) -> int:
        rises = np.diff(self.losses, axis=-1)
        tol = np.stack([gd.descent_tolerance(l) for l in self.losses.reshape(-1, self.losses.shape[-1])])
        return int(np.sum(~np.isfinite(rises.reshape(tol.shape)) | (rises.reshape(tol.shape) > tol)))


def validate_solver_options(
    lam: float, eta: float | None, steps: int, step_rule: str, window_batch: int | None,
    window_chunk: int | None,
) -> None:
    """Cheap checks of the non-linear options (before any model is loaded)."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"--lambda must be a finite number >= 0 (the paper uses 0.05), got {lam!r}")
    if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta > 0)):
        raise ValueError(f"--eta must be a finite number > 0 (the paper uses 0.005), got {eta!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"--steps must be an integer >= 1 (the paper uses 100), got {steps!r}")
    if step_rule not in STEP_RULES:
        raise ValueError(f"unknown --step-rule {step_rule!r}; use one of {', '.join(STEP_RULES)}")
    for flag, v in (("--window-batch", window_batch), ("--window-chunk", window_chunk)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{flag} must be an integer >= 1 (or left out), got {v!r}")


def _windows_plan(n: int, window_batch: int | None, window_chunk: int | None) -> tuple[int, int | None]:
    batch = n if window_batch is None else int(window_batch)
    if batch > n or n % batch:
        raise ValueError(
            f"--window-batch {batch} must divide the {n} calibration windows (each step uses the "
            "next batch of windows, cycling); pick a divisor of --nsamples."
        )
    chunk = None if window_chunk is None or window_chunk >= batch else int(window_chunk)
    if chunk is not None and batch % chunk:
        raise ValueError(
            f"--window-chunk {chunk} must divide the windows per step ({batch}); pick a divisor."
        )
    return batch, chunk


def solve_qk(
    attn: Attention,
    X: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    *,
    lam: float = PAPER_LAMBDA,
    steps: int = 100,
    step_rule: str = "fixed",
    eta: float | None = None,
    init: tuple[jax.Array, jax.Array] | None = None,
    project: bool = False,
    window_batch: int | None = None,
    window_chunk: int | None = None,
    eta_relative: bool = False,
    straight_through: SparsityPattern | None = None,
    vmap: bool = True,
) -> QKSolution:
    """Algorithm 1 on every KV group of one layer's attention, on inputs X (windows, seq, hidden).

    ``init``: None = all ones (the dense model), else (mask_q, mask_k) in weight shapes.
    ``window_batch``: windows per step (None = all: full-batch GD); the steps cycle through
    the batches in order, each batch's loss scaled by n / b. ``window_chunk``: windows per
    gradient chunk (memory; the dense target is then recomputed per chunk instead of stored).
    ``vmap=False`` solves the groups one by one (a reference for the vmapped path).
    The ``certified`` rule projects onto [0, 1] (its bound holds on that box).
    ``eta_relative``: eta is in units of 1 / RMS of each group's initial attention gradient
    (on the first mini-batch), so one value transfers across layers whose loss scales differ.
    ``straight_through``: the params are scores (``init`` is required: a ranking) and each
    step's attention sees their binarised masks under this pattern (top-k per row); the
    gradient passes straight through. The loss is then piecewise constant in the scores, so
    only the fixed rule applies, and the regulariser is dropped (the binary masks' norm is
    fixed by the sparsity).
    """
    validate_solver_options(lam, eta, steps, step_rule, window_batch, window_chunk)
    if straight_through is not None:
        if step_rule not in ("fixed", "backtracking"):
            raise ValueError(
                f"--straight-through runs with --step-rule backtracking or fixed, not {step_rule}: "
                "its loss is piecewise constant in the scores, so no bound can certify a step."
            )
        if step_rule == "backtracking" and eta is None:
            raise ValueError("--straight-through with --step-rule backtracking needs --eta (its first try)")
        if init is None:
            raise ValueError("--straight-through needs a ranking to start from: use --mask-init wanda.")
        lam = 0.0
    start = time.perf_counter()
    X = jnp.asarray(X)
    X = X if jnp.issubdtype(X.dtype, jnp.floating) else X.astype(jnp.float32)  # float64 in tests
    n_win = X.shape[0]
    batch, chunk = _windows_plan(n_win, window_batch, window_chunk)
    project = project or step_rule == "certified"
    groups = split_groups(attn)
    if init is not None:
        groups = with_qk_masks(groups, *(jnp.asarray(m, groups.q_proj.weight.dtype) for m in init))
        if project:
            groups = eqx.tree_at(
                lambda a: (a.q_proj.mask, a.k_proj.mask), groups,
                (jnp.clip(groups.q_proj.mask, 0, 1), jnp.clip(groups.k_proj.mask, 0, 1)),
            )
    masks, rest = partition_masks(groups)
    n_groups = groups.q_proj.weight.shape[0]
    store_target = chunk is None
    targets = None
    if store_target:
        targets = stacked_probs(eqx.combine(_ones_like_masks(masks), rest), X, cos, sin)
    lam_arr = jnp.float32(lam)

    lipschitz = None
    floor = np.zeros(n_groups, np.float32)
    if step_rule == "fixed":
        etas0 = np.full(n_groups, gd.PAPER_REAL_ETA if eta is None else eta)
    elif step_rule == "certified":
        dense = eqx.combine(_ones_like_masks(masks), rest)
        lipschitz = np.array([
            certified_qk_bound(_tree_index(dense, g), X, cos, sin, lam, batch) for g in range(n_groups)
        ])
        if eta is not None and np.any(eta * lipschitz > 1.0):
            g = int(np.argmax(lipschitz))
            raise ValueError(
                f"--eta {eta:g} is rejected by the certified bound: KV group {g} has L = "
                f"{lipschitz[g]:.4g} on the box [0, 1], so the certified step is 1/L = "
                f"{1 / lipschitz[g]:.4g} and eta exceeds it by a factor {eta * lipschitz[g]:.4g}. "
                "Leave --eta out (eta = 1/L per group), or use --step-rule certified_local / "
                "backtracking (guaranteed descent with larger steps), or --step-rule fixed to run "
                "this eta without a guarantee."
            )
        etas0 = 1.0 / lipschitz if eta is None else np.full(n_groups, eta)
    elif step_rule == "certified_local":
        etas0 = np.full(n_groups, gd.PAPER_REAL_ETA if eta is None else eta)
    else:  # backtracking: first try 1/|lambda_max| at M_0 unless eta is given
        if eta is None:
            tb = None if targets is None else targets[:, :batch]
            curv = np.asarray(_curvature_vmapped(masks, rest, tb, X[:batch], cos, sin, lam_arr, chunk, n_win / batch))
            if not np.all(np.isfinite(curv) & (curv > 0)):
                raise ValueError(f"curvature estimate must be finite and > 0, got {curv}")
            etas0 = 1.0 / curv
        else:
            etas0 = np.full(n_groups, eta)

    rounds, per_round = (1, int(steps)) if batch == n_win else (int(steps), 1)
    config = gd.GDConfig(
        steps=per_round, backtracking=step_rule == "backtracking",
        local=step_rule == "certified_local", project=project,
    )
    st = _Static(config, rounds, batch, chunk, n_win / batch, store_target, straight_through)
    if eta_relative:
        if step_rule not in ("fixed", "backtracking") or eta is None or init is None:
            raise ValueError(
                "eta_relative needs the fixed or backtracking rule, a given eta and an init "
                "(at M_0 = 1 the attention gradient is zero)"
            )
        tb = None if targets is None else targets[:, :batch]
        rms = np.asarray(_initial_grad_rms(masks, rest, tb, X[:batch], cos, sin, chunk, n_win / batch, straight_through))
        etas0 = etas0 / np.maximum(rms, np.finfo(np.float32).tiny)
    eta_arr, floor_arr = jnp.asarray(etas0, jnp.float32), jnp.asarray(floor)
    if vmap:
        # On a mesh (nlprune.parallel): the KV groups over the devices, every window on each.
        masks, rest, targets, eta_arr, floor_arr = parallel.shard_groups((masks, rest, targets, eta_arr, floor_arr))
        out_masks, losses, step_sizes = _solve_vmapped(
            masks, rest, targets, eta_arr, floor_arr, *parallel.replicate((X, cos, sin)), lam_arr, st
        )
    else:
        parts = [
            _solve_single(
                _tree_index(masks, g), _tree_index(rest, g),
                None if targets is None else targets[g], eta_arr[g], floor_arr[g], X, cos, sin, lam_arr, st,
            )
            for g in range(n_groups)
        ]
        out_masks = jax.tree.map(lambda *xs: jnp.stack(xs), *[p[0] for p in parts])
        losses = jnp.stack([p[1] for p in parts])
        step_sizes = jnp.stack([p[2] for p in parts])
    mask_q, mask_k = full_masks(out_masks)
    mask_q.block_until_ready()
    solution = QKSolution(
        mask_q, mask_k, np.asarray(losses), np.asarray(step_sizes), np.asarray(etas0),
        lipschitz, step_rule, time.perf_counter() - start,
    )
    if step_rule == "certified":
        chex.assert_equal(
            bool(np.all(solution.eta * lipschitz <= 1.0 + 1e-6)), True,
            custom_message=f"certified step violated: eta * L = {solution.eta * lipschitz}",
        )
    if step_rule != "fixed":
        chex.assert_equal(
            solution.n_increases, 0,
            custom_message=f"{step_rule} rule: the loss rose at {solution.n_increases} step(s)",
        )
    return solution


# --------------------------------------------------------------------------------------------
# The pruning method (paper recipe)
# --------------------------------------------------------------------------------------------


def wanda_init(weight: jax.Array, norms: jax.Array, pattern: SparsityPattern, scores: bool) -> jax.Array:
    """M_0 from Wanda: its binary mask (relaxed forward), or (``scores``, for the
    straight-through forward) its scores |W_ij| ||x_j|| over each row's median, a ranking whose
    top-k is Wanda's mask and whose scale is the same in every row."""
    if not scores:
        return wanda_prune(weight, jnp.square(norms), pattern).mask.astype(jnp.float32)
    s = jnp.abs(weight.astype(jnp.float32)) * norms[None, :]
    return s / jnp.maximum(jnp.median(s, axis=1, keepdims=True), jnp.finfo(jnp.float32).tiny)

_LINEAR_PASSTHROUGH = ("blocksize", "percdamp", "group")  # given only when the user set them


@register_method
class NonLinear(PruningMethod):
    """q/k by the non-linear attention objective, every other linear by ``linear_method``.

    The pipeline calls :meth:`prune_qk` for q/k (it needs the layer's raw inputs, cos/sin and
    the layer); ``prune``/``prune_many`` prune with the linear fill-in method (v, o, gate,
    up, down). ``blocksize``/``percdamp``/``group`` are passed to the fill-in when set.
    """

    name = "nonlinear"
    needs_hessian = False  # of the default fill-in; see needs_hessian_for
    default_options = {
        "recipe": "paper",  # a preset of the options below (RECIPES); given options win
        "linear_method": "wanda",
        "lam": PAPER_LAMBDA,
        # None: PAPER_DEFAULTS, or STE_DEFAULTS with straight_through. An eta left None is the
        # rule's: the paper's 0.005 (fixed, certified_local's first try), 1/L (certified),
        # 1/|lambda_max| (backtracking)
        "eta": None,
        "step_rule": None,
        "steps": None,
        "mask_init": None,
        "binarize": "row",
        "project": False,
        # windows per GD step (cycling); None = all. 1 measured as good as full batch per step
        # on SmolLM2 layers at 1/8 of the cost (scripts/nonlinear_layers.py)
        "window_batch": 1,
        "window_chunk": None,  # windows per gradient chunk (memory); None = all at once
        "eta_relative": None,  # eta in units of 1 / RMS(initial gradient), per KV group
        "straight_through": False,  # binary masks in the forward pass, STE gradients to scores
        # beyond the paper (nonlinear_output.py, refit.py): "output" chooses q, k, v and o by
        # the attention output softmax(QK^T) V W_O (needs straight_through)
        "objective": "probs",
        "refit": False,  # re-fit the kept weights once the masks are fixed
        "refit_steps": None,  # None: REFIT_DEFAULTS
        "refit_eta": None,
        "refit_cg": None,
        "blocksize": None,
        "percdamp": None,
        "group": None,
    }

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []  # one per prune_qk call (diagnostics)

    # -- options ------------------------------------------------------------------------------

    def resolve_options(self, **options: Any) -> dict[str, Any]:
        recipe = options.get("recipe", self.default_options["recipe"])
        if recipe not in RECIPES:
            raise ValueError(f"unknown --recipe {recipe!r}; use one of {', '.join(RECIPES)}")
        options = super().resolve_options(**{**RECIPES[recipe], **options})
        for key, value in (STE_DEFAULTS if options["straight_through"] else PAPER_DEFAULTS).items():
            if options[key] is None:
                options[key] = value
        if options["linear_method"] not in LINEAR_METHODS:
            raise ValueError(
                f"unknown --linear-method {options['linear_method']!r}; use one of {', '.join(LINEAR_METHODS)}"
            )
        if options["mask_init"] not in MASK_INITS:
            raise ValueError(f"unknown --mask-init {options['mask_init']!r}; use one of {', '.join(MASK_INITS)}")
        if options["binarize"] not in gd.BINARIZE_MODES:
            raise ValueError(f"unknown --binarize {options['binarize']!r}; use one of {', '.join(gd.BINARIZE_MODES)}")
        validate_solver_options(
            options["lam"], options["eta"], options["steps"], options["step_rule"],
            options["window_batch"], options["window_chunk"],
        )
        if options["straight_through"]:
            problems = [
                f"--step-rule {options['step_rule']} (use backtracking or fixed: the loss is piecewise "
                "constant in the scores, no bound certifies a step)"
                if options["step_rule"] not in ("fixed", "backtracking") else None,
                f"--mask-init {options['mask_init']} (use wanda: it needs a ranking to start from)"
                if options["mask_init"] != "wanda" else None,
                f"--binarize {options['binarize']} (use row: each step binarises per row)"
                if options["binarize"] != "row" else None,
            ]
            problems = [p for p in problems if p]
            if problems:
                raise ValueError(f"--straight-through does not work with {'; '.join(problems)}")
        if options["eta_relative"]:
            if options["step_rule"] not in ("fixed", "backtracking"):
                raise ValueError(f"--eta-relative applies to --step-rule fixed or backtracking, not {options['step_rule']}")
            if options["eta"] is None:
                raise ValueError("--eta-relative needs --eta (in units of 1 / RMS of the initial gradient)")
            if options["mask_init"] == "ones":
                raise ValueError("--eta-relative needs --mask-init wanda: at M_0 = 1 the attention gradient is zero")
        self._validate_variants(options)
        self._linear(options)  # the fill-in validates its own options now, not at layer 0
        return options

    @staticmethod
    def _validate_variants(options: dict[str, Any]) -> None:
        """--objective and --refit*: checked before any model is loaded; fills the refit defaults."""
        if options["objective"] not in OBJECTIVES:
            raise ValueError(f"unknown --objective {options['objective']!r}; use one of {', '.join(OBJECTIVES)}")
        if options["objective"] == "output":
            if not options["straight_through"]:
                raise ValueError(
                    "--objective output needs --straight-through: the masks of q, k, v and o are found from "
                    "Wanda's rankings by straight-through descent on the binary masks' output error"
                )
            if options["window_chunk"] is not None:
                raise ValueError("--window-chunk is not supported with --objective output (use --window-batch)")
            if not options["eta_relative"]:
                raise ValueError("--objective output takes eta relative to each tensor's initial gradient (--eta-relative)")
        given = [f"--{k.replace('_', '-')}" for k in REFIT_DEFAULTS if options[k] is not None]
        if given and not options["refit"]:
            raise ValueError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} only with --refit")
        if not options["refit"]:
            return
        for key, value in REFIT_DEFAULTS.items():
            if options[key] is None:
                options[key] = value
        steps, eta, cg = options["refit_steps"], options["refit_eta"], options["refit_cg"]
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"--refit-steps must be an integer >= 0 (0: no gradient refit of q/k), got {steps!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"--refit-eta must be a finite number > 0 (a fraction of RMS(W)), got {eta!r}")
        if isinstance(cg, bool) or not isinstance(cg, (int, np.integer)) or cg < 0:
            raise ValueError(f"--refit-cg must be an integer >= 0, got {cg!r}")

    def _linear(self, options: dict[str, Any]) -> tuple[PruningMethod, dict[str, Any]]:
        method = get_method(options["linear_method"])
        passed = {k: options[k] for k in _LINEAR_PASSTHROUGH if options.get(k) is not None}
        try:
            return method, method.resolve_options(**passed)
        except TypeError:
            raise ValueError(
                f"--linear-method {method.name} does not take {sorted(passed)}: --blocksize/"
                "--percdamp are sparsegpt's, --group is magnitude's."
            ) from None

    def needs_hessian_for(self, options: dict[str, Any]) -> bool:
        """Whether the calibration statistics need X^T X (the fill-in or --refit)."""
        return bool(options.get("refit")) or self._linear(options)[0].needs_hessian

    def comparison_group(self, pattern: SparsityPattern, **options: Any) -> tuple[str, int]:
        method, lin_opts = self._linear(options)
        return method.comparison_group(pattern, **lin_opts)

    # -- the linear fill-in (v, o, gate, up, down) --------------------------------------------

    def _prune(self, weight, stats, pattern, **options) -> PruneResult:
        return self._prune_many([weight], stats, pattern, **options)[0]

    def _prune_many(self, weights: Sequence[jax.Array], stats: LayerStats, pattern, **options) -> list[PruneResult]:
        method, lin_opts = self._linear(options)
        # check=False: prune_many of this method already checks in the fill-in's group
        results = method.prune_many(weights, stats, pattern, check=False, **lin_opts)
        if options["refit"]:
            results = self._refit_linear(weights, [r.mask for r in results], stats, options, results)
        return results

    def _refit_linear(self, weights, masks, stats, options, results=None, targets=None) -> list[PruneResult]:
        """Least squares on fixed masks: SparseGPT's update (already done by a sparsegpt
        fill-in, whose weights ``results`` are then kept), then ``refit_cg`` CG steps."""
        percdamp = options["percdamp"] if options["percdamp"] is not None else 0.01
        blocksize = options["blocksize"] if options["blocksize"] is not None else DEFAULT_BLOCKSIZE
        targets = weights if targets is None else targets
        if results is None or options["linear_method"] != "sparsegpt" or targets is not weights:
            results = rf.obs_refit(weights, masks, stats, percdamp=percdamp, blocksize=blocksize, targets=targets)
        return rf.cg_polish(results, targets, stats, options["refit_cg"], percdamp)

    # -- the attention output projection (pipeline hook) --------------------------------------

    def prune_group(self, input_group, layer, dense_layer, stats, pattern, hidden=None, cos=None, sin=None,
                    batch_size: int = 8, **options) -> list[PruneResult] | None:
        """o_proj when the q/k hook already chose its mask (``objective="output"``) or when
        ``refit`` re-fits it towards the dense attention output (``hidden``: the layer's
        calibration inputs; without them, towards its own input's output); None otherwise
        (the pipeline prunes the group with :meth:`prune_many`)."""
        options = self.resolve_options(**options)
        if input_group == "down" and options["refit"] and REFIT_DOWN_TARGET == "dense" and hidden is not None:
            return self._prune_down(layer, dense_layer, stats, pattern, hidden, cos, sin, batch_size, options)
        if input_group != "o" or not (options["objective"] == "output" or options["refit"]):
            return None
        o = dense_layer.self_attn.o_proj
        if options["objective"] == "output":
            mask = layer.self_attn.o_proj.mask
        else:
            method, lin_opts = self._linear(options)
            mask = method.prune_many([o.effective_weight], stats, pattern, check=False, **lin_opts)[0].mask
        result = nlo.o_stage(
            layer, dense_layer, stats, hidden, cos, sin, batch_size, mask, refit=options["refit"], corrected=REFIT_O_TARGET == "dense",
            percdamp=options["percdamp"] if options["percdamp"] is not None else 0.01,
            blocksize=options["blocksize"] if options["blocksize"] is not None else DEFAULT_BLOCKSIZE,
            cg_iters=options["refit_cg"],
        )
        group_kind = "row" if options["objective"] == "output" else self.comparison_group(pattern, **options)[0]
        check_result(result, o.weight, pattern, group_kind, DEFAULT_BLOCKSIZE if group_kind == "row" else
                     self.comparison_group(pattern, **options)[1])
        return [result]

    def _prune_down(self, layer, dense_layer, stats, pattern, hidden, cos, sin, batch_size, options):
        """down_proj under --refit: the fill-in's mask, then least squares towards the dense
        MLP's output on the same residual stream (:func:`nonlinear_output.down_stage`)."""
        method, lin_opts = self._linear(options)
        w0 = dense_layer.mlp.down_proj.effective_weight
        (first,) = method.prune_many([w0], stats, pattern, check=False, **lin_opts)
        (result,) = nlo.down_stage(
            layer, dense_layer, stats, hidden, cos, sin, batch_size, [w0], [first.mask],
            percdamp=options["percdamp"] if options["percdamp"] is not None else 0.01,
            blocksize=options["blocksize"] if options["blocksize"] is not None else DEFAULT_BLOCKSIZE,
            cg_iters=options["refit_cg"],
        )
        group, blocksize = self.comparison_group(pattern, **options)
        check_result(result, w0, pattern, group, blocksize)
        return [result]

    # -- q/k: the non-linear objective --------------------------------------------------------

    def prune_qk(
        self,
        layer: DecoderLayer,
        inputs: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        pattern: SparsityPattern,
        **options: Any,
    ) -> dict[str, PruneResult]:
        """Masks for q_proj and k_proj from the layer's attention inputs (windows, seq, hidden)."""
        options = self.resolve_options(**options)
        attn = layer.self_attn
        wq, wk = attn.q_proj.weight, attn.k_proj.weight
        for w, what in ((wq, "q_proj"), (wk, "k_proj")):
            pattern.check_width(w.shape[1], what)
        if options["objective"] == "output":
            return self._prune_attention_output(layer, inputs, cos, sin, pattern, options)
        init = None
        if options["mask_init"] == "wanda":
            norms = LayerStats.from_inputs(inputs, with_hessian=False).norms
            init = tuple(wanda_init(w, norms, pattern, options["straight_through"]) for w in (wq, wk))
        sol = solve_qk(
            attn, inputs, cos, sin, lam=options["lam"], steps=options["steps"],
            step_rule=options["step_rule"], eta=options["eta"], init=init, project=options["project"],
            window_batch=options["window_batch"], window_chunk=options["window_chunk"],
            eta_relative=options["eta_relative"],
            straight_through=pattern if options["straight_through"] else None,
        )
        how = options["binarize"]
        group = "matrix" if how == "matrix" else "row"
        masks = {
            name: gd.binarize(m, getattr(attn, name).effective_weight, pattern, how)
            for name, m in (("q_proj", sol.mask_q), ("k_proj", sol.mask_k))
        }
        weights = {"q_proj": jnp.where(masks["q_proj"], wq, 0), "k_proj": jnp.where(masks["k_proj"], wk, 0)}
        refit_report = None
        if options["refit"] and options["refit_steps"] > 0:  # gradient steps on the kept q/k weights
            weights, rsol = nlo.refit_attention(
                attn, inputs, cos, sin, masks, ("q_proj", "k_proj"), objective="probs",
                steps=options["refit_steps"], eta=options["refit_eta"], window_batch=options["window_batch"],
            )
            refit_report = rsol.report()
        results = {}
        for name, w in (("q_proj", wq), ("k_proj", wk)):
            result = PruneResult(masks[name], weights[name].astype(w.dtype))
            check_result(result, w, pattern, group, DEFAULT_BLOCKSIZE)
            results[name] = result
        self.reports.append(
            {
                "seconds": sol.seconds, "rule": sol.rule, "eta": sol.eta.tolist(),
                "loss_first": sol.losses[:, 0, 0].tolist(), "loss_last": sol.losses[:, -1, -1].tolist(),
                "n_increases": sol.n_increases,
                "lipschitz": None if sol.lipschitz is None else sol.lipschitz.tolist(),
                **({"refit": refit_report} if refit_report is not None else {}),
            }
        )
        return results

    def _prune_attention_output(self, layer, inputs, cos, sin, pattern, options) -> dict[str, PruneResult]:
        """``objective="output"``: q, k, v and o masks (and, with refit, q/k/v weights) from
        the attention output (:func:`nlprune.prune.nonlinear_output.prune_attention_output`).
        v is re-fitted by gradient steps only; o's least-squares refit waits for its pruned
        input (:meth:`prune_group`)."""
        attn = layer.self_attn
        for name in nlo.ATTN_LINEARS:
            pattern.check_width(getattr(attn, name).weight.shape[1], name)
        out, report = nlo.prune_attention_output(
            attn, inputs, cos, sin, pattern, steps=options["steps"], eta=options["eta"],
            window_batch=options["window_batch"], step_rule=options["step_rule"],
            refit=options["refit"] and options["refit_steps"] > 0, refit_steps=options["refit_steps"],
            refit_eta=options["refit_eta"],
        )
        results = {}
        for name, (mask, weight) in out.items():
            result = PruneResult(mask, weight)
            check_result(result, getattr(attn, name).weight, pattern, "row", DEFAULT_BLOCKSIZE)
            results[name] = result
        self.reports.append({"rule": options["step_rule"], **report})
        return results
