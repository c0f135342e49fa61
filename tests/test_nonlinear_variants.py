"""The non-linear method beyond the paper: the attention-output objective, re-fitting the kept
weights (gradient steps for q/k/v, least squares for v/o/MLP), N:M masks, bad combinations."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlprune import api
from nlprune.cli import main as cli_main
from nlprune.prune import LayerStats, assert_mask, get_method, parse_pattern
from nlprune.prune import nonlinear_output as nlo
from nlprune.prune import refit as rf
from test_nonlinear_llama import prune_cli, tiny_layer  # tests/ is on sys.path (pytest's rootdir conftest)

PATTERN = parse_pattern("unstructured", 0.5)
NM = parse_pattern("2:4")


def wanda_init(attn, X, cos, sin):
    norms_x = jnp.sqrt(jnp.sum(X.reshape(-1, X.shape[-1]) ** 2, 0))
    norms_c = nlo._context_norms(attn, X, cos, sin)
    return {n: nlo.wanda_scores(getattr(attn, n).weight, norms_c if n == "o_proj" else norms_x) for n in nlo.ATTN_LINEARS}


def wanda_masks(attn, X, cos, sin, pattern):
    """Wanda's masks; o's per row of each KV group's column slice (the solver's comparison group)."""
    from nlprune.prune.patterns import mask_from_scores

    g = attn.num_kv_heads
    return {n: nlo.from_groups(n, mask_from_scores(nlo.to_groups(n, s, g), pattern, "row"))
            for n, s in wanda_init(attn, X, cos, sin).items()}


# ----------------------------------------------------------------------------- the split


@pytest.mark.parametrize("bias", [False, True])
def test_groups_sum_to_the_models_attention_output(bias):
    layer, X, cos, sin = tiny_layer(bias=bias)
    attn = layer.self_attn
    key = jax.random.PRNGKey(3)
    masks = {n: jax.random.bernoulli(k, 0.6, getattr(attn, n).weight.shape).astype(jnp.float32)
             for n, k in zip(nlo.ATTN_LINEARS, jax.random.split(key, 4))}
    groups = nlo.split_attention_groups(attn, masks)
    ours = nlo.stacked_response(groups, X, cos, sin, "output").sum(0)  # (windows, seq, hidden)
    masked = eqx.tree_at(lambda a: tuple(getattr(a, n).mask for n in nlo.ATTN_LINEARS), attn,
                         tuple(masks[n] for n in nlo.ATTN_LINEARS), is_leaf=lambda x: x is None)
    theirs = jax.vmap(lambda x: masked(x, cos, sin))(X)
    if bias:
        theirs = theirs - attn.o_proj.bias
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)
    for n in nlo.ATTN_LINEARS:  # the per-group layout round-trips
        a = masks[n]
        np.testing.assert_array_equal(nlo.from_groups(n, nlo.to_groups(n, a, attn.num_kv_heads)), a)


# ----------------------------------------------------------------------------- output objective


@pytest.mark.parametrize("pattern", [PATTERN, NM], ids=["unstructured", "2:4"])
def test_output_objective_starts_at_wanda_descends_and_beats_it(pattern):
    layer, X, cos, sin = tiny_layer()
    attn = layer.self_attn
    init = wanda_init(attn, X, cos, sin)
    masks, sol = nlo.solve_attention_masks(attn, X, cos, sin, pattern, init, objective="output", steps=20,
                                           eta=0.1, window_batch=1)
    assert sol.n_increases == 0  # every accepted step lowered its mini-batch's binary-mask loss
    assert sol.losses.shape == (2, 20, 2)  # 2 KV groups, 20 one-window rounds
    wanda = wanda_masks(attn, X, cos, sin, pattern)
    before = nlo.attention_loss(attn, X, cos, sin, wanda, "output")
    after = nlo.attention_loss(attn, X, cos, sin, masks, "output")
    assert after < 0.95 * before
    for n, m in masks.items():  # exact pattern; o's comparison group is a row of a group's slice
        assert m.dtype == jnp.bool_
        assert_mask(m, pattern, "row")
        if n == "o_proj" and not pattern.is_nm:
            for sl in nlo.to_groups(n, m, attn.num_kv_heads):
                assert_mask(sl, pattern, "row")
    if pattern.is_nm:
        for m in masks.values():
            counts = np.asarray(m).reshape(m.shape[0], -1, 4).sum(-1)
            assert np.all(counts == 2)


def test_output_objective_step_zero_sees_wanda_masks():
    layer, X, cos, sin = tiny_layer()
    attn = layer.self_attn
    init = wanda_init(attn, X, cos, sin)
    _, sol = nlo.solve_attention_masks(attn, X, cos, sin, PATTERN, init, objective="output", steps=4,
                                       eta=0.1, window_batch=None)  # full batch: step 0 is the whole loss
    wanda = wanda_masks(attn, X, cos, sin, PATTERN)
    assert sol.losses[:, 0, 0].sum() == pytest.approx(nlo.attention_loss(attn, X, cos, sin, wanda, "output"), rel=1e-4)
    assert np.all(np.diff(sol.losses[:, 0, :], axis=-1) <= 0)


def test_probs_objective_refuses_v_and_o():
    layer, X, cos, sin = tiny_layer()
    with pytest.raises(ValueError, match="probs objective sees only q_proj and k_proj"):
        nlo.solve_attention_masks(layer.self_attn, X, cos, sin, PATTERN, wanda_init(layer.self_attn, X, cos, sin),
                                  objective="probs")


# ----------------------------------------------------------------------------- gradient refit


@pytest.mark.parametrize("objective, names", [("probs", ("q_proj", "k_proj")), ("output", ("q_proj", "k_proj", "v_proj"))])
def test_gradient_refit_keeps_sparsity_and_lowers_the_objective(objective, names):
    layer, X, cos, sin = tiny_layer()
    attn = layer.self_attn
    masks = wanda_masks(attn, X, cos, sin, PATTERN)
    if objective == "probs":
        masks = {n: masks[n] for n in ("q_proj", "k_proj")}
    weights, sol = nlo.refit_attention(attn, X, cos, sin, masks, names, objective=objective, steps=10, eta=0.01)
    assert sol.n_increases == 0 and int(np.sum(sol.step_sizes > 0)) > 0
    for n in names:
        w = np.asarray(weights[n])
        assert np.all(w[~np.asarray(masks[n])] == 0)  # pruned weights stay exactly 0
        assert not np.allclose(w, np.asarray(getattr(attn, n).weight) * np.asarray(masks[n]))  # kept ones moved
    before = nlo.attention_loss(attn, X, cos, sin, masks, objective)
    after = nlo.attention_loss(attn, X, cos, sin, masks, objective, weights)
    assert after < 0.97 * before


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
    sg = get_method("sparsegpt").prune(W, stats, PATTERN, blocksize=16)
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
    u, _ = rf.SparseGPT.factor(sp, 0.01)
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
    from nlprune.prune import nonlinear as nl
    from nlprune.modeling.forward import after_attention, attn_context, mlp_hidden
    from nlprune.prune.pipeline import prune_layer_true_sequential

    layer, X, cos, sin = tiny_layer()
    method = get_method("nonlinear")
    options = method.resolve_options(straight_through=True, refit=True, steps=3)
    errors = {}
    for target in ("input", "dense"):
        monkeypatch.setattr(nl, "REFIT_O_TARGET" if stage == "o" else "REFIT_DOWN_TARGET", target)
        pruned, _ = prune_layer_true_sequential(layer, X, cos, sin, method, PATTERN, options, 2)
        if stage == "o":
            mine = pruned.self_attn.o_proj(attn_context(pruned, X, cos, sin))
            dense = layer.self_attn.o_proj(attn_context(layer, X, cos, sin))
        else:
            mid = after_attention(pruned, X, attn_context(pruned, X, cos, sin))
            mine = pruned.mlp.down_proj(mlp_hidden(pruned, mid))
            dense = layer.mlp.down_proj(mlp_hidden(layer, mid))
        errors[target] = float(jnp.sum((mine - dense) ** 2))
    assert errors["dense"] < 0.98 * errors["input"], errors


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "extra",
    [
        ["--sparsity-ratio", "0.5", "--straight-through", "--objective", "output", "--refit", "--steps", "3",
         "--refit-steps", "2", "--refit-cg", "3"],
        ["--sparsity-type", "2:4", "--straight-through", "--objective", "output", "--refit", "--steps", "3",
         "--refit-steps", "2", "--linear-method", "sparsegpt", "--no-true-sequential"],
        ["--sparsity-type", "2:4", "--steps", "3", "--refit", "--refit-steps", "2"],  # paper recipe, relaxed masks
    ],
    ids=["output-refit", "output-2of4-sparsegpt-layer-at-once", "paper-2of4-refit"],
)
def test_prune_cli_variants_end_to_end(extra, tiny_model_dir, shared_data_dir, tmp_path):
    out = tmp_path / "run"
    assert prune_cli(tiny_model_dir, shared_data_dir, out, *extra) == 0
    rec = json.loads((out / "results.json").read_text())
    options = rec["args"]["options"]
    assert options["refit"] and options["refit_steps"] == 2 and options["refit_eta"] == 0.01
    assert all(v == 0.5 for v in rec["sparsity"]["per_linear"].values())
    reports = rec["method_reports"]
    assert len(reports) == 6 and all(r["refit"]["n_increases"] == 0 for r in reports)
    if options["objective"] == "output":
        assert all(r["n_increases"] == 0 for r in reports)
    model, _ = api.load_run(out)
    pattern = parse_pattern(rec["args"]["sparsity_type"], 0.5)
    for layer in model.model.layers:
        for name, lin in layer.linears().items():
            mask = np.asarray(lin.mask).astype(bool)
            w = np.asarray(lin.weight)
            assert np.all(w[~mask] == 0), name
            if pattern.is_nm or name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                assert_mask(mask, pattern, "row")  # 2:4: exactly 2 of every 4


def test_refit_changes_the_weights_but_not_the_masks(tiny_model_dir, shared_data_dir, tmp_path):
    """Same options with and without --refit: layer 0's q/k/v masks are the same (same inputs;
    o and the MLP see the re-fitted q/k/v), every weight is re-fitted."""
    base = ["--sparsity-ratio", "0.5", "--straight-through", "--steps", "3"]
    assert prune_cli(tiny_model_dir, shared_data_dir, tmp_path / "a", *base) == 0
    assert prune_cli(tiny_model_dir, shared_data_dir, tmp_path / "b", *base, "--refit", "--refit-steps", "3") == 0
    a, _ = api.load_run(tmp_path / "a")
    b, _ = api.load_run(tmp_path / "b")
    la, lb = a.model.layers[0].linears(), b.model.layers[0].linears()
    for name in la:
        if name in ("q_proj", "k_proj", "v_proj"):
            assert bool(jnp.all(la[name].mask == lb[name].mask)), name
        assert not bool(jnp.allclose(la[name].weight, lb[name].weight)), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--objective", "output"], "--objective output needs --straight-through"),
        (["--straight-through", "--objective", "output", "--window-chunk", "1"], "--window-chunk is not supported"),
        (["--refit-steps", "3"], "--refit-steps applies only with --refit"),
        (["--refit-eta", "0.1", "--refit-cg", "2"], "--refit-eta, --refit-cg apply only with --refit"),
        (["--refit", "--refit-eta", "0"], "--refit-eta must be a finite number > 0"),
        (["--refit", "--refit-steps", "-1"], "--refit-steps must be an integer >= 0"),
        (["--refit", "--refit-cg", "-2"], "--refit-cg must be an integer >= 0"),
    ],
)
def test_bad_variant_arguments(args, message, tiny_model_dir, shared_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert prune_cli(tiny_model_dir, shared_data_dir, out, "--sparsity-ratio", "0.5", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "results.json").exists()


def test_variant_flags_with_another_method_are_refused(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    rc = cli_main(["prune", "--model", str(tiny_model_dir), "--data-dir", str(shared_data_dir), "--output",
                   str(tmp_path / "r"), "--prune-method", "sparsegpt", "--sparsity-ratio", "0.5", "--refit"])
    assert rc == 2 and "apply only to --prune-method nonlinear" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --recipe


def test_recipe_best_prunes_as_its_flags_do(tiny_model_dir, shared_data_dir, tmp_path):
    """--recipe best is --straight-through --linear-method sparsegpt --refit: the same masks and
    weights on every layer; a flag given with it wins over the preset."""
    short = ["--sparsity-ratio", "0.5", "--steps", "3", "--refit-steps", "2", "--refit-cg", "2"]
    assert prune_cli(tiny_model_dir, shared_data_dir, tmp_path / "preset", *short, "--recipe", "best") == 0
    flags = ["--straight-through", "--linear-method", "sparsegpt", "--refit"]
    assert prune_cli(tiny_model_dir, shared_data_dir, tmp_path / "flags", *short, *flags) == 0
    options = json.loads((tmp_path / "preset" / "results.json").read_text())["args"]["options"]
    assert options["recipe"] == "best" and options["straight_through"] and options["refit"]
    assert options["linear_method"] == "sparsegpt" and options["refit_steps"] == 2
    a, _ = api.load_run(tmp_path / "preset")
    b, _ = api.load_run(tmp_path / "flags")
    for la, lb in zip(a.model.layers, b.model.layers):
        for name, lin in la.linears().items():
            assert bool(jnp.all(lin.mask == lb.linears()[name].mask)), name
            np.testing.assert_array_equal(np.asarray(lin.weight), np.asarray(lb.linears()[name].weight), err_msg=name)
    method = get_method("nonlinear")
    assert method.resolve_options(recipe="best", linear_method="wanda")["linear_method"] == "wanda"
    fast = method.resolve_options(recipe="fast")
    assert fast["straight_through"] and fast["refit"] and fast["linear_method"] == "sparsegpt"
    assert (fast["steps"], fast["refit_steps"], fast["refit_cg"]) == (10, 0, 10)
    assert method.resolve_options(recipe="fast", steps=3)["steps"] == 3
    paper = method.resolve_options()
    assert paper["recipe"] == "paper" and not paper["straight_through"] and not paper["refit"]
    assert paper["mask_init"] == "ones" and paper["steps"] == 100 and paper["linear_method"] == "wanda"


def test_unknown_recipe_is_refused(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown --recipe 'quick'; use one of paper, best, fast"):
        get_method("nonlinear").resolve_options(recipe="quick")
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        prune_cli(tiny_model_dir, shared_data_dir, out, "--recipe", "quick")
    assert "invalid choice: 'quick'" in capsys.readouterr().err and not out.exists()
