"""The merged-W attention-pruning objective (docs/METHOD.md section 2).

For k calibration sequences X_i (n x d), the merged query-key matrix W (d x d, the
1/sqrt(d_head) scale folded in), a real-valued mask M (d x d) and the causal mask C:

    S_i(M) = X_i (M o W) X_i^T                      (logits, n x n)
    f_i(M) = D^{-1} A,  A = C o exp(S_i(M))         (row-stochastic causal attention)
    L(M)   = sum_i 1/2 ||f_i(M) - b_i||_F^2 + lam/2 ||M||_F^2,   b = f(1) (dense attention)

``lam`` is the regularisation the paper reports; it parametrises lam = lam~ / n, which
:func:`lam_from_paper` converts. Every function keeps the floating dtype of its inputs
(float32 or float64) and accepts X as (n, d) for a single sequence or (k, n, d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def lam_from_paper(lam_tilde: float, n: int) -> float:
    """The paper's parametrisation lam = lam~ / n; everything here takes lam itself."""
    return float(lam_tilde) / int(n)


def as_batched(X: Array) -> Array:
    X = jnp.asarray(X)
    if X.ndim == 2:
        return X[None]
    if X.ndim != 3:
        raise ValueError(f"X must be (n, d) or (k, n, d), got shape {X.shape}")
    return X


def causal_mask(n: int) -> Array:
    """C_ij = 1 for j <= i (token i sees itself and the past)."""
    return jnp.tril(jnp.ones((n, n), dtype=bool))


@jax.jit
def logits(X: Array, W: Array, M: Array) -> Array:
    """S_i = X_i (M o W) X_i^T for every sequence, shape (k, n, n)."""
    X = as_batched(X)
    return jnp.einsum("krb,kjb->krj", X @ (M * W), X)


@jax.jit
def attention(X: Array, W: Array, M: Array) -> Array:
    """f(M): causal softmax of the logits, (k, n, n), rows summing to one.

    The row max over the causal entries is subtracted before exp; D^{-1} A is invariant
    to that shift, so this is exactly the paper's f, without overflow.
    """
    S = logits(X, W, M)
    C = causal_mask(S.shape[-1])
    # exp(-inf) = 0 keeps masked entries out of the value *and* the gradient (no inf * 0).
    shifted = jnp.where(C, S, -jnp.inf)
    shifted = shifted - jax.lax.stop_gradient(jnp.max(shifted, axis=-1, keepdims=True))
    A = jnp.exp(shifted)
    return A / jnp.sum(A, axis=-1, keepdims=True)


@jax.jit
def dense_target(X: Array, W: Array) -> Array:
    """b = f(1), the dense model's attention."""
    W = jnp.asarray(W)
    return attention(X, W, jnp.ones_like(W))


@jax.jit
def loss(M: Array, X: Array, W: Array, target: Array, lam: float) -> Array:
    """L(M) = sum_i 1/2 ||f_i(M) - b_i||_F^2 + lam/2 ||M||_F^2 (a scalar of the input dtype)."""
    f = attention(X, W, M)
    return 0.5 * jnp.sum((f - target) ** 2) + 0.5 * lam * jnp.sum(M * M)


@jax.jit
def value_and_grad_closed_form(
    M: Array, X: Array, W: Array, target: Array, lam: float
) -> tuple[Array, Array]:
    """(L(M), grad L(M)) from one forward pass, with docs/METHOD.md's closed-form gradient.

    c = f - b,  p = f o c - diag((f o c) 1) f  (= the softmax Jacobian applied to c, row-wise),
    grad = W o (sum_i X_i^T p_i X_i) + lam M.
    """
    X = as_batched(X)
    f = attention(X, W, M)
    c = f - target
    fc = f * c
    p = fc - jnp.sum(fc, axis=-1, keepdims=True) * f
    g = jnp.einsum("kra,krj,kjb->ab", X, p, X, optimize=True)
    value = 0.5 * jnp.sum(c * c) + 0.5 * lam * jnp.sum(M * M)
    return value, W * g + lam * M


@jax.jit
def grad_closed_form(M: Array, X: Array, W: Array, target: Array, lam: float) -> Array:
    """grad L(M) by the closed form (see :func:`value_and_grad_closed_form`)."""
    return value_and_grad_closed_form(M, X, W, target, lam)[1]
