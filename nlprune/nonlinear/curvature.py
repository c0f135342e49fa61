"""Hessian probes by power iteration on Hessian-vector products (pure JAX).

:func:`curvature_estimate` (|lambda_max| at a point, a fixed number of iterations, jit- and
vmap-friendly) gives the backtracking rule its first step; :func:`top_hessian_eigenvalue`
(dominant, largest and smallest algebraic eigenvalues) is what the certified bounds are
checked against.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

ValueAndGrad = Callable[..., tuple[jax.Array, Any]]


def curvature_estimate(value_and_grad_fn: ValueAndGrad, params, args, iters: int) -> jax.Array:
    """|lambda_max| of the Hessian at ``params`` by power iteration on HVPs (pure JAX)."""
    flat, unravel = ravel_pytree(params)

    def grad_flat(f):
        return ravel_pytree(value_and_grad_fn(unravel(f), *args)[1])[0]

    def body(_, v):
        w = jax.jvp(grad_flat, (flat,), (v,))[1]
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(w.dtype).tiny)

    v = jax.random.normal(jax.random.PRNGKey(0), flat.shape, flat.dtype)  # seeded: repeatable
    v = jax.lax.fori_loop(0, iters, body, v / jnp.linalg.norm(v))
    return jnp.abs(jnp.vdot(v, jax.jvp(grad_flat, (flat,), (v,))[1]))


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
