"""The one interface every pruning method implements, its calibration statistics, a registry.

A method prunes one ``nn.Linear``-shaped weight (out, in) at a time from statistics of that
linear's input activations X (tokens, in), where y = X @ W.T. Adding a method is one file:

    @register_method
    class MyMethod(PruningMethod):
        name = "mine"
        needs_hessian = False                 # True builds X^T X in the statistics
        default_options = {"alpha": 1.0}      # the keyword options ``prune`` accepts

        def _prune(self, weight, stats, pattern, *, alpha):
            ...
            return PruneResult(mask, weight * mask)

plus one import line in ``nlprune/prune/__init__.py``. Callers use ``prune`` /
``prune_many``, which validate the inputs and check the mask invariants (binary, exact count
per comparison group, pruned weights exactly 0) on every result.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, NamedTuple

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from nlprune import parallel
from nlprune.prune.patterns import DEFAULT_BLOCKSIZE, SparsityPattern, assert_mask

# --------------------------------------------------------------------------------------------
# Calibration statistics
# --------------------------------------------------------------------------------------------


@jax.jit
def _sq_norms(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.sum(x * x, axis=0)


def _gram(x: jax.Array) -> jax.Array:
    """X^T X. Wide inputs compute 3 of the 4 half-blocks (the result is symmetric): ~20%
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


# --------------------------------------------------------------------------------------------
# Results, the method interface, the invariant checks
# --------------------------------------------------------------------------------------------


class PruneResult(NamedTuple):
    """``mask``: bool, True = kept; ``weight``: the updated weight, already times the mask."""

    mask: jax.Array
    weight: jax.Array


class PruningMethod(abc.ABC):
    """Base of every method. Subclasses set ``name``, ``needs_hessian``, ``default_options``
    and implement ``_prune`` (one weight); they may override ``_prune_many`` to share work
    between weights that read the same input (q/k/v; gate/up)."""

    name: ClassVar[str]
    needs_hessian: ClassVar[bool] = False
    default_options: ClassVar[dict[str, Any]] = {}

    # -- hooks for subclasses --------------------------------------------------------------

    @abc.abstractmethod
    def _prune(
        self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern, **options: Any
    ) -> PruneResult:
        """Prune one weight; inputs are already validated, options already resolved."""

    def _prune_many(
        self,
        weights: Sequence[jax.Array],
        stats: LayerStats,
        pattern: SparsityPattern,
        **options: Any,
    ) -> list[PruneResult]:
        return [self._prune(w, stats, pattern, **options) for w in weights]

    def comparison_group(self, pattern: SparsityPattern, **options: Any) -> tuple[str, int]:
        """(group, blocksize) in which unstructured masks have an exact count (patterns.py)."""
        return "row", DEFAULT_BLOCKSIZE

    # -- public API -------------------------------------------------------------------------

    def prune(
        self,
        weight: jax.Array,
        stats: LayerStats,
        pattern: SparsityPattern,
        *,
        check: bool = True,
        **options: Any,
    ) -> PruneResult:
        """Prune ``weight`` (out, in) given its input's ``stats``; see the method's options."""
        return self.prune_many([weight], stats, pattern, check=check, **options)[0]

    def prune_many(
        self,
        weights: Sequence[jax.Array],
        stats: LayerStats,
        pattern: SparsityPattern,
        *,
        check: bool = True,
        **options: Any,
    ) -> list[PruneResult]:
        """Prune several weights that read the same input (hence share ``stats``)."""
        options = self.resolve_options(**options)
        weights = [jnp.asarray(w) for w in weights]
        for i, weight in enumerate(weights):
            self._validate(weight, stats, pattern, f"weight {i} {tuple(weight.shape)}")
        results = self._prune_many(weights, stats, pattern, **options)
        if check:
            group, blocksize = self.comparison_group(pattern, **options)
            for weight, result in zip(weights, results, strict=True):
                check_result(result, weight, pattern, group, blocksize)
        return results

    def resolve_options(self, **options: Any) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            known = ", ".join(sorted(self.default_options)) or "none"
            raise TypeError(
                f"pruning method {self.name!r} got unknown option(s) {unknown}; it accepts: "
                f"{known}."
            )
        return {**self.default_options, **options}

    def _validate(
        self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern, what: str
    ) -> None:
        if weight.ndim != 2:
            raise ValueError(f"{what}: expected an (out, in) matrix, not rank {weight.ndim}.")
        if weight.shape[1] != stats.in_features:
            raise ValueError(
                f"{what} has {weight.shape[1]} input columns but its statistics have "
                f"{stats.in_features} features: pass the statistics of this linear's input."
            )
        pattern.check_width(weight.shape[1], what)
        if self.needs_hessian and not stats.has_hessian:
            raise ValueError(
                f"method {self.name!r} needs the Hessian X^T X: build the statistics with "
                "with_hessian=True (or with_hessian=method.needs_hessian)."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_result(
    result: PruneResult,
    weight: jax.Array,
    pattern: SparsityPattern,
    group: str = "row",
    blocksize: int = DEFAULT_BLOCKSIZE,
) -> None:
    """chex-checked invariants of one pruned weight (raises AssertionError on a violation)."""
    mask, pruned = parallel.to_host(result.mask), parallel.to_host(result.weight)  # may be sharded
    chex.assert_shape([mask, pruned], weight.shape)
    chex.assert_equal(mask.dtype, np.dtype(bool), custom_message="mask must be bool")
    chex.assert_equal(pruned.dtype, np.dtype(weight.dtype), custom_message="dtype changed")
    assert_mask(mask, pattern, group, blocksize)
    n_nonzero_pruned = int(np.count_nonzero((pruned != 0) & ~mask))
    chex.assert_equal(
        n_nonzero_pruned, 0, custom_message=f"{n_nonzero_pruned} pruned weights are not exactly 0"
    )
    n_bad = int(pruned.size - np.count_nonzero(np.isfinite(pruned)))
    chex.assert_equal(n_bad, 0, custom_message=f"{n_bad} pruned weights are NaN or inf")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[PruningMethod]] = {}


def register_method(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` available to ``get_method(cls.name)``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name`.")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"two pruning methods are named {name!r}: {_REGISTRY[name]} and {cls}.")
    _REGISTRY[name] = cls
    return cls


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_method(name: str) -> PruningMethod:
    """The method registered as ``name`` (e.g. "magnitude", "wanda", "sparsegpt")."""
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown pruning method {name!r}; known methods: {', '.join(available_methods())}."
        )
    return _REGISTRY[key]()
