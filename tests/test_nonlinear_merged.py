"""Tests for the merged-W non-linear pruning objective, its certified step and the solver."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlprune.nonlinear import (
    attention,
    binarize,
    certified_lipschitz_bound,
    dense_target,
    grad_closed_form,
    gradient_descent,
    lam_from_paper,
    lipschitz_report,
    loss,
    method_md_bound,
    segment_curvature_bound,
    solve_merged,
    top_hessian_eigenvalue,
    value_and_grad_closed_form,
)
from nlprune.nonlinear.lipschitz import ROW_CONSTANT
from nlprune.sparsity import PatternError, parse_pattern


_grad_auto = jax.jit(jax.grad(loss))
_hessian = jax.jit(jax.hessian(loss))


@pytest.fixture
def x64():
    """float64 for this test only (the global flag is restored afterwards)."""
    with jax.enable_x64(True):
        yield


def problem(seed: int, k: int, n: int, d: int, x_scale: float | None = None, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x_scale = 1 / np.sqrt(d) if x_scale is None else x_scale
    X = jnp.asarray(rng.normal(size=(k, n, d)) * x_scale, dtype)
    W = jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), dtype)
    return X, W


# ----------------------------------------------------------------------------- objective


@pytest.mark.parametrize("k,n,d,lam", [(1, 5, 3, 0.0), (3, 12, 6, 0.04), (2, 9, 8, 0.7)])
def test_closed_form_gradient_matches_autodiff(x64, k, n, d, lam):
    X, W = problem(k * 100 + n, k, n, d, x_scale=1.0)  # peaked attention: a harder case
    rng = np.random.default_rng(d)
    target = dense_target(X, W)
    for M in (jnp.ones((d, d)), jnp.asarray(1 + 2 * rng.normal(size=(d, d)))):
        auto = _grad_auto(M, X, W, target, lam)
        closed = grad_closed_form(M, X, W, target, lam)
        assert closed.dtype == jnp.float64
        np.testing.assert_allclose(closed, auto, rtol=1e-10, atol=1e-12)
    # away from M = 1 the fit term is active, so the match is not just lam * M
    assert float(jnp.abs(auto - lam * M).max()) > 1e-4


def test_closed_form_gradient_with_other_target(x64):
    """The formula holds for any target b, not only f(1) (then grad at M = 1 is non-zero)."""
    X, W = problem(7, 2, 10, 4, x_scale=0.7)
    target = attention(X, W, jnp.asarray(np.random.default_rng(0).normal(size=(4, 4))))
    M = jnp.ones((4, 4))
    auto = _grad_auto(M, X, W, target, 0.1)
    np.testing.assert_allclose(grad_closed_form(M, X, W, target, 0.1), auto, rtol=1e-10)
    assert float(jnp.abs(auto - 0.1 * M).max()) > 1e-3


def test_attention_is_causal_row_stochastic_and_stable(x64):
    X, W = problem(1, 2, 7, 4, x_scale=1.0)
    M = jnp.ones((4, 4))
    f = attention(X, W, M)
    np.testing.assert_allclose(f.sum(-1), 1.0, rtol=1e-12)
    assert float(jnp.abs(jnp.triu(f, 1)).max()) == 0.0
    # the paper's D^{-1} A computed naively agrees where it does not overflow
    S = np.einsum("kra,ab,kjb->krj", X, W, X)
    A = np.tril(np.exp(S))
    np.testing.assert_allclose(f, A / A.sum(-1, keepdims=True), rtol=1e-12)
    # huge logits: the naive form overflows, the stable one stays finite and normalised
    big = attention(X, W, 500.0 * M)
    assert bool(jnp.all(jnp.isfinite(big)))
    np.testing.assert_allclose(big.sum(-1), 1.0, rtol=1e-12)
    assert bool(jnp.all(jnp.isfinite(grad_closed_form(500.0 * M, X, W, f, 0.1))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_respected(x64, dtype):
    X, W = problem(2, 2, 6, 4, dtype=dtype)
    M = jnp.ones((4, 4), dtype)
    value, grad = value_and_grad_closed_form(M, X, W, dense_target(X, W), 0.04)
    assert value.dtype == dtype and grad.dtype == dtype
    # at the dense mask the fit term vanishes: L(1) = lam/2 * d^2
    np.testing.assert_allclose(float(value), 0.5 * 0.04 * 16, rtol=1e-6)


def test_lam_from_paper():
    assert lam_from_paper(5.12, 128) == pytest.approx(0.04)


# ----------------------------------------------------------------------------- Lipschitz


def _row_curvature(s, t, b):
    """D^2 g(s)[t, t] for g(s) = 1/2 ||softmax(s) - b||^2."""
    g = lambda z: 0.5 * jnp.sum((jax.nn.softmax(z) - b) ** 2)  # noqa: E731
    return jax.jvp(lambda z: jax.jvp(g, (z,), (t,))[1], (s,), (t,))[1]


def _range_ratio(st, b):
    s, t = st
    return _row_curvature(s, t, b) / ((jnp.max(t) - jnp.min(t)) ** 2 / 4)


@jax.jit
def _ascent_extremes(starts, b, sign):
    """Gradient ascent (sign +1) or descent (-1) on the ratio from a batch of starts;
    returns the max and min ratio met along every trajectory."""
    step = jax.value_and_grad(_range_ratio)

    def one(st):
        def body(_, carry):
            st, hi, lo = carry
            val, gr = step(st, b)
            st = jax.tree.map(lambda a, g: a + 0.1 * sign * g, st, gr)
            return st, jnp.maximum(hi, val), jnp.minimum(lo, val)

        _, hi, lo = jax.lax.fori_loop(0, 150, body, (st, -jnp.inf, jnp.inf))
        return hi, lo

    return jax.vmap(one)(starts)


def test_row_curvature_lemma(x64):
    """Lemma 1: -(16/27 + beta) rho^2/4 <= D^2 g[t, t] <= (5/8 + beta) rho^2/4, probed by ascent."""
    rng = np.random.default_rng(3)
    m = 3  # one shape, one compilation; (1/2, 1/2, 0) still reaches the sharp case
    for conc in (0.1, 1.0, 5.0):
        b = jnp.asarray(rng.dirichlet(np.full(m, conc)))
        beta = float(b.max() - b.min())
        starts = (jnp.asarray(rng.normal(size=(6, m)) * 2), jnp.asarray(rng.normal(size=(6, m))))
        hi, _ = _ascent_extremes(starts, b, 1.0)
        _, lo = _ascent_extremes(starts, b, -1.0)  # same shapes: no recompilation
        assert float(hi.max()) <= ROW_CONSTANT + beta + 1e-9
        assert float(lo.min()) >= -(16 / 27 + beta) - 1e-9
        assert float(hi.max()) > 0.4  # the probe does reach the sharp region
    # the constant is nearly sharp (sup is 1/2 at p = (1/2, 1/2)): 1/4 would be wrong
    b = jnp.asarray([0.5, 0.5])
    assert float(_range_ratio((jnp.zeros(2), jnp.asarray([1.0, 0.0])), b)) == pytest.approx(0.5)


def _exact_hessian_extremes(X, W, target, lam, M):
    d = W.shape[0]
    H = _hessian(M, X, W, target, lam).reshape(d * d, d * d)
    eig = np.linalg.eigvalsh(np.asarray(H))
    return eig[0], eig[-1]


@pytest.mark.parametrize(
    "seed,k,n,d,lam,x_scale",
    [
        (0, 3, 12, 6, 0.04, None),
        (1, 2, 10, 5, 0.5, 1.0),
        (2, 4, 8, 4, 0.0, 0.6),
        (3, 1, 16, 3, 0.04, 2.0),
    ],
)
def test_certified_bound_dominates_hessian_everywhere(x64, seed, k, n, d, lam, x_scale):
    X, W = problem(seed, k, n, d, x_scale)
    target = dense_target(X, W)
    report = lipschitz_report(X, W, lam)
    bound = certified_lipschitz_bound(X, W, lam)
    assert bound == report.certified
    assert bound <= report.l2_route <= report.method_md  # ordering proven in the docstring
    rng = np.random.default_rng(seed + 10)
    points = [jnp.ones((d, d))] + [
        jnp.asarray(centre + spread * rng.normal(size=(d, d)))
        for spread in (0.3, 1.0, 4.0, 15.0)
        for centre in (1.0, 0.0)
    ]
    worst = 0.0
    for M in points:
        lo, hi = _exact_hessian_extremes(X, W, target, lam, M)
        worst = max(worst, abs(lo), abs(hi))
        assert abs(lo) <= bound and abs(hi) <= bound, (lo, hi, bound)
    # and METHOD.md's own (looser) bound holds too
    assert worst <= method_md_bound(X, W, lam)


def test_certified_bound_survives_adversarial_ascent(x64):
    """Push M towards the largest Hessian eigenvalue; the bound must still hold."""
    X, W = problem(5, 2, 6, 3, x_scale=1.0)
    target = dense_target(X, W)
    lam = 0.01
    bound = certified_lipschitz_bound(X, W, lam)

    def top_eig(M):
        H = jax.hessian(loss)(M, X, W, target, lam).reshape(9, 9)
        return jnp.max(jnp.abs(jnp.linalg.eigvalsh(H)))

    ascend = jax.jit(jax.value_and_grad(top_eig))
    rng = np.random.default_rng(0)
    best = 0.0
    for spread in (0.1, 2.0):
        M = jnp.asarray(1 + spread * rng.normal(size=(3, 3)))
        for _ in range(50):
            val, g = ascend(M)
            best = max(best, float(val))
            M = M + 0.5 * g / (jnp.linalg.norm(g) + 1e-12)
    assert best <= bound
    assert best > 1.2 * float(top_eig(jnp.ones((3, 3))))  # the ascent really found more curvature


def test_power_iteration_finds_known_spectrum(x64):
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    eig = np.array([-3.0, -1.0, 0.2, 0.5, 1.0, 2.0])
    A = jnp.asarray(Q @ np.diag(eig) @ Q.T)
    quad = lambda v, A: 0.5 * v @ A @ v  # noqa: E731
    est = top_hessian_eigenvalue(quad, jnp.zeros(6), A, iters=300)
    assert est.dominant == pytest.approx(-3.0, rel=1e-6)
    assert est.smallest == pytest.approx(-3.0, rel=1e-6)
    assert est.largest == pytest.approx(2.0, rel=1e-6)
    assert est.magnitude == pytest.approx(3.0, rel=1e-6)


def test_bound_vs_power_iteration_on_larger_problem(x64):
    X, W = problem(11, 4, 32, 16)
    lam = 0.04
    target = dense_target(X, W)
    bound = certified_lipschitz_bound(X, W, lam)
    rng = np.random.default_rng(1)
    for M in (jnp.ones((16, 16)), jnp.asarray(rng.normal(size=(16, 16)) * 3)):
        est = top_hessian_eigenvalue(loss, M, X, W, target, lam, iters=60)
        assert est.magnitude <= bound
        assert est.smallest <= est.largest


@jax.jit
def _directional_curvature(M, D, X, W, target, lam):
    grad = lambda m: jax.grad(loss)(m, X, W, target, lam)  # noqa: E731
    return jnp.vdot(D, jax.jvp(grad, (M,), (D,))[1])


def test_segment_certificate_dominates_curvature_on_the_segment(x64):
    """C_D >= |D^2 L(M + tau D)[D, D]| for tau in [0, 1], for small and large steps."""
    rng = np.random.default_rng(12)
    taus = np.linspace(0.0, 1.0, 11)
    tight = []
    for trial in range(12):
        X, W = problem(100 + trial, 2, 9, 4, x_scale=(0.3, 1.0, 2.0)[trial % 3])
        target = dense_target(X, W)
        lam = (0.0, 0.04, 1.0)[trial % 3]
        M = jnp.asarray(1 + (0.0, 1.0)[trial % 2] * rng.normal(size=(4, 4)))
        D = jnp.asarray(rng.normal(size=(4, 4)) * (0.01, 0.3, 3.0)[trial % 3])
        bound = float(segment_curvature_bound(M, D, X, W, target, lam))
        curv = max(
            abs(float(_directional_curvature(M + t * D, D, X, W, target, lam))) for t in taus
        )
        assert curv <= bound, (trial, curv, bound)
        if trial % 3 == 0:  # small steps: the certificate is local, hence tight
            tight.append(bound / curv)
    assert max(tight) < 3.0, tight


# ----------------------------------------------------------------------------- solver


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_certified_step_never_increases_the_loss(x64, dtype):
    X, W = problem(4, 3, 12, 6, x_scale=1.0, dtype=dtype)
    res = solve_merged(X, W, 0.04, steps=60, rule="certified")
    assert res.losses.dtype == dtype and res.params.dtype == dtype
    assert res.n_increases == 0
    assert res.losses[-1] < res.losses[0]
    # the recorded history is the loss of the returned mask
    final = loss(res.params, X, W, dense_target(X, W), 0.04)
    np.testing.assert_allclose(res.losses[-1], float(final), rtol=1e-5)


def test_backtracking_steps_all_descend(x64):
    X, W = problem(6, 3, 12, 6, x_scale=1.0)
    res = solve_merged(X, W, 0.04, steps=40, rule="backtracking")
    assert np.all(res.step_sizes > 0)
    assert np.all(np.diff(res.losses) <= 0)
    assert res.curvature is not None and res.step_sizes.max() <= 1 / res.curvature * (1 + 1e-12)
    certified = solve_merged(X, W, 0.04, steps=40, rule="certified")
    assert res.losses[-1] < certified.losses[-1]  # the measured curvature buys progress


def test_certified_local_descends_with_much_larger_steps():
    X, W = problem(13, 3, 12, 6, dtype=np.float32)  # diffuse attention: global L is pessimistic
    res = solve_merged(X, W, 0.04, steps=30, rule="certified_local")
    floor = 1.0 / res.lipschitz
    assert res.n_increases == 0
    assert np.median(res.step_sizes) >= 10 * floor
    glob = solve_merged(X, W, 0.04, steps=30, rule="certified")
    assert res.losses[-1] < glob.losses[-1]


def test_fixed_paper_step_and_require_certified(x64):
    X, W = problem(0, 3, 12, 6, x_scale=1.0)  # peaked attention
    lam = 0.04
    res = solve_merged(X, W, lam, steps=30, rule="fixed")  # eta = 0.1 / lam = 2.5
    np.testing.assert_allclose(res.step_sizes, 2.5)
    # the paper's step is far above the curvature here: the loss rises, and it is reported
    assert res.n_increases > 0 and res.max_increase > 0
    assert res.losses.max() > res.losses[0]
    bound = certified_lipschitz_bound(X, W, lam)
    with pytest.raises(ValueError, match=r"exceeds the certified step .* by a factor"):
        solve_merged(X, W, lam, steps=5, rule="fixed", require_certified=True)
    ok = solve_merged(X, W, lam, steps=5, rule="fixed", eta=0.5 / bound, require_certified=True)
    assert ok.n_increases == 0


def test_projection_keeps_mask_in_unit_box(x64):
    X, W = problem(9, 2, 10, 4, x_scale=1.0)
    res = solve_merged(X, W, 0.04, steps=15, rule="fixed", eta=0.5, project=True)
    assert float(res.params.min()) >= 0.0 and float(res.params.max()) <= 1.0
    unproj = solve_merged(X, W, 0.04, steps=15, rule="fixed", eta=0.1, init=2 * jnp.ones((4, 4)))
    assert float(unproj.params.max()) > 1.0  # without projection the mask leaves the box


def test_generic_loop_on_a_pytree(x64):
    """The loop is not tied to one array: a dict of masks with a joint loss."""
    X, W = problem(10, 2, 8, 4)
    target = dense_target(X, W)

    def vag(p, X, W, target):
        f = lambda p: loss(p["q"] * p["k"], X, W, target, 0.1)  # noqa: E731
        return jax.value_and_grad(f)(p)

    params = {"q": jnp.ones((4, 4)), "k": 0.5 * jnp.ones((4, 4))}
    res = gradient_descent(
        vag, params, (X, W, target), steps=10, rule="backtracking", curvature=1.0
    )
    assert set(res.params) == {"q", "k"}
    assert np.all(np.diff(res.losses) <= 0) and res.losses[-1] < res.losses[0]


# ----------------------------------------------------------------------------- binarize


@pytest.mark.parametrize("how", ["row", "matrix", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, "2:4", "4:8"])
def test_binarize_exact_sparsity(how, sparsity):
    rng = np.random.default_rng(0)
    M = jnp.asarray(rng.normal(size=(8, 16)))
    W = jnp.asarray(rng.normal(size=(8, 16)))
    if isinstance(sparsity, str) and how == "matrix":
        with pytest.raises(PatternError):
            binarize(M, W, sparsity, how)
        return
    mask = np.asarray(binarize(M, W, sparsity, how))
    if isinstance(sparsity, str):
        pattern = parse_pattern(sparsity)
    else:
        pattern = parse_pattern("unstructured", sparsity)
    scores = np.abs(np.asarray(M * W)) if how == "magnitude" else np.asarray(M)
    if pattern.is_nm:  # groups: m consecutive columns of a row
        keep, score = mask.reshape(-1, pattern.m), scores.reshape(-1, pattern.m)
        assert np.all(keep.sum(-1) == pattern.n)
    elif how == "matrix":
        keep, score = mask.reshape(1, -1), scores.reshape(1, -1)
        assert (~keep).sum() == int(8 * 16 * sparsity)
    else:
        keep, score = mask, scores
        assert np.all((~keep).sum(-1) == int(16 * sparsity))
    # within every group the kept scores are exactly the largest ones
    kept_min = np.where(keep, score, np.inf).min(-1)
    pruned_max = np.where(keep, -np.inf, score).max(-1)
    assert np.all(kept_min > pruned_max)


# ----------------------------------------------------------------------------- validation


def test_bad_inputs_raise(x64):
    X, W = problem(0, 1, 6, 3)
    with pytest.raises(ValueError, match="lam"):
        solve_merged(X, W, -0.1, steps=3)
    with pytest.raises(ValueError, match="lam"):
        certified_lipschitz_bound(X, W, -1.0)
    with pytest.raises(ValueError, match="eta"):
        solve_merged(X, W, 0.1, steps=3, rule="fixed", eta=0.0)
    with pytest.raises(ValueError, match="eta"):
        solve_merged(X, W, 0.1, steps=3, rule="fixed", eta=-1.0)
    for steps in (0, -2, 2.5):
        with pytest.raises(ValueError, match="steps"):
            solve_merged(X, W, 0.1, steps=steps)
    with pytest.raises(ValueError, match="unknown step rule"):
        solve_merged(X, W, 0.1, steps=3, rule="adam")
    with pytest.raises(ValueError, match="needs lam > 0"):
        solve_merged(X, W, 0.0, steps=3, rule="fixed")
    with pytest.raises(ValueError, match="W must be"):
        solve_merged(X, jnp.ones((4, 4)), 0.1, steps=3)
    with pytest.raises(ValueError, match="init"):
        solve_merged(X, W, 0.1, steps=3, init=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="lipschitz"):
        gradient_descent(value_and_grad_closed_form, W, (X, W, W, 0.1), steps=3, rule="certified")
    with pytest.raises(ValueError, match="unknown binarisation"):
        binarize(W, W, 0.5, how="column")
    with pytest.raises(ValueError, match="magnitude"):
        binarize(W, None, 0.5, how="magnitude")
    with pytest.raises(PatternError):
        binarize(W, W, 1.5)
