"""``nlprune synthetic``: the paper's Figure 2 (its Section 6.1) on seeded synthetic data.

This module draws the problems and computes every row; :mod:`synthetic_report` writes the
CSV, the plots and the summary, and is the command line.

What is compared. One attention head in the merged form of docs/METHOD.md section 2: logits
S_i = X_i (M o W) X_i^T, causal softmax f_i(M), dense target b_i = f_i(1). Every method
produces a binary mask M at sparsity rho for the same W from the same calibration X, and is
scored by the attention error of that mask.

Error metric. ``error`` = sum_i ||f_i(M) - b_i||_F^2 / (k n): the squared L2 distance between a
pruned and a dense attention row, averaged over the k n query rows of the calibration
sequences (the paper's loss without the regulariser is (k n / 2) x this; dividing by k n makes
the two data sets and every n comparable). Always with the *binary* mask. ``heldout_error`` is
the same on 64 fresh sequences of the same distribution (the same W), i.e. generalisation.

Data (seeded, ``numpy.random.default_rng(seed)``, drawn in this order):
  * feature scales s_a = exp(0.5 z_a), z ~ N(0, 1), rescaled so mean(s^2) = 1: a spread of
    per-feature norms, as real post-norm activations have (with isotropic X, Wanda's score
    reduces to magnitude's and the input-aware baselines have nothing to use);
  * W = 2 / (d sqrt(d_h)) W_Q W_K^T with W_Q, W_K (d x d_h) standard normal, d_h = 16: a
    merged query-key matrix of rank d_h like a real head's, scaled so the logits have standard
    deviation ~2 (E[(x^T W y)^2] = 4 for independent tokens), i.e. attention that is neither
    uniform (every mask would then score ~0) nor one-hot;
  * calibration tokens x = s o z, z ~ N(0, I_d), i.i.d., 64 sequences of n_max tokens; the
    k = 16 set is the first 16 of them, and a sweep over n uses prefixes of length n;
  * held-out: 64 more sequences of n_max tokens, drawn the same way.

Baselines and orientation. The logits are (X (M o W)) X^T: the calibration X multiplies W's
rows on the query side, so the linear map the baselines preserve is X W, which as an
``nn.Linear`` with input X has weight W^T (out = columns of W, in = rows of W). Wanda and
SparseGPT prune W^T with ``LayerStats`` of all calibration tokens (k n, d) and their masks are
transposed back. They keep their own comparison groups: Wanda per output (a column of W);
SparseGPT per block of 128 input columns, which at d = 64 is the whole matrix. Its mask is
applied to the original W (``sparsegpt``: the paper compares masks); ``sparsegpt-update`` also
keeps its OBS-updated weights. ``magnitude`` (|W|), ``random`` (seeded) and ``wanda-bilinear``
(|W_ab| ||X_:a|| ||X_:b||, a control of ours: Wanda's score for the bilinear form, seeing the
key side too) are matrix-wide.

Non-linear method. Algorithm 1 from M_0 = 1 for T steps on the objective of
:mod:`nlprune.nonlinear.objective`, then the top (1 - rho) entries of M_T over the whole matrix
are kept (the paper: "keep the largest entries"; ``nonlinear-certified-row`` keeps them per
output like Wanda instead). Step rules:
  * ``nonlinear-fixed``: the paper's eta = 0.1 / lambda (no guarantee; ``loss_rises`` counts
    the steps whose loss went up);
  * ``nonlinear-certified``: the ``certified_local`` rule (each step certified by the segment
    curvature bound, starting from 1024 / L, never below 1/L): every step provably descends;
  * ``nonlinear-global``: the global certified step eta = 1 / L (L from
    :func:`nlprune.nonlinear.certified_lipschitz_bound`), for comparison.
All lambdas of a sweep run in one jitted program (``lax.map`` over a scan); the panel (c)
sweep over rho reuses the M_T of the default point (rho only enters the binarisation).

Outputs in the folder: ``synthetic.csv`` (one row per panel, data set, swept value, method),
``panel_a_lambda.png``, ``panel_b_n.png``, ``panel_c_rho.png`` and ``summary.json`` (settings,
data description, timings). CSV columns: ``panel`` (a, b, c), ``k``, ``n``, ``rho``,
``lambda`` (blank for methods without one), ``method``, ``error``, ``heldout_error``, and for
the non-linear rows ``final_loss`` (L(M_T), relaxed, with the regulariser), ``loss_rises``
(steps whose loss went up) and ``mean_eta`` (mean step size taken); ``seconds`` is the
execution time of producing that mask, compilation excluded (a solve shared by several rows
counts in each).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nlprune.methods import get_method
from nlprune.nonlinear import descent, lipschitz, objective
from nlprune.prune.stats import LayerStats
from nlprune.sparsity import assert_mask, mask_from_scores, parse_pattern

# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------

CSV_NAME = "synthetic.csv"
PANEL_FILES = {"a": "panel_a_lambda.png", "b": "panel_b_n.png", "c": "panel_c_rho.png"}
CSV_COLUMNS = (
    "panel", "k", "n", "rho", "lambda", "method", "error", "heldout_error",
    "final_loss", "loss_rises", "mean_eta", "seconds",
)
NONLINEAR_METHODS = (
    "nonlinear-fixed", "nonlinear-certified", "nonlinear-certified-row", "nonlinear-global",
)
BASELINE_METHODS = (
    "wanda", "sparsegpt", "sparsegpt-update", "magnitude", "wanda-bilinear", "random",
)
METHODS = NONLINEAR_METHODS + BASELINE_METHODS
LOCAL_FIRST_ETA_FACTOR = 1024.0  # certified_local's first try is this / L (the solver default)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a run; the defaults are docs/METHOD.md section 4 (the paper's)."""

    d: int = 64
    d_head: int = 16
    ks: tuple[int, ...] = (16, 64)
    n_default: int = 128
    rho_default: float = 0.5
    lam_default: float = 0.04
    lambdas: tuple[float, ...] = (
        0.001, 0.0025, 0.01, 0.02, 0.04, 0.08, 0.16, 0.64, 2.56,
    )
    n_values: tuple[int, ...] = (16, 32, 64, 128, 256)
    rhos: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    steps: int = 100
    paper_eta_times_lambda: float = 0.1  # eta = 0.1 / lambda
    logit_scale: float = 2.0
    feature_spread: float = 0.5
    n_heldout: int = 64

    def __post_init__(self):
        checks = [
            (self.d >= 2 and self.d_head >= 1,
             f"need d >= 2 and d_head >= 1, got {self.d}, {self.d_head}"),
            (len(self.ks) >= 1 and all(k >= 1 for k in self.ks), f"ks must be >= 1, got {self.ks}"),
            (self.n_default in self.n_values,
             f"n_default {self.n_default} must be one of n_values {self.n_values}"),
            (self.lam_default in self.lambdas,
             f"lam_default {self.lam_default} must be one of lambdas {self.lambdas}"),
            (self.rho_default in self.rhos,
             f"rho_default {self.rho_default} must be one of rhos {self.rhos}"),
            (all(lam > 0 for lam in self.lambdas),
             f"lambdas must be > 0 (eta = 0.1 / lambda), got {self.lambdas}"),
            (all(0 < r < 1 for r in self.rhos), f"rhos must be in (0, 1), got {self.rhos}"),
            (all(n >= 2 for n in self.n_values), f"n_values must be >= 2, got {self.n_values}"),
            (self.steps >= 1, f"steps (T) must be >= 1, got {self.steps}"),
            (self.n_heldout >= 1, f"n_heldout must be >= 1, got {self.n_heldout}"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"synthetic settings: {what}")

    @property
    def n_max(self) -> int:
        return max(self.n_values)

    @classmethod
    def quick(cls) -> Settings:
        """A tiny run with every panel, data set and method (tests; well under a minute).

        T stays 100: at this size compilation, not the steps, is the cost.
        """
        return cls(
            d=16, d_head=4, ks=(4, 8), n_default=32, lambdas=(0.01, 0.04), n_values=(16, 32),
            rhos=(0.3, 0.5, 0.7), n_heldout=8,
        )


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Problem:
    W: jax.Array  # (d, d) merged query-key matrix
    X: jax.Array  # (max k, n_max, d) calibration sequences
    X_heldout: jax.Array  # (n_heldout, n_max, d)
    feature_scales: np.ndarray  # (d,)


def draw_problem(settings: Settings, seed: int) -> Problem:
    """The seeded synthetic head; the distribution is described in the module docstring."""
    rng = np.random.default_rng(seed)
    d, dh = settings.d, settings.d_head
    scales = np.exp(settings.feature_spread * rng.standard_normal(d))
    scales /= np.sqrt(np.mean(scales**2))
    W_Q, W_K = rng.standard_normal((d, dh)), rng.standard_normal((d, dh))
    # E[(x^T W y)^2] = logit_scale^2 for independent tokens (sum_ab s_a^2 s_b^2 = d^2).
    W = settings.logit_scale / (d * math.sqrt(dh)) * (W_Q @ W_K.T)
    X = rng.standard_normal((max(settings.ks), settings.n_max, d)) * scales
    X_heldout = rng.standard_normal((settings.n_heldout, settings.n_max, d)) * scales
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return Problem(f32(W), f32(X), f32(X_heldout), scales)


@jax.jit
def attention_error(X: jax.Array, W_eff: jax.Array, target: jax.Array) -> jax.Array:
    """sum_i ||f_i - b_i||_F^2 / (k n) for the pruned merged matrix W_eff (= M o W)."""
    f = objective.attention(X, W_eff, jnp.ones_like(W_eff))
    return jnp.sum((f - target) ** 2) / (X.shape[0] * X.shape[1])


# --------------------------------------------------------------------------------------------
# The non-linear method, batched over lambda
# --------------------------------------------------------------------------------------------


def _solve_batch(X, W, target, lams, etas, floors, *, config: descent.GDConfig):
    """Algorithm 1 from M_0 = 1 for every (lambda, first eta, eta floor) of the batch."""
    segment = lipschitz.segment_curvature_bound if config.local else None

    def one(member):
        lam, eta, floor = member
        return descent.gd_core(
            objective.value_and_grad_closed_form, jnp.ones_like(W), (X, W, target, lam), eta,
            config, segment, floor,
        )

    # lax.map, not vmap: under vmap the step-size search (a while loop) runs in lockstep, so
    # every member would pay for the slowest one's retries
    return jax.lax.map(one, (lams, etas, floors))


@dataclasses.dataclass
class _Solved:
    M: np.ndarray  # (B, d, d)
    losses: np.ndarray  # (B, T + 1)
    etas: np.ndarray  # (B, T)
    seconds: float  # execution per batch member (compilation excluded)


class _Solver:
    """Compiles each (shape, batch, rule) once, ahead of time, so timings exclude compilation."""

    def __init__(self, steps: int):
        self.steps = steps
        self.compiled: dict[Any, Any] = {}
        self.compile_seconds = 0.0

    def __call__(self, local: bool, X, W, target, lams, etas, floors) -> _Solved:
        """``local``: the certified_local rule (first try ``etas``, floor ``floors``); else
        every member takes its fixed ``etas`` at every step."""
        args = (X, W, target) + tuple(jnp.asarray(a, jnp.float32) for a in (lams, etas, floors))
        key = (local, X.shape, len(lams))
        if key not in self.compiled:
            start = time.perf_counter()
            config = descent.GDConfig(steps=self.steps, local=local)
            fn = jax.jit(functools.partial(_solve_batch, config=config))
            self.compiled[key] = fn.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
        start = time.perf_counter()
        M, losses, steps = jax.block_until_ready(self.compiled[key](*args))
        seconds = (time.perf_counter() - start) / len(lams)
        return _Solved(np.asarray(M), np.asarray(losses), np.asarray(steps), seconds)

    def solve_rules(self, X, W, target, lams, lipschitz, eta_times_lambda) -> dict[str, _Solved]:
        """M_T of every lambda under the three step rules (see the module docstring)."""
        B = len(lams)
        # the paper's 0.1 / lambda and the global 1 / L are both fixed steps: one batch
        both = self(False, X, W, target, np.concatenate([lams, lams]),
                    np.concatenate([eta_times_lambda / lams, 1.0 / lipschitz]),
                    np.zeros(2 * B))
        split = {
            rule: _Solved(both.M[part], both.losses[part], both.etas[part], both.seconds)
            for rule, part in (("fixed", slice(0, B)), ("global", slice(B, 2 * B)))
        }
        split["certified"] = self(True, X, W, target, lams,
                                  LOCAL_FIRST_ETA_FACTOR / lipschitz, 1.0 / lipschitz)
        _assert_descent(split["global"], "global 1/L", np.zeros(B))
        _assert_descent(split["certified"], "certified_local", 1.0 / lipschitz)
        return split


def _rises(losses: np.ndarray) -> int:
    """Steps whose loss rose by more than float rounding (NaN / inf count as rises)."""
    diffs = np.diff(losses)
    return int(np.sum(~np.isfinite(diffs) | (diffs > descent.descent_tolerance(losses))))


def _assert_descent(solved: _Solved, rule: str, floors: np.ndarray) -> None:
    """The certified rules guarantee descent at every step: a rise here is a bug, not data."""
    for b, losses in enumerate(solved.losses):
        if _rises(losses):
            raise AssertionError(f"{rule} step rule: the loss rose (batch member {b}): {losses}")
        if np.any(solved.etas[b] < floors[b] * (1 - 1e-5)):
            raise AssertionError(f"{rule} step rule took a step below its certified floor 1/L")


# --------------------------------------------------------------------------------------------
# Masks and their errors
# --------------------------------------------------------------------------------------------


def _pattern(rho: float):
    return parse_pattern("unstructured", rho)


@functools.partial(jax.jit, static_argnames=("pattern", "group"))
def _top_mask(scores: jax.Array, pattern, group: str) -> jax.Array:
    # jitted: mask_from_scores' while/cond loops would otherwise compile on every eager call
    return mask_from_scores(scores, pattern, group)


def nonlinear_mask(M, rho: float, per_row: bool = False) -> jax.Array:
    """Keep the top (1 - rho) of M_T over the matrix, or per output (a column of W)."""
    pattern = _pattern(rho)
    if per_row:  # rows of M^T are W's columns, the outputs of the linear X W
        mask = _top_mask(jnp.asarray(M).T, pattern, "row")
        assert_mask(mask, pattern, "row")
        return mask.T
    mask = _top_mask(jnp.asarray(M), pattern, "matrix")
    assert_mask(mask, pattern, "matrix")
    return mask


class _Baselines:
    """The linear baselines and floors for one calibration set (k, n); see the docstring."""

    def __init__(self, X: jax.Array, W: jax.Array, seed: int):
        self.W, self.seed = W, seed
        self.k, self.n = int(X.shape[0]), int(X.shape[1])
        self.stats = LayerStats.from_inputs(X.reshape(-1, X.shape[-1]), with_hessian=True)
        self.warm: set[tuple[str, float]] = set()

    def _timed(self, name: str, rho: float, fn):
        if (name, rho) not in self.warm:  # compile outside the timing (patterns are static)
            jax.block_until_ready(fn())
            self.warm.add((name, rho))
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        return out, time.perf_counter() - start

    def masks(self, rho: float) -> dict[str, tuple[jax.Array, float]]:
        """method -> (effective merged matrix W_eff, seconds)."""
        W, W_lin, pattern = self.W, self.W.T, _pattern(rho)
        out: dict[str, tuple[jax.Array, float]] = {}
        for name in ("wanda", "sparsegpt"):
            method = get_method(name)
            res, sec = self._timed(name, rho, lambda m=method: m.prune(W_lin, self.stats, pattern))
            out[name] = (W * res.mask.T, sec)
            if name == "sparsegpt":
                out["sparsegpt-update"] = (res.weight.T, sec)
        magnitude = get_method("magnitude", group="matrix")
        res, sec = self._timed(
            "magnitude", rho, lambda: magnitude.prune(W_lin, self.stats, pattern)
        )
        out["magnitude"] = (W * res.mask.T, sec)
        norms = self.stats.norms  # ||X_:a||, the same features on both sides of the form
        scores = jnp.abs(W) * norms[:, None] * norms[None, :]
        mask, sec = self._timed("wanda-bilinear", rho,
                                lambda: _top_mask(scores, pattern, "matrix"))
        out["wanda-bilinear"] = (W * mask, sec)
        rng = np.random.default_rng((self.seed, 1, self.k, self.n, round(rho * 1e6)))
        scores = jnp.asarray(rng.random(W.shape), jnp.float32)
        mask, sec = self._timed("random", rho, lambda: _top_mask(scores, pattern, "matrix"))
        out["random"] = (W * mask, sec)
        return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Point:
    """Calibration / held-out data and targets for one (k, n)."""

    def __init__(self, problem: Problem, k: int, n: int):
        self.k, self.n = k, n
        self.X = problem.X[:k, :n]
        self.X_heldout = problem.X_heldout[:, :n]
        self.target = objective.dense_target(self.X, problem.W)
        self.target_heldout = objective.dense_target(self.X_heldout, problem.W)

    def errors(self, W_eff: jax.Array) -> tuple[float, float]:
        if not bool(jnp.all(jnp.isfinite(W_eff))):
            return math.nan, math.nan  # a diverged M_T has no meaningful mask
        return (float(attention_error(self.X, W_eff, self.target)),
                float(attention_error(self.X_heldout, W_eff, self.target_heldout)))


def _row(panel, k, n, rho, lam, method, errors, seconds, final_loss=None, rises=None,
         mean_eta=None) -> dict[str, Any]:
    return {
        "panel": panel, "k": k, "n": n, "rho": rho, "lambda": lam, "method": method,
        "error": errors[0], "heldout_error": errors[1], "final_loss": final_loss,
        "loss_rises": rises, "mean_eta": mean_eta, "seconds": seconds,
    }


def _nonlinear_rows(panel, point: _Point, W, rho, lam, solved: dict[str, _Solved], b: int):
    """The four non-linear rows of one point from batch member b of each step rule."""
    rows = []
    for method, rule, per_row in (
        ("nonlinear-fixed", "fixed", False),
        ("nonlinear-certified", "certified", False),
        ("nonlinear-certified-row", "certified", True),
        ("nonlinear-global", "global", False),
    ):
        s = solved[rule]
        M = s.M[b]
        start = time.perf_counter()
        if np.all(np.isfinite(M)):
            W_eff = W * jax.block_until_ready(nonlinear_mask(M, rho, per_row))
        else:
            W_eff = jnp.full_like(W, jnp.nan)
        seconds = s.seconds + time.perf_counter() - start
        rows.append(_row(panel, point.k, point.n, rho, lam, method, point.errors(W_eff), seconds,
                         float(s.losses[b, -1]), _rises(s.losses[b]), float(np.mean(s.etas[b]))))
    return rows


def _baseline_rows(panel, point: _Point, baselines: _Baselines, rho):
    return [_row(panel, point.k, point.n, rho, None, name, point.errors(W_eff), sec)
            for name, (W_eff, sec) in baselines.masks(rho).items()]


def _solve_all(solver: _Solver, point: _Point, W, lams, settings: Settings):
    lams = np.asarray(lams, np.float64)
    bounds = np.array(
        [lipschitz.certified_lipschitz_bound(point.X, W, lam, point.target) for lam in lams]
    )
    return solver.solve_rules(point.X, W, point.target, lams, bounds,
                              settings.paper_eta_times_lambda)


def run_rows(settings: Settings, seed: int = 0, progress: bool = True) -> tuple[list[dict], dict]:
    """All rows of the three panels, and timing information."""
    from tqdm.auto import tqdm

    problem = draw_problem(settings, seed)
    W = problem.W
    solver = _Solver(settings.steps)
    per_k = len(settings.lambdas) + len(settings.n_values) + len(settings.rhos)
    bar = tqdm(total=per_k * len(settings.ks), desc="synthetic points", unit="pt",
               disable=not progress, file=sys.stderr)
    rows: list[dict] = []
    lam0, n0, rho0 = settings.lam_default, settings.n_default, settings.rho_default
    for k in settings.ks:
        # (a) sweep lambda at (n0, rho0); its lam0 member also serves (b) at n0 and (c)
        point = _Point(problem, k, n0)
        baselines = _Baselines(point.X, W, seed)
        solved = _solve_all(solver, point, W, settings.lambdas, settings)
        base_rows = _baseline_rows("a", point, baselines, rho0)
        rows += base_rows
        for b, lam in enumerate(settings.lambdas):
            rows += _nonlinear_rows("a", point, W, rho0, lam, solved, b)
            bar.update()
        b0 = settings.lambdas.index(lam0)
        default = {rule: dataclasses.replace(s, M=s.M[b0:b0 + 1], losses=s.losses[b0:b0 + 1],
                                             etas=s.etas[b0:b0 + 1]) for rule, s in solved.items()}

        # (b) sweep n at (lam0, rho0)
        for n in settings.n_values:
            if n == n0:
                p, s, bl = point, default, [dict(r, panel="b") for r in base_rows]
            else:
                p = _Point(problem, k, n)
                s = _solve_all(solver, p, W, [lam0], settings)
                bl = _baseline_rows("b", p, _Baselines(p.X, W, seed), rho0)
            rows += bl + _nonlinear_rows("b", p, W, rho0, lam0, s, 0)
            bar.update()

        # (c) sweep rho at (n0, lam0): only the binarisation changes
        for rho in settings.rhos:
            rows += _baseline_rows("c", point, baselines, rho)
            rows += _nonlinear_rows("c", point, W, rho, lam0, default, 0)
            bar.update()
    bar.close()
    return rows, {"compile_seconds": solver.compile_seconds}
