"""ALPS (Meng et al., NeurIPS 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot
Pruning for Large Language Models"), in JAX, as its reference code (github mazumder-lab/ALPS,
``alps.py``) runs it.

Per linear, with H = X^T X damped by ``percdamp * mean(diag H)`` (a ridge towards the unpruned
weights) and every input feature scaled to unit norm (A = H / (x x^T), x = sqrt(diag H); the
dense weight becomes B0 = W * x), ADMM on

    min_B  tr((B - B0) A (B - B0)^T)   subject to B sparse (the pattern)

splits B (the least-squares iterate) from D (its projection on the pattern) with a scaled dual
V and penalty rho:

    B <- (B0 A - V + rho D) (A + rho I)^{-1}
    D <- the pattern's top entries of B + V / rho (largest squares kept)
    V <- V + rho (B - D)

Every ``rho_every`` iterations the support's change decides rho: it grows (x1.3, x1.2,
x1.1) while the support moves, the run restarts with rho / 5 if it settles before rho ever
grew, and stops once it has settled (or after ``support_check_after`` iterations, when under
0.03% of the kept entries change; at most ``admm_iters``). The final B's top entries are the
mask; ``pcg_steps`` conjugate-gradient steps then solve the least squares on that fixed
support (the reference's "PCG", preconditioned by the unit-norm scaling above).

Differences from the reference, none of which changes the iterates: (A + rho I)^{-1} comes
from one float32 eigendecomposition of A per shared input (the reference: float64, once per
linear); the reconstruction error it prints every ``rho_every`` iterations is not computed;
its CG stopping test compares the unmasked residual, which does not vanish off the support,
so it always runs its 10 steps, as here; dead inputs (H_jj = 0) get H_jj = 1 before damping,
as SparseGPT's do. Unstructured masks are ranked over the whole matrix (the reference's
comparison group), N:M per row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from nlprune.prune.base import MethodOptions, PruneResult, PruningMethod, option, register_method
from nlprune.prune.refit import _cg_polish
from nlprune.prune.sparsegpt import stacked_by_shape
from nlprune.prune.stats import LayerStats
from nlprune.sparsity import DEFAULT_BLOCKSIZE, SparsityPattern, mask_from_scores

HIGHEST = lax.Precision.HIGHEST
RHO_CAP = 1e6  # the reference's ceiling on rho
NORM_EPS = 1e-8  # added to each feature's norm, as the reference does


@dataclasses.dataclass(frozen=True)
class ALPSOptions(MethodOptions):
    rho: float = option(0.1, "alps: initial ADMM penalty rho (0.1, the reference's)")
    admm_iters: int = option(300, "alps: most ADMM iterations per linear (300)")
    rho_every: int = option(3, "alps: ADMM iterations between updates of rho from the support's change (3)")
    support_check_after: int = option(
        30, "alps: from this iteration on, stop once under 0.03% of the kept entries change (30)")
    pcg_steps: int = option(10, "alps: conjugate-gradient steps on the final support (10; 0: none)")
    percdamp: float = option(0.01, "alps: the ridge towards the unpruned weights (added to X^T X), a fraction "
                                   "of its mean diagonal (0.01, the reference's)")

    def validate(self) -> None:
        super().validate()
        for flag, value, low in (("--admm-iters", self.admm_iters, 1), ("--rho-every", self.rho_every, 1),
                                 ("--support-check-after", self.support_check_after, 0),
                                 ("--pcg-steps", self.pcg_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"alps {flag} must be an integer >= {low}, got {value!r}")
        for flag, value in (("--rho", self.rho), ("--percdamp", self.percdamp)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"alps {flag} must be a finite number > 0, got {value!r}")


def _project(z: jax.Array, pattern: SparsityPattern) -> jax.Array:
    """The mask keeping the pattern's largest z^2 (whole matrix, or N:M per row)."""
    return mask_from_scores(z * z, pattern, "matrix")


def _admm_one(b0, a, evals, evecs, pattern: SparsityPattern, o: ALPSOptions):
    """ADMM of one scaled weight b0 (out, in): (mask, B before the final projection,
    iterations run, final rho)."""
    dot = functools.partial(jnp.matmul, precision=HIGHEST)
    target = dot(b0, a)  # the reference's YtX (A is symmetric)
    n_kept = b0.size * pattern.n / pattern.m if pattern.is_nm else round((1 - pattern.ratio) * b0.size)

    def inverse(rho):  # (A + rho I)^{-1}
        return dot(evecs / (evals + rho), evecs.T)

    def step(_, state):
        b, d, v, rho, inv = state
        b = dot(target - v + rho * d, inv)
        z = v / rho + b
        d = jnp.where(_project(z, pattern), z, 0.0)
        return b, d, v + rho * (b - d), rho, inv

    keep0 = _project(b0, pattern)
    d0 = jnp.where(keep0, b0, 0.0)
    rho0 = jnp.asarray(o.rho, jnp.float32)
    # (iterations run, B, D, V, rho, (A + rho I)^-1, support at the last check, rho grown yet, done)
    init = (jnp.asarray(0, jnp.int32), b0, d0, jnp.zeros_like(b0), rho0, inverse(rho0), keep0,
            jnp.asarray(False), jnp.asarray(False))

    def rounds_left(state):
        return ~state[-1]

    def one_round(state):
        it, b, d, v, rho, inv, last_keep, grown, _ = state
        run = jnp.minimum(o.rho_every, o.admm_iters - it)  # a last, shorter round has no check
        b, d, v, rho, inv = lax.fori_loop(0, run, step, (b, d, v, rho, inv))
        it = it + run
        check = it % o.rho_every == 0
        keep = d != 0
        change = jnp.sum(keep != last_keep).astype(jnp.float32)
        frac = change / n_kept
        moving, drifting, some = frac > 0.1, frac > 0.005, change > 0.5
        settled = check & ~moving & ~drifting & ~some & grown  # the reference's break
        restart = check & ~moving & ~drifting & some & ~grown  # settled before rho grew: start over, rho / 5
        new_rho = jnp.where(moving, rho * 1.3, jnp.where(drifting, rho * 1.2, jnp.where(
            some, jnp.where(grown, rho * 1.1, rho / 5), jnp.where(grown, rho, rho / 5))))
        rho = jnp.where(check, jnp.minimum(new_rho, RHO_CAP), rho)
        b = jnp.where(restart, b0, b)
        d = jnp.where(restart, d0, d)
        v = jnp.where(restart, 0.0, v)
        converged = check & (it - 1 >= o.support_check_after) & (frac < 3e-4)
        done = settled | converged | (it >= o.admm_iters)
        grown = grown | (check & (moving | drifting))
        return it, b, d, v, rho, inverse(rho), jnp.where(check, keep, last_keep), grown, done

    it, b, _, _, rho, *_ = lax.while_loop(rounds_left, one_round, init)
    return _project(b, pattern), b, it, rho


@functools.partial(jax.jit, static_argnames=("pattern", "options"))
def alps_prune_stacked(
    weights: jax.Array, hessian: jax.Array, pattern: SparsityPattern, options: ALPSOptions,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """ALPS on a stack of same-shape weights (batch, out, in) that read one input with Gram
    matrix ``hessian``: (masks, pruned weights in float32, ADMM iterations, final rho)."""
    h = hessian.astype(jnp.float32)
    h = h + jnp.diag((jnp.diag(h) == 0).astype(h.dtype))  # dead inputs, as SparseGPT's
    h = h + options.percdamp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=h.dtype)
    norms = jnp.sqrt(jnp.diag(h)) + NORM_EPS
    a = h / norms[:, None] / norms[None, :]
    evals, evecs = jnp.linalg.eigh(a)
    b0 = weights.astype(jnp.float32) * norms

    def one(b0):
        keep, b, it, rho = _admm_one(b0, a, evals, evecs, pattern, options)
        solved = _cg_polish(jnp.where(keep, b, 0.0), b0, keep, a, options.pcg_steps)
        return keep, jnp.where(keep, solved / norms, 0.0), it, rho

    return jax.vmap(one)(b0)


@register_method
class ALPS(PruningMethod):
    name = "alps"
    Options = ALPSOptions
    uses_hessian = True
    updates_weights = True
    # not measured: B, D, V, the target, the scaled weight, B + V / rho and the sort keys; A, its
    # eigenvectors, the eigensolver's workspace and (A + rho I)^-1 per weight
    work_copies = 8.0
    hessian_copies = 6.0

    def comparison_group(self, pattern: SparsityPattern) -> tuple[str, int]:
        return "matrix", DEFAULT_BLOCKSIZE

    def _prune(self, weight: jax.Array, stats: LayerStats, pattern: SparsityPattern) -> PruneResult:
        return self._prune_many([weight], stats, pattern)[0]

    def _prune_many(self, weights: Sequence[jax.Array], stats: LayerStats, pattern: SparsityPattern) -> list[PruneResult]:
        results: list[PruneResult | None] = [None] * len(weights)
        for indices in stacked_by_shape(weights):  # k+v, gate+up: one vmapped call each
            stacked = jnp.stack([weights[i] for i in indices])
            masks, pruned, iters, rho = alps_prune_stacked(stacked, stats.hessian, pattern, self.options)
            self.reports.append({"shape": tuple(stacked.shape[1:]), "admm_iters": [int(i) for i in iters],
                                 "final_rho": [float(r) for r in rho]})
            for j, i in enumerate(indices):
                results[i] = PruneResult(masks[j], pruned[j].astype(weights[i].dtype))
        return results
