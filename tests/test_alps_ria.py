"""ALPS and RIA against plain NumPy restatements of their reference codes (float64, one
iteration at a time, no batching), and what each method is for: ALPS reconstructs the layer
output better than the one-shot baselines at high sparsity, RIA's score is its formula."""

from __future__ import annotations

import numpy as np
import pytest

from nlprune.methods import get_method
from nlprune.prune import LayerStats
from nlprune.sparsity import parse_pattern
from test_prune_methods import correlated_inputs

PATTERNS = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)]
IDS = ["50%", "70%", "2:4"]


def _top_mask(z: np.ndarray, pattern) -> np.ndarray:
    """Keep the pattern's largest z^2: over the whole matrix, or N:M per row (stable ties)."""
    s = z * z
    keep = np.ones(s.shape, bool)
    if pattern.is_nm:
        g = s.reshape(s.shape[0], -1, pattern.m)
        low = np.argsort(g, axis=-1, kind="stable")[..., : pattern.m - pattern.n]
        k = np.ones(g.shape, bool)
        np.put_along_axis(k, low, False, axis=-1)
        return k.reshape(s.shape)
    keep.ravel()[np.argsort(s.ravel(), kind="stable")[: int(pattern.ratio * s.size)]] = False
    return keep


def alps_numpy(w, x, pattern, rho=0.1, max_iter=300, update_iter=3, switch_iter=30, cg_iters=10, damp=0.01):
    """ALPS as its reference runs it (alps.py, ALPS_admm): scaled ADMM with its rho schedule,
    then CG on the fixed support. Returns (mask, pruned weight, iterations)."""
    h = x.astype(np.float64).T @ x.astype(np.float64)
    h += damp * np.mean(np.diag(h)) * np.eye(h.shape[0])
    xn = np.sqrt(np.diag(h)) + 1e-8
    a = h / np.outer(xn, xn)
    b0 = w.astype(np.float64) * xn  # (out, in); the reference works on its transpose
    target = b0 @ a
    n_kept = b0.size * pattern.n / pattern.m if pattern.is_nm else round((1 - pattern.ratio) * b0.size)
    evals, evecs = np.linalg.eigh(a)
    inv = (evecs / (evals + rho)) @ evecs.T
    d = np.where(_top_mask(b0, pattern), b0, 0.0)
    d_init, v, b = d.copy(), np.zeros_like(b0), b0.copy()
    last, grown = d != 0, False
    it = 0
    for it in range(max_iter):
        b = (target - v + rho * d) @ inv
        z = v / rho + b
        d = np.where(_top_mask(z, pattern), z, 0.0)
        v = v + rho * (b - d)
        if (it + 1) % update_iter:
            continue
        keep = d != 0
        change = np.sum(keep != last)
        if change / n_kept > 0.1:
            grown, rho = True, rho * 1.3
        elif change / n_kept > 0.005:
            grown, rho = True, rho * 1.2
        elif change > 0.5:
            if grown:
                rho *= 1.1
            else:
                rho /= 5
                b, d, v = b0.copy(), d_init.copy(), np.zeros_like(b0)
        elif grown:
            break
        else:
            rho /= 5
        last = keep
        rho = min(rho, 1e6)
        inv = (evecs / (evals + rho)) @ evecs.T
        if it >= switch_iter and change / n_kept < 3e-4:
            break
    mask = _top_mask(b, pattern)
    sol = np.where(mask, b, 0.0)
    r = (target - sol @ a) * mask
    p, rr = r.copy(), np.sum(r * r, 1, keepdims=True)
    for _ in range(cg_iters):
        ap = p @ a
        alpha = rr / np.sum(p * ap, 1, keepdims=True)
        sol = sol + alpha * p
        r = (r - alpha * ap) * mask
        rr_new = np.sum(r * r, 1, keepdims=True)
        p, rr = r + rr_new / rr * p, rr_new
    return mask, np.where(mask, sol / xn, 0.0), it + 1


@pytest.mark.parametrize("sparsity", PATTERNS, ids=IDS)
def test_alps_follows_its_reference(sparsity):
    rng = np.random.default_rng(11)
    x = correlated_inputs(512, 64, seed=12)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    pattern = parse_pattern(*sparsity)
    method = get_method("alps")
    result = method.prune(w, LayerStats.from_inputs(x), pattern)
    mask, pruned = np.asarray(result.mask), np.asarray(result.weight)
    want_mask, want, iters = alps_numpy(w, x, pattern)
    assert method.reports[-1]["admm_iters"] == [iters]  # the same rho schedule and stopping point
    assert np.mean(mask != want_mask) < 0.005  # float32 against float64 near the threshold
    both = mask & want_mask
    np.testing.assert_allclose(pruned[both], want[both], rtol=2e-3, atol=2e-4 * np.abs(want).max())


def test_alps_beats_the_one_shot_baselines_at_high_sparsity():
    rng = np.random.default_rng(13)
    x = correlated_inputs(1024, 128, seed=14)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    stats = LayerStats.from_inputs(x)

    def error(name, sparsity):
        pruned = np.asarray(get_method(name).prune(w, stats, parse_pattern(*sparsity)).weight)
        return np.linalg.norm(x @ w.T - x @ pruned.T)

    for sparsity in [("unstructured", 0.7), ("2:4", None)]:
        errors = {name: error(name, sparsity) for name in ("alps", "sparsegpt", "wanda")}
        assert errors["alps"] < min(errors["sparsegpt"], errors["wanda"]), (sparsity, errors)


def test_alps_options_change_what_it_does():
    rng = np.random.default_rng(15)
    x = correlated_inputs(512, 64, seed=16)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    stats, pattern = LayerStats.from_inputs(x), parse_pattern("unstructured", 0.6)
    short = get_method("alps", admm_iters=3)
    short.prune(w, stats, pattern)
    assert short.reports[-1]["admm_iters"] == [3]
    plain = np.asarray(get_method("alps", pcg_steps=0).prune(w, stats, pattern).weight)
    polished = np.asarray(get_method("alps").prune(w, stats, pattern).weight)

    def error(p):
        return np.linalg.norm(x @ w.T - x @ p.T)

    assert error(polished) < error(plain)  # the CG on the fixed support lowers the layer error


def ria_numpy(w, sq_norms, pattern, a=0.5, per_row=False):
    """RIA's score and mask as its reference computes them (lib/prune.py, prune_ria)."""
    aw = np.abs(w.astype(np.float64))
    score = (aw / aw.sum(0) + aw / aw.sum(1, keepdims=True)) * np.sqrt(sq_norms.astype(np.float64)) ** a
    keep = np.ones(w.shape, bool)
    if pattern.is_nm:
        return _top_mask(np.sqrt(score), pattern)
    if per_row:
        low = np.argsort(score, 1, kind="stable")[:, : int(pattern.ratio * w.shape[1])]
        np.put_along_axis(keep, low, False, axis=1)
        return keep
    keep.ravel()[np.argsort(score.ravel(), kind="stable")[: int(pattern.ratio * w.size)]] = False
    return keep


@pytest.mark.parametrize("sparsity", PATTERNS, ids=IDS)
@pytest.mark.parametrize("group", ["matrix", "row"])
def test_ria_is_its_score(sparsity, group):
    rng = np.random.default_rng(17)
    x = correlated_inputs(256, 64, seed=18)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    stats, pattern = LayerStats.from_inputs(x), parse_pattern(*sparsity)
    result = get_method("ria", group=group).prune(w, stats, pattern)
    want = ria_numpy(w, np.asarray(stats.sq_norms), pattern, per_row=group == "row")
    assert np.mean(np.asarray(result.mask) != want) < 0.005  # float32 ties at the threshold at most
    np.testing.assert_array_equal(np.asarray(result.weight)[np.asarray(result.mask)], w[np.asarray(result.mask)])


def test_ria_exponent_weighs_the_activations():
    rng = np.random.default_rng(19)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    sq = np.ones(32, np.float32)
    sq[:4] = 1e16  # four loud input features (x1e4 in the score at a = 0.5)
    stats, pattern = LayerStats(sq, 100), parse_pattern("unstructured", 0.5)
    loud = np.asarray(get_method("ria").prune(w, stats, pattern).mask)[:, :4].mean()
    deaf = np.asarray(get_method("ria", activation_exponent=0.0).prune(w, stats, pattern).mask)[:, :4].mean()
    assert loud == 1.0 and deaf < 1.0


@pytest.mark.parametrize("options, flag", [
    ({"rho": 0.0}, "--rho"), ({"rho": -1.0}, "--rho"), ({"admm_iters": 0}, "--admm-iters"),
    ({"rho_every": 0}, "--rho-every"), ({"pcg_steps": -1}, "--pcg-steps"), ({"percdamp": 0.0}, "--percdamp"),
    ({"admm_iters": 2.5}, "--admm-iters"),
])
def test_alps_bad_options_name_the_flag(options, flag):
    with pytest.raises(ValueError, match=flag):
        get_method("alps", **options)


def test_ria_bad_options_name_the_flag():
    with pytest.raises(ValueError, match="--group"):
        get_method("ria", group="block")
    with pytest.raises(ValueError, match="--activation-exponent"):
        get_method("ria", activation_exponent=float("nan"))


@pytest.mark.parametrize("flags, message", [
    (["--prune-method", "alps", "--rho", "0"], "alps --rho must be a finite number > 0, got 0.0"),
    (["--prune-method", "alps", "--admm-iters", "0"], "alps --admm-iters must be an integer >= 1, got 0"),
    (["--prune-method", "ria", "--group", "block"], "argument --group: invalid choice: 'block'"),
    (["--prune-method", "ria", "--rho", "1"], "--rho (alps) does not apply to --prune-method ria"),
])
def test_bad_options_are_one_line_before_anything_loads(flags, message, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from nlprune import cards
    from nlprune.cli import main as cli_main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cards, "load_model", no_loading)
    try:
        rc = cli_main(["prune", "--model", str(tiny_model_dir), *flags, "--sparsity-ratio", "0.5",
                       "--output", str(tmp_path / "run")])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
