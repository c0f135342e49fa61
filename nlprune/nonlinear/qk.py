"""The q/k solve: Algorithm 1 on every KV group of one real Llama layer at once.

The merged-W form (:mod:`nlprune.nonlinear.objective`) masks W = W_Q W_K^T, which sparsifies
no stored weight. Here the masks sit on the weights themselves: one mask per row of
``q_proj`` and of ``k_proj`` (shaped like the weights), and the attention is computed exactly
as the model computes it (RoPE, the 1/sqrt(hd) scale, the causal mask, GQA) by the model's
own ``Attention.project_qk`` and ``Attention.attention_probs``. For one layer with
calibration inputs X_1..X_k (input_layernorm(h) of each window):

    L(M_Q, M_K) = sum_i sum_heads 1/2 ||P_i(M_Q, M_K) - P_i(1, 1)||_F^2
                  + lam/2 (||M_Q||_F^2 + ||M_K||_F^2)

differentiated with JAX. Each KV group is an independent problem (:mod:`groups`); the mask
leaves are selected with ``eqx.partition`` and all groups run Algorithm 1
(:func:`nlprune.nonlinear.descent.gd_core` and its step rules) at once under ``jax.vmap`` inside
one ``jit``. Each step may see a mini-batch of the windows (``window_batch``, its loss scaled
to full-batch units) and the gradient may be accumulated over chunks of windows
(``window_chunk``, bounded memory at long seqlen).

Step rules on real layers (the factorised form has no global Lipschitz constant):
  ``fixed``           the paper's eta (0.005 on real models); nothing guaranteed.
  ``certified``       eta = 1/L with L certified on the box [0, 1] of masks
                      (:func:`nlprune.nonlinear.lipschitz.certified_qk_bound`); the masks are
                      projected onto [0, 1] after every step, so the descent lemma applies.
  ``certified_local`` each step certified on the segment it travels
                      (:func:`nlprune.nonlinear.lipschitz.make_segment_bound`).
  ``backtracking``    Armijo: every accepted step descends.

Straight-through (``straight_through``; beyond the paper): the params are scores (initialised
from Wanda's, a ranking whose top-k is Wanda's mask), each step's attention sees their top-k
binary mask and the gradient with respect to that mask is applied to the scores. The forward
is exact, so backtracking on the mini-batch's loss still applies. eta may be relative to the
initial gradient's RMS (``eta_relative``), so one value fits every layer. Why this variant
exists (the relaxed recipe's failure on SmolLM2) is measured in BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from nlprune import parallel
from nlprune.modeling.llama import Attention
from nlprune.nonlinear import descent
from nlprune.nonlinear.curvature import curvature_estimate
from nlprune.nonlinear.groups import (
    full_masks,
    group_probs,
    ones_like_masks,
    partition_masks,
    split_groups,
    sq_norm,
    stacked_probs,
    straight_through,
    tree_index,
    window_chunks,
    with_qk_masks,
)
from nlprune.nonlinear.lipschitz import certified_qk_bound, make_segment_bound
from nlprune.nonlinear.options import PAPER_LAMBDA, validate_solver_options
from nlprune.sparsity import SparsityPattern


_CURVATURE_ITERS = 20  # power iterations for the backtracking rule's first eta


def _attention_loss(masks: Attention, rest: Attention, X, cos, sin, target) -> jax.Array:
    """sum over windows and the group's heads of 1/2 ||P(M) - P(1)||_F^2.

    ``target=None`` recomputes the dense attention here (memory O(windows in this call))."""
    if target is None:
        dense = eqx.combine(ones_like_masks(masks), rest)
        target = jax.lax.stop_gradient(group_probs(dense, X, cos, sin))
    p = group_probs(eqx.combine(masks, rest), X, cos, sin)
    return 0.5 * jnp.sum((p - target) ** 2)


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
            Xc, Tc = window_chunks(X, target, chunk)

            def body(acc, xs):
                v, g = vg_att(masks, rest, xs[0], cos, sin, xs[1])
                return (acc[0] + v, jax.tree.map(jnp.add, acc[1], g)), None

            zero = (jnp.zeros((), X.dtype), jax.tree.map(jnp.zeros_like, masks))
            (value, grad), _ = jax.lax.scan(body, zero, (Xc, Tc))
        value = scale * value + 0.5 * lam * sq_norm(masks)
        grad = jax.tree.map(lambda g, m: scale * g + lam * m, grad, masks)
        return value, grad

    return value_and_grad


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static settings of one compiled solve (hashable)."""

    config: descent.GDConfig
    rounds: int  # mini-batch rounds (1 = full batch)
    batch: int  # windows per step
    chunk: int | None  # windows per gradient chunk
    scale: float  # n / batch
    store_target: bool  # every window's dense targets built once, before the descent
    ste: SparsityPattern | None  # straight-through forward (None = relaxed masks, the paper's)
    round_targets: bool = False  # not stored, unchunked: each round builds its windows' targets


def _solve_one(masks, rest, target, eta, floor, X, cos, sin, lam, st: _Static):
    """Algorithm 1 for one KV group: ``rounds`` calls of gd_core, each on the next mini-batch."""
    vg = make_value_and_grad(st.chunk, st.scale, st.ste)
    seg = make_segment_bound(st.chunk, st.scale) if st.config.local else None

    def run(params, Xb, Tb):
        return descent.gd_core(vg, params, (rest, Xb, cos, sin, Tb, lam), eta, st.config, seg, floor)

    make_target = None
    if st.round_targets:
        dense = eqx.combine(ones_like_masks(masks), rest)

        def make_target(Xb):
            return jax.lax.stop_gradient(group_probs(dense, Xb, cos, sin))

    return descent.minibatch_rounds(run, masks, X, target, st.batch, st.rounds, make_target)


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
        return curvature_estimate(vg, m, (r, X, cos, sin, t, lam), _CURVATURE_ITERS)

    return jax.vmap(one)(masks, rest, targets)


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
    def increases(self) -> np.ndarray:
        """(G,): steps whose loss rose by more than float tolerance, per KV group (a step's
        loss is that of its own mini-batch, before and after the step)."""
        g = self.losses.shape[0]
        rows = self.losses.reshape(g, -1, self.losses.shape[-1])
        up = [
            np.sum(~np.isfinite(np.diff(r)) | (np.diff(r) > descent.descent_tolerance(r)))
            for group in rows for r in group
        ]
        return np.asarray(up, int).reshape(g, -1).sum(-1)

    @property
    def n_increases(self) -> int:
        return int(self.increases.sum())

    def report(self) -> dict[str, Any]:
        """Per KV group: the loss at step 0, its minimum, its final value, how many steps
        rose; full-batch runs also keep the whole trajectory (it is one loss)."""
        full_batch = self.losses.shape[1] == 1
        return {
            "seconds": self.seconds, "rule": self.rule, "eta": self.eta.tolist(),
            "loss_first": self.losses[:, 0, 0].tolist(), "loss_last": self.losses[:, -1, -1].tolist(),
            "loss_min": self.losses.min(axis=(1, 2)).tolist(), "increases": self.increases.tolist(),
            "n_increases": self.n_increases, "steps": int(self.step_sizes[0].size),
            "lipschitz": None if self.lipschitz is None else self.lipschitz.tolist(),
            **({"losses": self.losses[:, 0, :].tolist()} if full_batch else {}),
        }


def windows_plan(n: int, window_batch: int | None, window_chunk: int | None = None) -> tuple[int, int | None]:
    """(windows per step, windows per gradient chunk or None) for ``n`` calibration windows."""
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


def step_rounds(n: int, batch: int, steps: int) -> tuple[int, int]:
    """(rounds, steps per round): full batch is one round of all the steps; mini-batches take
    one step per round, each round on the next batch."""
    return (1, int(steps)) if batch == n else (int(steps), 1)


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
    recompute_targets: bool = False,
    vmap: bool = True,
) -> QKSolution:
    """Algorithm 1 on every KV group of one layer's attention, on inputs X (windows, seq, hidden).

    ``init``: None = all ones (the dense model), else (mask_q, mask_k) in weight shapes.
    ``window_batch``: windows per step (None = all: full-batch GD); the steps cycle through
    the batches in order, each batch's loss scaled by n / b. ``window_chunk``: windows per
    gradient chunk (memory; the dense target is then recomputed per chunk instead of stored).
    ``recompute_targets``: the dense targets are not stored for every window but built for
    each step's windows (memory of ``window_batch`` windows instead of all; the same loss, one
    extra dense forward per step).
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
        _check_straight_through(step_rule, eta, init)
        lam = 0.0
    start = time.perf_counter()
    X = jnp.asarray(X)
    X = X if jnp.issubdtype(X.dtype, jnp.floating) else X.astype(jnp.float32)  # float64 in tests
    n_win = X.shape[0]
    batch, chunk = windows_plan(n_win, window_batch, window_chunk)
    project = project or step_rule == "certified"
    masks, rest = partition_masks(_initial_groups(attn, init, project))
    store_target = chunk is None and not recompute_targets
    targets = None
    if store_target:
        targets = stacked_probs(eqx.combine(ones_like_masks(masks), rest), X, cos, sin)
    lam_arr = jnp.float32(lam)
    first = (masks, rest, None if targets is None else targets[:, :batch], X[:batch], cos, sin)
    etas0, lipschitz = _first_steps(step_rule, eta, lam, first, X, chunk, n_win / batch)

    rounds, per_round = step_rounds(n_win, batch, steps)
    config = descent.GDConfig(
        steps=per_round, backtracking=step_rule == "backtracking",
        local=step_rule == "certified_local", project=project,
    )
    st = _Static(config, rounds, batch, chunk, n_win / batch, store_target, straight_through,
                 round_targets=not store_target and chunk is None)
    if eta_relative:
        etas0 = _relative_etas(etas0, step_rule, eta, init, first, chunk, n_win / batch, straight_through)
    out_masks, losses, step_sizes = _solve_groups(masks, rest, targets, etas0, X, cos, sin, lam_arr, st, vmap)
    mask_q, mask_k = full_masks(out_masks)
    mask_q.block_until_ready()
    solution = QKSolution(
        mask_q, mask_k, np.asarray(losses), np.asarray(step_sizes), np.asarray(etas0),
        lipschitz, step_rule, time.perf_counter() - start,
    )
    _check_descent(solution)
    return solution


def _relative_etas(etas0, step_rule, eta, init, first, chunk, scale, straight_through):
    """eta in units of 1 / RMS of each group's initial attention gradient."""
    if step_rule not in ("fixed", "backtracking") or eta is None or init is None:
        raise ValueError(
            "eta_relative needs the fixed or backtracking rule, a given eta and an init "
            "(at M_0 = 1 the attention gradient is zero)"
        )
    rms = np.asarray(_initial_grad_rms(*first, chunk, scale, straight_through))
    return etas0 / np.maximum(rms, np.finfo(np.float32).tiny)


def _check_descent(solution: QKSolution) -> None:
    """Every rule but the paper's promises descent: checked, not assumed."""
    if solution.rule != "fixed":
        chex.assert_equal(
            solution.n_increases, 0,
            custom_message=f"{solution.rule} rule: the loss rose at {solution.n_increases} step(s)",
        )


def _check_straight_through(step_rule: str, eta: float | None, init) -> None:
    if step_rule not in ("fixed", "backtracking"):
        raise ValueError(
            f"--straight-through runs with --step-rule backtracking or fixed, not {step_rule}: "
            "its loss is piecewise constant in the scores, so no bound can certify a step."
        )
    if step_rule == "backtracking" and eta is None:
        raise ValueError("--straight-through with --step-rule backtracking needs --eta (its first try)")
    if init is None:
        raise ValueError("--straight-through needs a ranking to start from: use --mask-init wanda.")


def _initial_groups(attn: Attention, init, project: bool) -> Attention:
    """The layer's KV groups with their starting masks: all ones (init None) or ``init``'s,
    clipped to [0, 1] when the descent projects onto that box."""
    groups = split_groups(attn)
    if init is None:
        return groups
    groups = with_qk_masks(groups, *(jnp.asarray(m, groups.q_proj.weight.dtype) for m in init))
    if project:
        groups = eqx.tree_at(
            lambda a: (a.q_proj.mask, a.k_proj.mask), groups,
            (jnp.clip(groups.q_proj.mask, 0, 1), jnp.clip(groups.k_proj.mask, 0, 1)),
        )
    return groups


def _first_steps(step_rule: str, eta: float | None, lam: float, first, X, chunk, scale: float):
    """(each group's first step size, the certified bounds or None) under ``step_rule``;
    ``first`` is (masks, rest, the first batch's targets, its windows, cos, sin)."""
    masks, rest, tb, xb, cos, sin = first
    n_groups = jax.tree.leaves(masks)[0].shape[0]
    if step_rule in ("fixed", "certified_local"):
        return np.full(n_groups, descent.PAPER_REAL_ETA if eta is None else eta), None
    if step_rule == "certified":
        dense = eqx.combine(ones_like_masks(masks), rest)
        lipschitz = np.array([
            certified_qk_bound(tree_index(dense, g), X, cos, sin, lam, xb.shape[0]) for g in range(n_groups)
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
        return (1.0 / lipschitz if eta is None else np.full(n_groups, eta)), lipschitz
    if eta is not None:  # backtracking: the given first try
        return np.full(n_groups, eta), None
    # backtracking: first try 1/|lambda_max| at M_0
    curv = np.asarray(_curvature_vmapped(masks, rest, tb, xb, cos, sin, jnp.float32(lam), chunk, scale))
    if not np.all(np.isfinite(curv) & (curv > 0)):
        raise ValueError(f"curvature estimate must be finite and > 0, got {curv}")
    return 1.0 / curv, None


def _solve_groups(masks, rest, targets, etas0, X, cos, sin, lam_arr, st, vmap: bool):
    """Algorithm 1 on every KV group: vmapped (on a mesh, the groups over the devices and
    every window on each), or one group after another (the reference)."""
    floor = jnp.zeros(len(etas0), jnp.float32)
    eta_arr = jnp.asarray(etas0, jnp.float32)
    if vmap:
        masks, rest, targets, eta_arr, floor = parallel.shard_groups((masks, rest, targets, eta_arr, floor))
        return _solve_vmapped(masks, rest, targets, eta_arr, floor, *parallel.replicate((X, cos, sin)), lam_arr, st)
    parts = [
        _solve_single(
            tree_index(masks, g), tree_index(rest, g),
            None if targets is None else targets[g], eta_arr[g], floor[g], X, cos, sin, lam_arr, st,
        )
        for g in range(len(etas0))
    ]
    out_masks = jax.tree.map(lambda *xs: jnp.stack(xs), *[p[0] for p in parts])
    return out_masks, jnp.stack([p[1] for p in parts]), jnp.stack([p[2] for p in parts])
