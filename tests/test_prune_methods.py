"""Pruning methods on single matrices: SparseGPT against a plain NumPy OBS, errors, the
reconstruction quality ordering. The contract every registered method keeps (invariants per
pattern, batching, pattern errors) is tests/test_method_contract.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlprune.methods import available_methods, get_method
from nlprune.prune import LayerStats, check_result
from nlprune.prune.obs import HessianFactorError, inverse_hessian_factor
from nlprune.sparsity import PatternError, assert_mask, mask_from_scores, parse_pattern

PATTERNS = {
    "unstructured-0.5": ("unstructured", 0.5),
    "unstructured-0.3": ("unstructured", 0.3),
    "2:4": ("2:4", None),
    "4:8": ("4:8", None),
}


def correlated_inputs(tokens: int, width: int, seed: int) -> np.ndarray:
    """X = Z A with a few features of much larger scale, like real LLM activations."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((width, width)) / np.sqrt(width) + np.eye(width)
    scale = np.exp(rng.normal(0.0, 1.0, width))
    scale[rng.choice(width, max(1, width // 32), replace=False)] *= 20.0
    return (rng.standard_normal((tokens, width)) @ a * scale).astype(np.float32)


# --------------------------------------------------------------------------------------------
# SparseGPT against an independent NumPy implementation
# --------------------------------------------------------------------------------------------


def _lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices (into the flattened array) of the k lowest scores, earlier index first on ties."""
    return np.argsort(scores.ravel(), kind="stable")[:k]


def sparsegpt_numpy(w, x, pattern, blocksize=128, percdamp=0.01):
    """OBS one weight at a time in float64: no blocks for the updates, no lazy batching."""
    w = w.astype(np.float64).copy()
    h = x.astype(np.float64).T @ x.astype(np.float64)
    rows, n = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * np.mean(np.diag(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: U^T U = H^-1
    d = np.diag(u)
    mask = np.ones_like(w, dtype=bool)
    for j in range(n):
        if not pattern.is_nm and j % blocksize == 0:
            end = min(j + blocksize, n)
            slab = (w[:, j:end] / d[j:end]) ** 2
            keep = np.ones(slab.size, bool)
            keep[_lowest(slab, int(pattern.ratio * slab.size))] = False
            mask[:, j:end] = keep.reshape(slab.shape)
        if pattern.is_nm and j % pattern.m == 0:
            group = (w[:, j : j + pattern.m] / d[j : j + pattern.m]) ** 2
            for r in range(rows):
                mask[r, j + _lowest(group[r], pattern.m - pattern.n)] = False
        q = np.where(mask[:, j], w[:, j], 0.0)
        err = (w[:, j] - q) / d[j]
        w[:, j:] -= np.outer(err, u[j, j:])  # every later column, directly
        w[:, j] = q
    return mask, w


@pytest.mark.parametrize(
    "shape, sparsity, blocksize",
    [
        ((16, 256), "unstructured-0.5", 128),  # two full blocks
        ((16, 200), "unstructured-0.3", 128),  # a short last block (72 columns)
        ((16, 200), "2:4", 128),
        ((16, 200), "4:8", 64),
    ],  # (16, 200) also serves test_invariants: the compiled programs are shared
)
def test_sparsegpt_matches_numpy_obs(shape, sparsity, blocksize):
    rows, n = shape
    rng = np.random.default_rng(1)
    x = correlated_inputs(1024, n, seed=2)
    x[:, 7] = 0.0  # a dead input: its weights must go and its Hessian entry be patched
    w = rng.standard_normal(shape).astype(np.float32)
    pattern = parse_pattern(*PATTERNS[sparsity])

    result = get_method("sparsegpt", blocksize=blocksize).prune(w, LayerStats.from_inputs(x), pattern)
    want_mask, want_w = sparsegpt_numpy(w, x, pattern, blocksize)

    got_mask, got_w = np.asarray(result.mask), np.asarray(result.weight)
    assert (got_mask == want_mask).all(), f"{(got_mask != want_mask).sum()} mask entries differ"
    rel = np.linalg.norm(got_w - want_w) / np.linalg.norm(want_w)
    assert rel < 1e-4, f"relative difference {rel:.2e} from the NumPy OBS"
    assert not got_mask[:, 7].any()
    # the update did something: kept weights moved away from their original values
    assert np.abs(got_w - w)[got_mask].max() > 1e-2


def test_inverse_hessian_factor_is_upper_cholesky_of_inverse():
    x = correlated_inputs(600, 300, seed=3).astype(np.float64)
    h = x.T @ x
    u, dead, damping, ok, retries = inverse_hessian_factor(jnp.asarray(h, jnp.float32), 0.01)
    assert int(retries) == 0
    want = np.linalg.cholesky(np.linalg.inv(h + float(damping) * np.eye(300))).T
    assert bool(ok) and not np.asarray(dead).any()
    assert np.isclose(float(damping), 0.01 * np.mean(np.diag(h)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(u), want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert (np.tril(np.asarray(u), -1) == 0).all()


def test_damping_retry_then_clear_error():
    n = 64
    h = np.eye(n, dtype=np.float32)
    h[3, 3] = -0.05  # mean diag ~0.98: 1% damping is not enough, 10% is
    _, _, damping, ok, retries = inverse_hessian_factor(jnp.asarray(h), 0.01)
    assert bool(ok) and int(retries) == 1
    assert np.isclose(float(damping), 0.1 * np.mean(np.diag(h)), rtol=1e-5)
    method = get_method("sparsegpt")  # the raised damping is recorded in the method's reports
    rng = np.random.default_rng(0)
    method.prune(rng.standard_normal((4, n)).astype(np.float32), LayerStats(jnp.ones(n), 10, jnp.asarray(h)),
                 parse_pattern("2:4"))
    assert len(method.reports) == 1 and method.reports[0]["retries"] == 1
    assert method.reports[0]["raised_damping"] == pytest.approx(float(damping), rel=1e-6)

    h[3, 3] = -1e6  # hopeless: every retry fails
    stats = LayerStats(jnp.ones(n), 10, jnp.asarray(h))
    with pytest.raises(HessianFactorError, match="not positive-definite.*percdamp"):
        get_method("sparsegpt").prune(np.ones((4, n), np.float32), stats, parse_pattern("2:4"))


# --------------------------------------------------------------------------------------------
# Invariants of every method x pattern
# --------------------------------------------------------------------------------------------


def _pruned_counts_per_group(mask: np.ndarray, pattern, group: str, blocksize: int):
    """(pruned, wanted) per comparison group, counted directly (not via patterns.py)."""
    rows, n = mask.shape
    if pattern.is_nm:
        pruned = (~mask).reshape(rows, n // pattern.m, pattern.m).sum(-1)
        return pruned, pattern.m - pattern.n
    if group == "row":
        return (~mask).sum(1), int(pattern.ratio * n)
    starts = range(0, n, blocksize)
    pruned = [(~mask[:, s : s + blocksize]).sum() for s in starts]
    wanted = [int(pattern.ratio * rows * min(blocksize, n - s)) for s in starts]
    return np.array(pruned), np.array(wanted)


def test_magnitude_keeps_largest_and_matrix_group():
    w = np.array([[0.1, -3.0, 0.2, 2.0], [5.0, 4.0, -6.0, 7.0]], np.float32)
    stats = LayerStats.from_inputs(np.ones((2, 4), np.float32), with_hessian=False)
    method = get_method("magnitude")
    per_row = np.asarray(method.prune(w, stats, parse_pattern("unstructured", 0.5)).mask)
    np.testing.assert_array_equal(per_row, [[0, 1, 0, 1], [0, 0, 1, 1]])
    per_matrix = np.asarray(
        get_method("magnitude", group="matrix").prune(w, stats, parse_pattern("unstructured", 0.5)).mask
    )
    np.testing.assert_array_equal(per_matrix, [[0, 0, 0, 0], [1, 1, 1, 1]])


def test_wanda_uses_input_norms():
    # Same |W| everywhere: only the input norms decide, and they differ per feature.
    w = np.ones((3, 8), np.float32)
    x = np.tile(np.arange(1, 9, dtype=np.float32), (5, 1))  # ||x_j|| grows with j
    result = get_method("wanda").prune(w, LayerStats.from_inputs(x), parse_pattern("2:4"))
    np.testing.assert_array_equal(np.asarray(result.mask), np.tile([0, 0, 1, 1] * 2, (3, 1)))


def test_checks_catch_violations():
    pattern = parse_pattern("unstructured", 0.5)
    w = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    result = get_method("magnitude").prune(w, LayerStats.from_inputs(np.ones((1, 4))), pattern)
    bad_mask = np.asarray(result.mask).copy()
    bad_mask[0, 0] = True  # one row now prunes 1 instead of 2
    with pytest.raises(AssertionError, match="expected"):
        assert_mask(bad_mask, pattern, "row")
    bad_weight = np.asarray(result.weight).copy()
    bad_weight[~np.asarray(result.mask)] = 1.0
    with pytest.raises(AssertionError, match="not exactly 0"):
        check_result(result._replace(weight=jnp.asarray(bad_weight)), w, pattern)


def _reference_keep(scores: np.ndarray, n_prune: int) -> np.ndarray:
    keep = np.ones(scores.size, bool)
    keep[_lowest(scores, n_prune)] = False
    return keep.reshape(scores.shape)


@pytest.mark.parametrize("ties", [False, True])
def test_mask_from_scores_matches_a_stable_sort(ties):
    rng = np.random.default_rng(11)
    scores = rng.standard_normal((6, 40)).astype(np.float32)
    if ties:  # many equal scores, -0.0 among them: the earlier entry must go first
        scores = np.round(scores)
    unstructured = parse_pattern("unstructured", 0.3)
    row = np.stack([_reference_keep(r, int(0.3 * 40)) for r in scores])
    matrix = _reference_keep(scores, int(0.3 * 240))
    widths = [(s, min(16, 40 - s)) for s in (0, 16, 32)]
    block = np.concatenate(
        [_reference_keep(scores[:, s : s + w], int(0.3 * 6 * w)) for s, w in widths], axis=1
    )
    n_m = np.stack([_reference_keep(g, 2) for g in scores.reshape(-1, 4)]).reshape(scores.shape)
    masks = jax.jit(mask_from_scores, static_argnames=("pattern", "group", "blocksize"))
    cases = [
        (masks(scores, unstructured, "row"), row),
        (masks(scores, unstructured, "matrix"), matrix),
        (masks(scores, unstructured, "block", blocksize=16), block),
        (masks(scores, parse_pattern("2:4")), n_m),
    ]
    for got, want in cases:
        np.testing.assert_array_equal(np.asarray(got), want)
    assert_mask(cases[2][0], unstructured, "block", blocksize=16)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_bad_ratio_and_pattern_messages():
    with pytest.raises(PatternError, match=r"1\.5 is outside \[0, 1\)"):
        parse_pattern("unstructured", 1.5)
    with pytest.raises(PatternError, match="unknown sparsity type"):
        parse_pattern("3-4")
    with pytest.raises(PatternError, match="blocksize to be a multiple of 8"):
        get_method("sparsegpt", blocksize=12).prune(
            np.ones((2, 16), np.float32),
            LayerStats.from_inputs(np.eye(16, dtype=np.float32)),
            parse_pattern("4:8"),
        )


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="unknown pruning method 'obs'") as info:
        get_method("obs")
    for name in available_methods():
        assert name in str(info.value)


def test_input_mismatches_are_clear():
    method = get_method("sparsegpt")
    no_hessian = LayerStats.from_inputs(np.ones((4, 8), np.float32), with_hessian=False)
    with pytest.raises(ValueError, match="needs the Hessian"):
        method.prune(np.ones((2, 8), np.float32), no_hessian, parse_pattern("2:4"))
    with pytest.raises(ValueError, match="has 6 input columns but its statistics have 8"):
        method.prune(np.ones((2, 6), np.float32), no_hessian, parse_pattern("2:4"))
    with pytest.raises(TypeError, match="unknown option.*'blocksiz'.*blocksize, percdamp"):
        get_method("sparsegpt", blocksiz=8)
    with pytest.raises(ValueError, match="percdamp must be > 0"):
        get_method("sparsegpt", percdamp=0.0)


# --------------------------------------------------------------------------------------------
# Statistics, quality, shared inputs
# --------------------------------------------------------------------------------------------


def test_layer_stats_accumulate_in_chunks():
    x = correlated_inputs(96, 40, seed=6).reshape(3, 32, 40)  # 3 windows of 32 tokens
    whole = LayerStats.from_inputs(x)
    chunked = LayerStats.from_chunks([x[0], x[1:]])
    stepwise = LayerStats.empty(40).accumulate(x[0]).accumulate(x[1]).accumulate(x[2])
    x64 = x.reshape(-1, 40).astype(np.float64)
    for stats in (whole, chunked, stepwise):
        assert stats.n_tokens == 96
        np.testing.assert_allclose(stats.hessian, x64.T @ x64, rtol=1e-4, atol=1e-2)
        np.testing.assert_allclose(stats.sq_norms, (x64**2).sum(0), rtol=1e-5)
    light = LayerStats.from_chunks([x[0], x[1]], with_hessian=False)
    assert light.hessian is None and light.n_tokens == 64
    with pytest.raises(ValueError, match="different linears"):
        whole.merge(LayerStats.empty(8))


def test_reconstruction_error_ordering():
    rng = np.random.default_rng(7)
    x = correlated_inputs(1024, 128, seed=8)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    stats = LayerStats.from_inputs(x)
    pattern = parse_pattern("unstructured", 0.5)

    def error(name):
        pruned = np.asarray(get_method(name).prune(w, stats, pattern).weight)
        return np.linalg.norm(x @ w.T - x @ pruned.T)

    errors = {name: error(name) for name in ("sparsegpt", "wanda", "magnitude")}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors
