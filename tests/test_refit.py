"""Least-squares re-fitting of the kept weights on fixed masks (nlprune.prune.refit): the OBS
update against the exact least squares, SparseGPT as a special case, the corrected target,
and the o/down stages towards the dense sublayer outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlprune.methods import get_method
from nlprune.prune import LayerStats, obs
from nlprune.prune import refit as rf
from nlprune.sparsity import parse_pattern
from test_nonlinear_qk import tiny_layer  # tests/ is on sys.path (pytest's rootdir conftest)

PATTERN = parse_pattern("unstructured", 0.5)
NM = parse_pattern("2:4")


# ----------------------------------------------------------------------------- least-squares refit


def _linear_problem(seed=0, tokens=400, d=48, rows=12):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    X = jax.random.normal(k1, (tokens, d)) @ jax.random.normal(k2, (d, d))  # correlated inputs
    W = jax.random.normal(k3, (rows, d))
    return X, W, LayerStats.from_inputs(X)


@pytest.mark.parametrize("pattern", [PATTERN, NM], ids=["unstructured", "2:4"])
def test_obs_refit_keeps_the_mask_and_lowers_the_linear_error(pattern):
    X, W, stats = _linear_problem()
    wanda = get_method("wanda").prune(W, stats, pattern)
    (r,) = rf.obs_refit([W], [wanda.mask], stats, blocksize=16)
    assert bool(jnp.all(r.mask == wanda.mask)) and int(jnp.sum((r.weight != 0) & ~r.mask)) == 0
    plain = rf.linear_error(wanda.weight, W, stats.hessian)
    refit = rf.linear_error(r.weight, W, stats.hessian)
    assert refit < 0.9 * plain
    (c,) = rf.cg_polish([r], [W], stats, 30)  # towards the exact row-wise least squares
    assert int(jnp.sum((c.weight != 0) & ~c.mask)) == 0
    polished = rf.linear_error(c.weight, W, stats.hessian)
    H = np.asarray(rf.damped_hessian(stats), np.float64)
    exact = np.zeros(W.shape)
    for i in range(W.shape[0]):
        s = np.asarray(wanda.mask[i])
        exact[i, s] = np.linalg.solve(H[np.ix_(s, s)], H[s] @ np.asarray(W[i], np.float64))
    best = rf.linear_error(jnp.asarray(exact, jnp.float32), W, stats.hessian)
    assert polished <= refit and polished == pytest.approx(best, rel=2e-2)


def test_obs_refit_on_sparsegpts_mask_is_sparsegpt():
    X, W, stats = _linear_problem(1)
    sg = get_method("sparsegpt", blocksize=16).prune(W, stats, PATTERN)
    (r,) = rf.obs_refit([W], [sg.mask], stats, blocksize=16)
    np.testing.assert_allclose(np.asarray(r.weight), np.asarray(sg.weight), atol=1e-5)


def test_corrected_target_approaches_the_dense_output():
    """Inputs X_p (pruned upstream) != X_d (dense upstream, here X_p with its features
    rescaled): re-fitting towards w* lowers ||X_p w - X_d w0|| below re-fitting towards w0
    itself (SparseGPT's target), which reproduces the upstream error."""
    X, W, stats = _linear_problem(2)
    Xp = X * jnp.linspace(0.5, 1.5, X.shape[1])
    sp = LayerStats.from_inputs(Xp)
    mask = get_method("wanda").prune(W, sp, PATTERN).mask
    u = obs.factor(sp, 0.01).u
    target = rf.corrected_target(W, u, Xp.T @ X, sp.hessian)
    same = rf.corrected_target(W, u, sp.hessian, sp.hessian)  # X_d = X_p: SparseGPT's own target
    np.testing.assert_allclose(np.asarray(same), np.asarray(W), rtol=1e-5, atol=1e-5)
    (plain,) = rf.obs_refit([W], [mask], sp, blocksize=16)
    (corr,) = rf.obs_refit([W], [mask], sp, blocksize=16, targets=[target])

    def err(w):
        return float(jnp.sum((Xp @ w.T - X @ W.T) ** 2))

    assert err(corr.weight) < 0.9 * err(plain.weight)


@pytest.mark.parametrize("stage", ["o", "down"])
def test_refit_towards_the_dense_sublayer_beats_sparsegpts_target(stage, monkeypatch):
    """In the true-sequential layer step, o (down) re-fitted towards the dense attention (MLP)
    output on the same inputs is closer to it, on the calibration windows, than o (down)
    re-fitted towards the dense weight on its own pruned input (SparseGPT's target)."""
    from nlprune.modeling.forward import after_attention, attn_context, mlp_hidden
    from nlprune.prune.pipeline import prune_layer_true_sequential

    layer, X, cos, sin = tiny_layer()
    method = get_method("nonlinear", straight_through=True, refit=True, steps=3)
    errors = {}
    for target in ("input", "dense"):
        monkeypatch.setattr(rf, "O_TARGET" if stage == "o" else "DOWN_TARGET", target)
        pruned, _ = prune_layer_true_sequential(layer, X, cos, sin, method, PATTERN, 2)
        if stage == "o":
            mine = pruned.self_attn.o_proj(attn_context(pruned, X, cos, sin))
            dense = layer.self_attn.o_proj(attn_context(layer, X, cos, sin))
        else:
            mid = after_attention(pruned, X, attn_context(pruned, X, cos, sin))
            mine = pruned.mlp.down_proj(mlp_hidden(pruned, mid))
            dense = layer.mlp.down_proj(mlp_hidden(layer, mid))
        errors[target] = float(jnp.sum((mine - dense) ** 2))
    assert errors["dense"] < 0.98 * errors["input"], errors




def test_refit_flags_need_refit():
    with pytest.raises(ValueError, match="--refit-cg applies only with --refit"):
        get_method("wanda", refit_cg=3)
    with pytest.raises(ValueError, match="--refit-cg must be an integer >= 0"):
        get_method("magnitude", refit=True, refit_cg=-1)


def test_refit_percdamp_is_a_ridge_towards_the_unpruned_weights():
    """--refit-percdamp p adds p * mean(diag H) to H's diagonal: on a fixed mask the refit then
    solves min (w - w0)^T (H + lambda I) (w - w0), a ridge that pulls the kept weights back to
    their unpruned values. Checked against that closed form (NumPy), and for its effect: the
    larger p, the closer to the merely masked weights and the larger the calibration error."""
    X, W, stats = _linear_problem(3)
    mask = get_method("wanda").prune(W, stats, PATTERN).mask
    masked = np.where(np.asarray(mask), np.asarray(W), 0.0)
    H = np.asarray(stats.hessian, np.float64)
    H[np.diag_indices_from(H)] += np.diag(H) == 0
    distances, errors = [], []
    for percdamp in (0.01, 0.1, 1.0, 10.0):
        (r,) = rf.obs_refit([W], [mask], stats, percdamp=percdamp, blocksize=16)
        (c,) = rf.cg_polish([r], [W], stats, 200, percdamp)
        ridge = H + percdamp * np.mean(np.diag(H)) * np.eye(H.shape[0])
        exact = np.zeros(W.shape)
        for i in range(W.shape[0]):
            s = np.asarray(mask[i])
            exact[i, s] = np.linalg.solve(ridge[np.ix_(s, s)], ridge[s] @ np.asarray(W[i], np.float64))
        np.testing.assert_allclose(np.asarray(c.weight), exact, rtol=2e-3, atol=2e-3 * np.abs(exact).max())
        distances.append(float(np.linalg.norm(exact - masked)))
        errors.append(rf.linear_error(jnp.asarray(exact, jnp.float32), W, stats.hessian))
    assert all(a > b for a, b in zip(distances, distances[1:])), distances
    assert all(a < b for a, b in zip(errors, errors[1:])), errors
    assert distances[-1] < 0.2 * distances[0]
    assert errors[-1] < rf.linear_error(jnp.asarray(masked, jnp.float32), W, stats.hessian)


def test_refit_percdamp_reaches_the_pruned_weights(tiny_model_dir, shared_data_dir):
    """The flag is not only parsed: a whole prune with --refit at two dampings gives layer 0's
    q_proj (whose inputs no pruning has touched yet) the same Wanda mask and different weights,
    the larger damping closer to the masked dense ones."""
    from nlprune import api

    loaded = api.load(str(tiny_model_dir))
    w0 = loaded.model.model.layers[0].self_attn.q_proj.weight
    runs = {}
    for percdamp in (0.01, 10.0):
        pruned, record = api.prune(loaded, "wanda", 0.5, nsamples=2, seqlen=32, data_dir=shared_data_dir,
                                   options={"refit": True, "refit_percdamp": percdamp}, progress=False)
        assert record["args"]["options"]["refit_percdamp"] == percdamp
        q = pruned.model.layers[0].self_attn.q_proj
        runs[percdamp] = (q.mask, q.effective_weight)
    (m1, w1), (m2, w2) = runs[0.01], runs[10.0]
    assert bool(jnp.all(m1 == m2))
    masked = jnp.where(m1, w0, 0)
    assert float(jnp.linalg.norm(w2 - masked)) < 0.5 * float(jnp.linalg.norm(w1 - masked))
