r"""Certified Lipschitz constants of grad L for the merged-W objective, and Hessian probes.

Setting (see :mod:`nlprune.nonlinear.objective`): row r of sequence i has the m = r + 1
causal logits s_ir(M)_j = x_ir^T (M o W) x_ij (j <= r), p = softmax(s_ir), b its target row,
g_ir(s) = 1/2 ||softmax(s) - b||^2, and L(M) = sum_ir g_ir(s_ir(M)) + lam/2 ||M||_F^2.
s_ir is *linear* in M, so for a direction V (d x d), with t_ir = s_ir(V):

    D^2 L(M)[V, V] = lam ||V||_F^2 + sum_ir D^2 g_ir(s_ir(M))[t_ir, t_ir].          (0)

Lemma 1 (row curvature; sharp up to < 1.3x for beta = 0, measured). For t in R^m with
range rho(t) = max t - min t, beta = max_j b_j - min_j b_j (over the row's causal entries):

    -(16/27 + beta) rho^2/4  <=  D^2 g[t, t]  <=  (5/8 + beta) rho^2/4.

Proof. Let Sig = diag(p) - p p^T (the softmax Jacobian), u = t - (p.t) 1, c = p - b,
Var = Var_p(t) = sum_k p_k u_k^2. With D^2 p_k[t, t] = p_k (u_k^2 - Var),
D^2 g[t, t] = ||Sig t||^2 + sum_k c_k D^2 p_k[t, t]
            = sum_k p_k u_k^2 (2 p_k - ||p||^2 + p.b - b_k).
 (i)  Var <= rho^2/4 (Popoviciu), and Var <= q (1 - q) rho^2 if q = max_k p_k >= 1/2 (an atom
      of mass q: total-variance split + Bhatia-Davis).
 (ii) sum_k 2 p_k^2 u_k^2 = 2 ||Sig t||^2 <= 2 lmax(Sig) Var, and
      lmax(Sig) <= min(1/2, 1 - ||p||^2, 1/8 + ||p||^2)  [Popoviciu and (a+b)^2 <= 2a^2+2b^2;
      trace; 2 p_j p_k |t_j t_k| <= p_j^2 t_k^2 + p_k^2 t_j^2 off the diagonal], hence
      2 lmax(Sig) - ||p||^2 <= max_x min(1 - x, 1/4 + x) = 5/8.
 (iii) p.b - b_k is in [-beta, beta] (p.b is a convex combination of the b_j).
Upper: D^2 g <= (5/8 + beta) Var. Lower: D^2 g >= -(||p||^2 + beta) Var, and
||p||^2 Var <= q min(1/4, q (1 - q)) rho^2 <= (4/27) rho^2.  []
(METHOD.md's row constant 11/4 on ||t||^2 is valid but loose: (ii) and Var <= lmax(Sig)||t||^2
give |D^2 g[t, t]| <= (5/16 + beta/2) ||t||^2.)

Lemma 2 (logit spread). t_ir,j = <y_ir, x_ij> with y_ir = (V o W)^T x_ir, so
rho(t_ir) <= ||y_ir|| delta_ir, delta_ir = diam{x_i0, ..., x_ir} (the causal prefix).

Theorem. For every M (no assumption on M, b or the data):

    ||D^2 L(M)||_2 <= lam + K,   K = max_b lmax(D_b Q D_b),   D_b = diag(W[:, b]),
    Q = sum_ir kappa_ir delta_ir^2 / 4 * x_ir x_ir^T,   kappa_ir = 5/8 + beta_ir.

Proof. By (0) and the lemmas, |D^2 L(M)[V, V] - lam ||V||^2| <= sum_ir kappa_ir delta_ir^2/4
||y_ir||^2 (16/27 < 5/8 covers the lower side), and since (y_ir)_b = (V[:, b] o W[:, b]) . x_ir,
sum_ir kappa_ir delta_ir^2/4 ||y_ir||^2 = sum_b (V[:,b] o W[:,b])^T Q (V[:,b] o W[:,b])
<= K ||V||_F^2. So the spectrum of D^2 L(M) lies in [lam - K, lam + K].  []

Why it is tighter than METHOD.md's lam + 11/4 max|W|^2 sum_i ||X_i||_2^4: softmax only sees
the *spread* of a row's logits, so a row costs delta^2 ||y||^2 / 4 instead of ||t||^2, a sum
over its r entries (sum_r r ~ n^2/2 becomes ~ n); the Schur product with W is taken exactly per column
instead of through max|W|; the causal mask enters through prefix diameters (row 0, a single
entry, drops out); 5/8 + beta <= 13/8 replaces 11/4. The l2 route with the sharper row
constant, lam + (5/16 + max beta / 2) max|W|^2 sum_i ||X_i||_2^4, is also valid;
:func:`certified_lipschitz_bound` returns the smaller of the two.

What no global bound can do: it must hold at every M, including masks that make attention
peaked, while at the dense mask of diffuse-attention data the row curvature is about 1/m^2.
Hence a second, *local* certificate for one step (:func:`segment_curvature_bound`):

Segment certificate. For a step M -> M+ = M + D (D = -eta g, or the projected step), let
t_ir = s_ir(D) (computed exactly: one extra X (D o W) X^T) and R_ir = rho(t_ir). On the
segment M + tau D, tau in [0, 1], every row's logits move by tau t_ir, so the attention p'
there satisfies e^-R p <= p' <= e^R p entrywise (p = attention at M). Then
  a'_k = 2 p'_k - ||p'||^2 + p'.b - b_k  is bounded with p'_k <= min(e^R p_k, 1),
  ||p'||^2 in [e^-2R ||p||^2, min(e^2R ||p||^2, 1)], p'.b in [e^-R p.b, min(e^R p.b, max b)]
  (b >= 0), giving |D^2 g(s')[t, t]| <= alpha_ir(R) Var_p'(t), and
  Var_p'(t) <= min(e^R Var_p(t), rho(t)^2/4, min(e^R max p, 1) sum_j (t_j - mean t)^2).
Each row also keeps the global bounds kappa rho(t)^2/4 and (5/16 + beta/2) sum_j (t_j - mean)^2
(Var_p is shift-invariant). Summing the per-row minimum plus lam ||D||^2 gives C_D >=
sup_tau D^2 L(M + tau D)[D, D], and Taylor's theorem with <g, D> <= -||D||^2 / eta
(equality without projection; the projection inequality for M in [0, 1]^dxd) yields

    C_D <= ||D||^2 / eta   ==>   L(M+) <= L(M) - ||D||^2 / (2 eta).

The summed global row bounds never exceed (lam + K) ||D||^2 resp. the l2 route, so any eta
<= 1/L_certified passes; the certificate only ever allows *larger* steps.

Everything in the global bound is computed on the host in float64 with a 1e-9 relative
margin (far above the rounding of eigvalsh / Gram products), whatever the input dtype; the
segment certificate runs in the loss dtype inside jit and keeps a 1e-3 relative margin.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from nlprune.nonlinear import objective as obj

_SAFETY = 1e-9  # relative margin for float64 rounding in the host computation
ROW_CONSTANT = 5.0 / 8.0  # Lemma 1, beta-free part
L2_ROW_CONSTANT = 5.0 / 16.0  # |D^2 g[t,t]| <= (5/16 + beta/2) ||t||^2
METHOD_MD_ROW_CONSTANT = 11.0 / 4.0


def _as_batched_f64(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 2:
        X = X[None]
    if X.ndim != 3:
        raise ValueError(f"X must be (n, d) or (k, n, d), got shape {X.shape}")
    return X


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    return lam


def _dense_attention_f64(X: np.ndarray, W: np.ndarray) -> np.ndarray:
    S = np.einsum("krb,kjb->krj", X @ W, X)
    C = np.tril(np.ones(S.shape[-2:], dtype=bool))
    S = np.where(C, S, -np.inf)
    A = np.exp(S - S.max(-1, keepdims=True))
    return A / A.sum(-1, keepdims=True)


def _row_target_range(target: np.ndarray) -> np.ndarray:
    """beta_ir = max - min of the target row over its causal entries, shape (k, n)."""
    C = np.tril(np.ones(target.shape[-2:], dtype=bool))
    hi = np.where(C, target, -np.inf).max(-1)
    lo = np.where(C, target, np.inf).min(-1)
    return hi - lo


def _prefix_diameters_sq(X: np.ndarray) -> np.ndarray:
    """delta_ir^2 = max_{j, j' <= r} ||x_ij - x_ij'||^2, shape (k, n)."""
    out = np.empty(X.shape[:2])
    for i, Xi in enumerate(X):  # one (n, n) distance matrix at a time bounds memory
        diff2 = ((Xi[:, None, :] - Xi[None, :, :]) ** 2).sum(-1)
        newest = np.tril(diff2).max(-1)  # farthest earlier point from x_r
        out[i] = np.maximum.accumulate(newest)
    return out


def _max_column_schur_eig(Q: np.ndarray, W: np.ndarray, chunk: int = 64) -> float:
    """max_b lmax(diag(W[:, b]) Q diag(W[:, b]))."""
    best = 0.0
    d = W.shape[1]
    for start in range(0, d, chunk):
        cols = W[:, start : start + chunk].T  # (c, d)
        mats = cols[:, :, None] * Q[None] * cols[:, None, :]
        best = max(best, float(np.linalg.eigvalsh(mats)[:, -1].max()))
    return best


def _resolve_target(X: np.ndarray, W: np.ndarray, target) -> np.ndarray:
    if target is None:
        return _dense_attention_f64(X, W)
    target = np.asarray(target, dtype=np.float64)
    if target.ndim == 2:
        target = target[None]
    if target.shape != (X.shape[0], X.shape[1], X.shape[1]):
        raise ValueError(
            f"target must be (k, n, n) = {(X.shape[0], X.shape[1], X.shape[1])}, "
            f"got {target.shape}"
        )
    return target


def method_md_bound(X, W, lam: float) -> float:
    """METHOD.md's bound lam + 11/4 max|W_ij|^2 sum_i ||X_i||_2^4 (valid, very loose)."""
    lam = _check_lam(lam)
    X = _as_batched_f64(X)
    W = np.asarray(W, dtype=np.float64)
    spec4 = sum(np.linalg.norm(Xi, 2) ** 4 for Xi in X)
    return lam + METHOD_MD_ROW_CONSTANT * float(np.abs(W).max()) ** 2 * spec4


@dataclasses.dataclass(frozen=True)
class LipschitzReport:
    """All certified bounds on sup_M ||D^2 L(M)||_2 (each valid on its own)."""

    method_md: float  # METHOD.md: lam + 11/4 max|W|^2 sum ||X_i||^4
    l2_route: float  # lam + (5/16 + max beta/2) max|W|^2 sum ||X_i||^4
    spread_route: float  # lam + max_b lmax(D_b Q D_b) (the theorem above)

    @property
    def certified(self) -> float:
        return min(self.l2_route, self.spread_route)


def lipschitz_report(X, W, lam: float, target=None) -> LipschitzReport:
    """Every bound of this module for the problem (X, W, lam, target = dense attention)."""
    lam = _check_lam(lam)
    X = _as_batched_f64(X)
    W = np.asarray(W, dtype=np.float64)
    d = X.shape[-1]
    if W.shape != (d, d):
        raise ValueError(f"W must be (d, d) = {(d, d)} to match X, got {W.shape}")
    beta = _row_target_range(_resolve_target(X, W, target))

    spec4 = sum(np.linalg.norm(Xi, 2) ** 4 for Xi in X)
    wmax2 = float(np.abs(W).max()) ** 2
    l2 = lam + (L2_ROW_CONSTANT + float(beta.max()) / 2) * wmax2 * spec4 * (1 + _SAFETY)

    weights = (ROW_CONSTANT + beta) * _prefix_diameters_sq(X) / 4.0
    Q = np.einsum("kr,kra,krb->ab", weights, X, X)
    spread = lam + _max_column_schur_eig(Q, W) * (1 + _SAFETY)
    return LipschitzReport(method_md=method_md_bound(X, W, lam), l2_route=l2, spread_route=spread)


def certified_lipschitz_bound(X, W, lam: float, target=None) -> float:
    """The tightest certified L with ||grad L(M) - grad L(M')|| <= L ||M - M'|| for all M, M'.

    ``target`` defaults to the dense attention f(1); the proof is in the module docstring.
    """
    return lipschitz_report(X, W, lam, target).certified


SEGMENT_MARGIN = 1e-3  # relative margin for the in-jit (possibly float32) certificate


@jax.jit
def segment_curvature_bound(M, D, X, W, target, lam) -> jax.Array:
    """C_D >= sup_{tau in [0, 1]} D^2 L(M + tau D)[D, D] (see "Segment certificate" above).

    Pure JAX, jit/vmap-friendly, in the dtype of the inputs; ``target`` must be >= 0 (an
    attention matrix).
    """
    X = obj._batched(X)
    p = obj.attention(X, W, M)  # (k, n, n), exactly 0 above the diagonal
    C = obj.causal_mask(p.shape[-1])
    t = jnp.where(C, obj.logits(X, W, D), 0.0)
    count = jnp.arange(1, p.shape[-1] + 1, dtype=p.dtype)[:, None]  # causal entries per row

    R = jnp.max(jnp.where(C, t, -jnp.inf), -1) - jnp.min(jnp.where(C, t, jnp.inf), -1)
    tbar = jnp.sum(p * t, -1, keepdims=True)
    var_p = jnp.sum(p * (t - tbar) ** 2, -1)
    tmean = jnp.sum(t, -1, keepdims=True) / count
    centred_ss = jnp.sum(jnp.where(C, (t - tmean) ** 2, 0.0), -1)

    b_hi = jnp.max(jnp.where(C, target, -jnp.inf), -1)
    beta = b_hi - jnp.min(jnp.where(C, target, jnp.inf), -1)
    bdot = jnp.sum(p * target, -1)
    pn2 = jnp.sum(p * p, -1)
    up, dn = jnp.exp(R), jnp.exp(-R)
    p_up = jnp.minimum(up[..., None] * p, 1.0)
    a_hi = jnp.max(jnp.where(C, 2 * p_up - target, -jnp.inf), -1) + jnp.minimum(up * bdot, b_hi)
    a_hi = a_hi - dn**2 * pn2
    a_lo = -jnp.min(jnp.where(C, 2 * dn[..., None] * p - target, jnp.inf), -1) - dn * bdot
    a_lo = a_lo + jnp.minimum(up**2 * pn2, 1.0)
    alpha = jnp.maximum(jnp.maximum(a_hi, a_lo), 0.0)

    quarter_r2 = R**2 / 4
    var_prime = jnp.minimum(
        jnp.minimum(up * var_p, quarter_r2), jnp.minimum(up * jnp.max(p, -1), 1.0) * centred_ss
    )
    local = alpha * var_prime
    global_ = jnp.minimum(
        (ROW_CONSTANT + beta) * quarter_r2, (L2_ROW_CONSTANT + beta / 2) * centred_ss
    )
    rows = jnp.minimum(local, global_)
    return (lam * jnp.sum(D * D) + jnp.sum(rows)) * (1 + SEGMENT_MARGIN)


@dataclasses.dataclass(frozen=True)
class HessianEigs:
    """Power-iteration estimates of the Hessian spectrum at one point.

    Each is a Rayleigh quotient, so it lies inside the spectrum: |estimate| never exceeds
    the true extreme eigenvalue it estimates.
    """

    dominant: float  # largest in magnitude (signed)
    largest: float  # largest algebraic
    smallest: float  # smallest algebraic

    @property
    def magnitude(self) -> float:
        return max(abs(self.dominant), abs(self.largest), abs(self.smallest))


def hvp_fn(loss_fn: Callable[..., jax.Array], params: Any, *args) -> tuple[Callable, jax.Array]:
    """(v -> H v on flat vectors, flat params) for a loss of a parameter pytree."""
    flat, unravel = ravel_pytree(params)

    def grad_flat(f):
        return ravel_pytree(jax.grad(loss_fn)(unravel(f), *args))[0]

    def hvp(v):
        return jax.jvp(grad_flat, (flat,), (v,))[1]

    return hvp, flat


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _power_spectrum(loss_fn, iters: int, seed: int, params, args, shift):
    hvp, flat = hvp_fn(loss_fn, params, *args)
    v0 = jax.random.normal(jax.random.PRNGKey(seed), flat.shape, flat.dtype)
    v0 = v0 / jnp.linalg.norm(v0)

    def power(op):
        def body(_, v):
            w = op(v)
            return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(w.dtype).tiny)

        v = jax.lax.fori_loop(0, iters, body, v0)
        return jnp.vdot(v, hvp(v))  # Rayleigh quotient of H itself

    dom = power(hvp)
    c = jnp.where(jnp.isnan(shift), 1.01 * jnp.abs(dom), shift)
    largest = power(lambda v: hvp(v) + c * v)
    smallest = power(lambda v: c * v - hvp(v))
    return dom, largest, smallest


def top_hessian_eigenvalue(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    *args,
    iters: int = 100,
    seed: int = 0,
    shift: float | None = None,
) -> HessianEigs:
    """Top Hessian eigenvalues of ``loss_fn(params, *args)`` by power iteration on HVPs.

    The loss is non-convex, so besides the dominant eigenvalue (power iteration on H) this
    returns the largest and smallest algebraic ones (power iteration on H + cI and cI - H,
    positive semi-definite when c >= ||H||). ``shift`` is c, by default 1.01 x the dominant
    estimate: a larger c is safer but slows convergence (the ratio of the top two
    eigenvalues of the shifted operator tends to 1). Every estimate is a Rayleigh quotient
    of H, so it lies inside H's spectrum whatever c is.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    flat, _ = ravel_pytree(params)
    shift_arr = jnp.asarray(np.nan if shift is None else shift, dtype=flat.dtype)
    dom, largest, smallest = _power_spectrum(
        loss_fn, int(iters), int(seed), params, args, shift_arr
    )
    return HessianEigs(float(dom), float(largest), float(smallest))
