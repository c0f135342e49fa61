"""Algorithm 1 (gradient descent on a relaxed pruning mask) and mask binarisation.

The loop is generic: it takes ``value_and_grad_fn(params, *args) -> (loss, grads)`` over any
pytree of masks, so the merged-W form here and a per-layer W_Q / W_K form share the scan,
the step rules and the invariants. :func:`gd_core` is the pure-JAX loop (jit- and
vmap-friendly); :func:`gradient_descent` validates inputs, runs it jitted and checks the
invariants on the host; :func:`solve_merged` wires in the merged-W objective.

Step rules
  ``certified``     eta = 1 / L with L a certified Lipschitz constant of grad L; asserts
                    eta * L <= 1 and that the loss never rises (descent lemma), up to float
                    rounding.
  ``backtracking``  curvature from power iteration on Hessian-vector products at M_0, then at
                    every step start from eta = 1 / |lambda_max| and halve until the Armijo
                    condition holds, so every accepted step descends; accepted etas recorded.
  ``fixed``         the paper's eta (synthetic: 0.1 / lam; real models: 0.005); nothing is
                    guaranteed, rises are counted and reported.
  ``certified_local`` every step's eta is *certified* by a curvature bound on the segment
                    it travels (``segment_bound_fn``, e.g.
                    :func:`nlprune.nonlinear.lipschitz.segment_curvature_bound`): start from
                    2x the previous eta, halve until C_D <= ||D||^2 / eta, never below the
                    global 1/L (always certified). Same descent guarantee as ``certified``,
                    with steps sized by the local curvature.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from nlprune.nonlinear.lipschitz import certified_lipschitz_bound, segment_curvature_bound
from nlprune.nonlinear import objective
from nlprune.nonlinear.curvature import curvature_estimate
from nlprune.sparsity import (
    PatternError,
    SparsityPattern,
    assert_mask,
    mask_from_scores,
    parse_pattern,
)

STEP_RULES = ("fixed", "certified", "certified_local", "backtracking")
BINARIZE_MODES = ("row", "matrix", "magnitude")

ValueAndGrad = Callable[..., tuple[jax.Array, Any]]
# (params, direction, *args) -> C_D >= sup_{tau in [0,1]} D^2 L(params + tau D)[D, D]
SegmentBound = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class GDConfig:
    """Static settings of the pure loop (hashable, so it can be a jit static argument)."""

    steps: int
    backtracking: bool = False
    local: bool = False  # certified_local: per-step segment certificate
    project: bool = False  # clip masks to [0, 1] after every step
    armijo_c: float = 1e-4
    shrink: float = 0.5
    growth: float = 2.0  # certified_local: next step's first try is growth x this step's eta
    max_backtracks: int = 40


@dataclasses.dataclass(frozen=True)
class GDResult:
    params: Any  # M_T (same pytree structure as M_0)
    losses: np.ndarray  # (T + 1,): L(M_0), ..., L(M_T)
    step_sizes: np.ndarray  # (T,): eta used at each step (0 = backtracking found no descent)
    rule: str
    lipschitz: float | None  # the certified L the rule relied on, if any
    curvature: float | None  # power-iteration |lambda_max| at M_0 (backtracking)
    n_increases: int  # steps whose loss rose by more than float tolerance
    max_increase: float  # largest single-step rise (0 if none)


def _tree_axpy(a, x, y):
    return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def _tree_sqdist(x, y):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))


def _project(params, enabled: bool):
    return jax.tree.map(lambda m: jnp.clip(m, 0, 1), params) if enabled else params


def _fixed_step(evaluate, propose, eta):
    def step_fn(carry, _):
        p, loss, g, _ = carry
        new = propose(p, g, eta)
        new_loss, new_g = evaluate(new)
        return (new, new_loss, new_g, eta), (new_loss, eta)

    return step_fn


def _backtracking_step(evaluate, propose, eta, config: GDConfig):
    """Every step starts from ``eta`` and shrinks it until the Armijo condition holds."""

    def step_fn(carry, _):
        p, loss, g, _ = carry

        def try_eta(state):
            step, k, _, _, _, _ = state
            cand = propose(p, g, step)
            c_loss, c_g = evaluate(cand)
            ok = jnp.isfinite(c_loss) & (
                c_loss <= loss - config.armijo_c * _tree_sqdist(cand, p) / step
            )
            return jnp.where(ok, step, step * config.shrink), k + 1, cand, c_loss, c_g, ok

        init = (eta, jnp.int32(0), p, loss, g, jnp.bool_(False))
        step, _, cand, c_loss, c_g, ok = jax.lax.while_loop(
            lambda s: (~s[-1]) & (s[1] < config.max_backtracks), try_eta, init
        )
        keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)  # noqa: E731
        new, new_loss, new_g = keep(cand, p), jnp.where(ok, c_loss, loss), keep(c_g, g)
        step = jnp.where(ok, step, jnp.zeros_like(step))
        return (new, new_loss, new_g, step), (new_loss, step)

    return step_fn


def _local_step(evaluate, propose, segment_bound_fn, args, eta_floor, config: GDConfig):
    """Each step tries the carried eta, shrinking until the segment certificate holds."""

    def step_fn(carry, _):
        p, loss, g, prev = carry

        def certified(step):
            cand = propose(p, g, step)
            direction = jax.tree.map(jnp.subtract, cand, p)
            bound = segment_bound_fn(p, direction, *args)
            return cand, jnp.isfinite(bound) & (step * bound <= _tree_sqdist(cand, p))

        def try_eta(state):
            step, k, _, _ = state
            step = jnp.maximum(step, eta_floor)
            cand, ok = certified(step)
            ok = ok | (step <= eta_floor)  # 1/L is certified by the global bound
            return jnp.where(ok, step, step * config.shrink), k + 1, cand, ok

        init = (prev, jnp.int32(0), p, jnp.bool_(False))
        step, _, cand, ok = jax.lax.while_loop(
            lambda s: (~s[-1]) & (s[1] < config.max_backtracks), try_eta, init
        )
        # out of tries (only if eta_floor is 0): stay put rather than take an uncertified step
        step = jnp.where(ok, step, jnp.zeros_like(step))
        new = jax.tree.map(lambda x, y: jnp.where(ok, x, y), cand, p)
        new_loss, new_g = evaluate(new)
        return (new, new_loss, new_g, step * config.growth), (new_loss, step)

    return step_fn


def gd_core(
    value_and_grad_fn: ValueAndGrad,
    params,
    args: tuple,
    eta: jax.Array,
    config: GDConfig,
    segment_bound_fn: SegmentBound | None = None,
    eta_floor: jax.Array | float = 0.0,
):
    """Pure loop: returns (params_T, losses (T+1,), step sizes (T,)).

    Fixed-eta rules use ``eta`` at every step. With ``config.backtracking`` every step starts
    from ``eta`` and shrinks it until L(M+) <= L(M) - c ||M+ - M||^2 / eta (Armijo; for
    the unprojected step this is L(M) - c eta ||g||^2). With ``config.local`` the first step
    tries ``eta``, later ones ``growth`` x the previous eta, shrinking until
    ``segment_bound_fn`` certifies C_D <= ||D||^2 / eta, and falling back to ``eta_floor``
    (= 1/L, certified globally). Gradients are carried, so each step costs one evaluation
    (plus the rejected trials).
    """

    def evaluate(p):
        return value_and_grad_fn(p, *args)

    loss0, g0 = evaluate(params)
    eta = jnp.asarray(eta, dtype=loss0.dtype)
    eta_floor = jnp.asarray(eta_floor, dtype=loss0.dtype)

    def propose(p, g, step):
        return _project(_tree_axpy(-step, g, p), config.project)

    if config.local:
        if segment_bound_fn is None:
            raise ValueError("the certified_local rule needs segment_bound_fn")
        step_fn = _local_step(evaluate, propose, segment_bound_fn, args, eta_floor, config)
    elif config.backtracking:
        step_fn = _backtracking_step(evaluate, propose, eta, config)
    else:
        step_fn = _fixed_step(evaluate, propose, eta)
    # the carry's last slot is the first eta the next step tries (local rule)
    (p_T, *_), (losses, etas) = jax.lax.scan(
        step_fn, (params, loss0, g0, eta), None, length=config.steps
    )
    return p_T, jnp.concatenate([loss0[None], losses]), etas


def minibatch_rounds(run, params, X: jax.Array, target, batch: int, rounds: int, make_target=None):
    """Algorithm 1 on mini-batches: ``rounds`` calls of ``run(params, X_b, target_b)`` (each a
    :func:`gd_core` of a few steps) on the next ``batch`` windows, cycling; one call on all
    windows when ``batch`` is their number. Returns (params, losses (rounds, steps + 1),
    step sizes (rounds, steps)). ``target`` may be None: then ``make_target(X_b)`` builds each
    round's targets when given (memory of one batch, not of every window), else ``run``
    recomputes them itself."""
    def targets_of(Xb, Tb):
        return make_target(Xb) if Tb is None and make_target is not None else Tb

    if batch == X.shape[0]:  # full batch: one gd_core call of all the steps
        p, losses, etas = run(params, X, targets_of(X, target))
        return p, losses[None], etas[None]
    n_batches = X.shape[0] // batch

    def round_(p, r):
        start = (r % n_batches) * batch
        Xb = jax.lax.dynamic_slice_in_dim(X, start, batch)
        Tb = None if target is None else jax.lax.dynamic_slice_in_dim(target, start, batch)
        p, losses, etas = run(p, Xb, targets_of(Xb, Tb))
        return p, (losses, etas)

    p, (losses, etas) = jax.lax.scan(round_, params, jnp.arange(rounds))
    return p, losses, etas


_gd_core_jit = jax.jit(gd_core, static_argnums=(0, 4, 5))
_curvature_jit = jax.jit(curvature_estimate, static_argnums=(0, 3))


def descent_tolerance(losses: np.ndarray, rtol: float | None = None) -> np.ndarray:
    """Per-step float tolerance on a rise: rtol * max(|L_t|, |L_t+1|, tiny)."""
    if rtol is None:
        rtol = 100 * float(np.finfo(losses.dtype).eps)
    scale = np.maximum(np.abs(losses[:-1]), np.abs(losses[1:]))
    return rtol * np.maximum(scale, np.finfo(losses.dtype).tiny)


def _validate_common(steps: int, rule: str, eta: float | None) -> None:
    if rule not in STEP_RULES:
        raise ValueError(f"unknown step rule {rule!r}; use one of {STEP_RULES}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps (T) must be an integer >= 1, got {steps!r}")
    if eta is not None and not (math.isfinite(eta) and eta > 0):
        raise ValueError(f"step size eta must be a finite number > 0, got {eta}")


def _rule_eta(rule: str, eta: float | None, lipschitz: float | None, require_certified: bool,
              segment_bound_fn, local_first_eta_factor: float) -> float | None:
    """The step size a rule starts from, or an error naming what the rule is missing; the
    backtracking rule's comes later, from the curvature."""
    if lipschitz is not None and not (math.isfinite(lipschitz) and lipschitz > 0):
        raise ValueError(f"lipschitz must be a finite number > 0, got {lipschitz}")
    needs_bound = rule in ("certified", "certified_local") or (
        rule == "fixed" and require_certified
    )
    if needs_bound and lipschitz is None:
        raise ValueError(f"rule {rule!r} with a certified guarantee needs `lipschitz` (L)")
    if rule == "certified_local" and segment_bound_fn is None:
        raise ValueError("rule 'certified_local' needs segment_bound_fn (a per-step certificate)")
    if rule == "certified_local":
        eta = local_first_eta_factor / lipschitz if eta is None else eta
    elif needs_bound:
        eta = 1.0 / lipschitz if eta is None else eta
        if eta * lipschitz > 1.0:
            raise ValueError(
                f"eta = {eta:g} exceeds the certified step 1/L = {1.0 / lipschitz:g} "
                f"(L = {lipschitz:g}) by a factor {eta * lipschitz:.3g}; the descent "
                "guarantee needs eta <= 1/L. For larger steps with a guarantee use "
                "rule='certified_local' (per-step certificate) or 'backtracking'; to run this "
                "eta anyway use rule='fixed' without require_certified."
            )
    if rule == "fixed" and eta is None:
        raise ValueError("rule 'fixed' needs eta (the paper: 0.1 / lam synthetic, 0.005 real)")
    return eta


def _check_descent(losses: np.ndarray, rule: str, require_certified: bool, descent_rtol: float | None
                   ) -> tuple[int, float]:
    """How many steps raised the loss (beyond the tolerance) and the largest rise. The
    guarantee every rule but the fixed one promises (the descent lemma, Armijo, the segment
    certificate) is checked on the recorded losses, not assumed from the step size."""
    rises = np.diff(losses)
    tol = descent_tolerance(losses, descent_rtol)
    up = ~np.isfinite(rises) | (rises > tol)  # a NaN / inf loss counts as a rise
    n_up = int(np.sum(up))
    max_up = float(np.max(np.where(np.isfinite(rises), np.maximum(rises, 0.0), np.inf)))
    if rule != "fixed" or require_certified:
        worst = int(np.argmax(np.where(up, np.nan_to_num(rises - tol, nan=np.inf), -np.inf)))
        chex.assert_equal(
            n_up, 0,
            custom_message=(
                f"{rule} rule: loss rose at {n_up} step(s), worst at step {worst}: "
                f"{losses[worst]:.9g} -> {losses[worst + 1]:.9g} (tolerance {tol[worst]:.3g})"
            ),
        )
    return n_up, max_up


def gradient_descent(
    value_and_grad_fn: ValueAndGrad,
    params,
    args: tuple = (),
    *,
    steps: int,
    rule: str = "certified",
    eta: float | None = None,
    lipschitz: float | None = None,
    require_certified: bool = False,
    project: bool = False,
    curvature: float | None = None,
    segment_bound_fn: SegmentBound | None = None,
    power_iters: int = 50,
    armijo_c: float = 1e-4,
    max_backtracks: int = 40,
    local_first_eta_factor: float = 1024.0,
    descent_rtol: float | None = None,
) -> GDResult:
    """Algorithm 1, M_{t+1} = M_t - eta grad L(M_t), for ``steps`` steps in a jitted scan.

    ``args`` are passed to ``value_and_grad_fn`` after the params (as jit arguments, so the
    data is not baked into the program). ``lipschitz`` is a certified Lipschitz constant of
    the gradient: the ``certified`` rule needs it (eta defaults to 1/L; a given eta must not
    exceed it), and with ``require_certified`` a ``fixed`` eta above 1/L is refused.
    ``curvature`` overrides the backtracking rule's power-iteration estimate.
    ``certified_local`` needs ``segment_bound_fn(params, direction, *args)`` and uses 1/L as
    its floor; its first try is ``eta`` (default ``local_first_eta_factor`` / L).
    With ``project`` the initial params are projected too (the descent guarantees of
    projected steps assume the iterate is in the box).
    """
    _validate_common(steps, rule, eta)
    eta = _rule_eta(rule, eta, lipschitz, require_certified, segment_bound_fn, local_first_eta_factor)

    config = GDConfig(
        steps=int(steps),
        backtracking=rule == "backtracking",
        local=rule == "certified_local",
        project=project,
        armijo_c=armijo_c,
        max_backtracks=max_backtracks,
    )
    if rule == "backtracking":
        if curvature is None:
            curvature = float(_curvature_jit(value_and_grad_fn, params, args, power_iters))
        if not (math.isfinite(curvature) and curvature > 0):
            raise ValueError(f"curvature estimate must be finite and > 0, got {curvature}")
        eta = 1.0 / curvature

    params = _project(params, project)
    floor = 1.0 / lipschitz if rule == "certified_local" else 0.0
    p_T, losses, etas = _gd_core_jit(
        value_and_grad_fn, params, args, eta, config,
        segment_bound_fn if rule == "certified_local" else None, floor,
    )
    losses = np.asarray(losses)
    etas = np.asarray(etas)
    n_up, max_up = _check_descent(losses, rule, require_certified, descent_rtol)
    return GDResult(
        params=p_T,
        losses=losses,
        step_sizes=etas,
        rule=rule,
        lipschitz=None if lipschitz is None else float(lipschitz),
        curvature=None if curvature is None else float(curvature),
        n_increases=n_up,
        max_increase=max_up,
    )


def paper_synthetic_eta(lam: float) -> float:
    """The paper's synthetic step size eta = 0.1 / lam (Section 6.1)."""
    if lam <= 0:
        raise ValueError(f"the paper's eta = 0.1 / lam needs lam > 0, got {lam}")
    return 0.1 / lam


PAPER_REAL_ETA = 0.005  # Section 6.2 (Llama 3.2-1B, lam = 0.05)


def solve_merged(
    X,
    W,
    lam: float,
    *,
    steps: int = 100,
    rule: str = "certified",
    eta: float | None = None,
    init=None,
    project: bool = False,
    target=None,
    require_certified: bool = False,
    lipschitz: float | None = None,
    **gd_kwargs,
) -> GDResult:
    """Algorithm 1 on the merged-W objective of :mod:`objective`.

    ``init``: None = all ones (the dense model), else an array shaped like W (projected onto
    [0, 1] first when ``project``). ``target`` defaults to the dense attention. The
    certified L is :func:`certified_lipschitz_bound` unless given; ``certified_local`` uses
    :func:`segment_curvature_bound`. A ``fixed`` rule without eta uses the paper's 0.1 / lam.
    """
    lam = float(lam)
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    _validate_common(steps, rule, eta)
    X = objective.as_batched(X)
    W = jnp.asarray(W)
    d = X.shape[-1]
    if W.shape != (d, d):
        raise ValueError(f"W must be (d, d) = {(d, d)} to match X of shape {X.shape}")
    dtype = jnp.result_type(X.dtype, W.dtype)
    X, W = X.astype(dtype), W.astype(dtype)
    M0 = jnp.ones_like(W) if init is None else jnp.asarray(init, dtype=dtype)
    if M0.shape != W.shape:
        raise ValueError(f"init must have W's shape {W.shape}, got {M0.shape}")
    target = objective.dense_target(X, W) if target is None else jnp.asarray(target, dtype=dtype)
    if lipschitz is None and (
        rule in ("certified", "certified_local") or (rule == "fixed" and require_certified)
    ):
        lipschitz = certified_lipschitz_bound(X, W, lam, target)
    if rule == "certified_local":
        gd_kwargs.setdefault("segment_bound_fn", segment_curvature_bound)
    if rule == "fixed" and eta is None:
        eta = paper_synthetic_eta(lam)

    return gradient_descent(
        objective.value_and_grad_closed_form,
        M0,
        (X, W, target, jnp.asarray(lam, dtype)),
        steps=steps,
        rule=rule,
        eta=eta,
        lipschitz=lipschitz,
        require_certified=require_certified,
        project=project,
        **gd_kwargs,
    )


def binarize(
    M, W=None, sparsity: float | str | SparsityPattern = 0.5, how: str = "row"
) -> jax.Array:
    """Binary (bool) mask keeping the best entries of the relaxed mask M_T.

    ``how``: ``row`` keeps the top (1 - rho) of M in each row (rows = outputs), ``matrix``
    over the whole matrix, ``magnitude`` ranks |M o W| per row. ``sparsity`` is the ratio
    rho, an ``"N:M"`` string or a :class:`SparsityPattern`; N:M keeps N of every M
    consecutive columns of each row (scores: M, or |M o W| with ``how='magnitude'``).
    """
    if how not in BINARIZE_MODES:
        raise ValueError(f"unknown binarisation {how!r}; use one of {BINARIZE_MODES}")
    if isinstance(sparsity, SparsityPattern):
        pattern = sparsity
    elif isinstance(sparsity, str):
        pattern = parse_pattern(sparsity)
    else:
        pattern = parse_pattern("unstructured", sparsity)
    M = jnp.asarray(M)
    if M.ndim != 2:
        raise ValueError(f"M must be a 2-D mask, got shape {M.shape}")
    if how == "magnitude":
        if W is None or jnp.shape(W) != M.shape:
            raise ValueError(f"how='magnitude' needs W with M's shape {M.shape}")
        scores = jnp.abs(M * jnp.asarray(W))
    else:
        scores = M
    if pattern.is_nm and how == "matrix":
        raise PatternError(f"{pattern.name} is a per-row pattern; use how='row' or 'magnitude'")
    group = "matrix" if how == "matrix" else "row"
    mask = mask_from_scores(scores, pattern, group)
    assert_mask(mask, pattern, group)
    return mask
