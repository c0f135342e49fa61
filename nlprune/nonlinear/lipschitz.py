r"""Certified Lipschitz constants of grad L: the merged-W objective, and real Llama layers.

Real layers (the end of this module): the factorised q/k form has no global Lipschitz
constant, so :func:`certified_qk_bound` certifies one on the box M in [0, 1] for one KV
group, and :func:`make_segment_bound` certifies each step on the segment it travels; both
rest on the row lemma below. What follows first is the merged-W setting.

Setting (see :mod:`nlprune.nonlinear.objective`): row r of sequence i has the m = r + 1
causal logits s_ir(M)_j = x_ir^T (M o W) x_ij (j <= r), p = softmax(s_ir), b its target row,
g_ir(s) = 1/2 ||softmax(s) - b||^2, and L(M) = sum_ir g_ir(s_ir(M)) + lam/2 ||M||_F^2.
s_ir is *linear* in M, so for a direction V (d x d), with t_ir = s_ir(V):

    D^2 L(M)[V, V] = lam ||V||_F^2 + sum_ir D^2 g_ir(s_ir(M))[t_ir, t_ir].          (0)

Lemma 1 (row curvature; nearly sharp for beta = 0, tests/test_nonlinear_merged.py). For t in R^m with
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
(docs/METHOD.md's row constant 11/4 on ||t||^2 is valid but loose: (ii) and Var <= lmax(Sig)||t||^2
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

Why it is tighter than docs/METHOD.md's lam + 11/4 max|W|^2 sum_i ||X_i||_2^4: softmax only sees
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
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from nlprune.modeling.llama import Attention
from nlprune.nonlinear import objective
from nlprune.nonlinear.groups import group_probs, ones_like_masks, sq_norm, window_chunks

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
    """docs/METHOD.md's bound lam + 11/4 max|W_ij|^2 sum_i ||X_i||_2^4 (valid, very loose)."""
    lam = _check_lam(lam)
    X = _as_batched_f64(X)
    W = np.asarray(W, dtype=np.float64)
    spec4 = sum(np.linalg.norm(Xi, 2) ** 4 for Xi in X)
    return lam + METHOD_MD_ROW_CONSTANT * float(np.abs(W).max()) ** 2 * spec4


@dataclasses.dataclass(frozen=True)
class LipschitzReport:
    """All certified bounds on sup_M ||D^2 L(M)||_2 (each valid on its own)."""

    method_md: float  # docs/METHOD.md: lam + 11/4 max|W|^2 sum ||X_i||^4
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
    X = objective.as_batched(X)
    p = objective.attention(X, W, M)  # (k, n, n), exactly 0 above the diagonal
    C = objective.causal_mask(p.shape[-1])
    t = jnp.where(C, objective.logits(X, W, D), 0.0)
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


# --------------------------------------------------------------------------------------------
# Real Llama layers: the factorised q/k form (masks on W_Q and W_K, RoPE, GQA; docs/METHOD.md §3)
# --------------------------------------------------------------------------------------------


_BOX_SAFETY = 1e-9  # relative margin of the float64 host bound


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
        dense = eqx.combine(ones_like_masks(masks), rest)
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
            (ROW_CONSTANT + beta) * (r1 + 2 * r2) ** 2 / 4,
            (L2_ROW_CONSTANT + beta / 2) * (c1 + 2 * c2) ** 2,
        )
        return jnp.sum(curv + r2)

    return jnp.sum(jax.vmap(one)(X, target))


def make_segment_bound(chunk: int | None, scale: float):
    """(masks, D, rest, X, cos, sin, target, lam) -> C_D >= sup_tau D^2 L(M + tau D)[D, D]."""

    def bound(masks, direction, rest, X, cos, sin, target, lam):
        if chunk is None or chunk >= X.shape[0]:
            rows = _segment_rows(masks, direction, rest, X, cos, sin, target)
        else:
            Xc, Tc = window_chunks(X, target, chunk)
            rows = jax.lax.map(
                lambda xs: _segment_rows(masks, direction, rest, xs[0], cos, sin, xs[1]), (Xc, Tc)
            ).sum()
        return (lam * sq_norm(direction) + scale * rows) * (1 + SEGMENT_MARGIN)

    return bound


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
    kappa = L2_ROW_CONSTANT + beta / 2

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
