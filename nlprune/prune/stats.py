"""Calibration statistics of a linear's input activations X (tokens, in), where y = X @ W.T:
what every pruning method reads (Wanda's feature norms, SparseGPT's Hessian X^T X)."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import equinox as eqx
import jax
import jax.numpy as jnp

@jax.jit
def _sq_norms(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.sum(x * x, axis=0)


def _gram(x: jax.Array) -> jax.Array:
    """X^T X. Wide inputs compute 3 of the 4 half-blocks (the result is symmetric), which is
    faster on CPU. HIGHEST: accelerators would otherwise multiply float32 in bf16 passes."""
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    n = x.shape[1]
    if n < 512:
        return dot(x.T, x)
    a, b = x[:, : n // 2], x[:, n // 2 :]
    upper_right = dot(a.T, b)
    return jnp.block([[dot(a.T, a), upper_right], [upper_right.T, dot(b.T, b)]])


@jax.jit
def _hessian_and_sq_norms(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = x.astype(jnp.float32)
    return _gram(x), jnp.sum(x * x, axis=0)


class LayerStats(eqx.Module):
    """Statistics of one linear's input X (tokens, in), summed over calibration tokens.

    ``sq_norms[j]`` = sum_t x_tj^2 (Wanda's ||x_j||^2, the diagonal of X^T X);
    ``hessian`` = X^T X in float32 (SparseGPT), or None when the method does not need it;
    ``n_tokens`` = how many token rows were summed. Sums, not means: every method here is
    invariant to the scale (SparseGPT's damping is relative to the mean diagonal).
    Build with ``from_inputs`` / ``from_chunks``, or ``empty`` then ``accumulate`` per batch
    of windows, so only one batch of activations is ever held.
    """

    sq_norms: jax.Array
    n_tokens: int
    hessian: jax.Array | None = None

    @property
    def in_features(self) -> int:
        return int(self.sq_norms.shape[0])

    @property
    def has_hessian(self) -> bool:
        return self.hessian is not None

    @property
    def norms(self) -> jax.Array:
        """Per input feature ||x_j||_2 over all calibration tokens."""
        return jnp.sqrt(self.sq_norms)

    @classmethod
    def empty(cls, in_features: int, *, with_hessian: bool = True) -> LayerStats:
        hessian = jnp.zeros((in_features, in_features), jnp.float32) if with_hessian else None
        return cls(jnp.zeros((in_features,), jnp.float32), 0, hessian)

    @classmethod
    def from_inputs(cls, x: jax.Array, *, with_hessian: bool = True) -> LayerStats:
        """Statistics of activations ``x`` (..., in): leading axes are flattened to tokens."""
        x = _as_tokens(x)
        if with_hessian:
            hessian, sq_norms = _hessian_and_sq_norms(x)
            return cls(sq_norms, int(x.shape[0]), hessian)
        return cls(_sq_norms(x), int(x.shape[0]), None)

    @classmethod
    def from_chunks(
        cls, chunks: Iterable[jax.Array], *, with_hessian: bool = True
    ) -> LayerStats:
        """Sum the statistics of an iterable of activation batches (e.g. windows at a time)."""
        stats: LayerStats | None = None
        for chunk in chunks:
            part = cls.from_inputs(chunk, with_hessian=with_hessian)
            stats = part if stats is None else stats.merge(part)
        if stats is None:
            raise ValueError("LayerStats.from_chunks got no activation chunks.")
        return stats

    def accumulate(self, x: jax.Array) -> LayerStats:
        """These statistics plus those of one more batch of activations ``x`` (..., in)."""
        return self.merge(LayerStats.from_inputs(x, with_hessian=self.has_hessian))

    def merge(self, other: LayerStats) -> LayerStats:
        """Statistics of the union of both token sets."""
        if other.in_features != self.in_features:
            raise ValueError(
                f"cannot merge statistics of {self.in_features} and {other.in_features} input "
                "features: they come from different linears."
            )
        if self.has_hessian != other.has_hessian:
            raise ValueError(
                "cannot merge statistics with and without a Hessian; build both with the same "
                "with_hessian flag."
            )
        hessian = None if self.hessian is None else self.hessian + other.hessian
        return LayerStats(self.sq_norms + other.sq_norms, self.n_tokens + other.n_tokens, hessian)


def _as_tokens(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError("activations need at least a feature axis, got a scalar.")
    return x.reshape(-1, x.shape[-1])
