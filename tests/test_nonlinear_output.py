"""The non-linear method beyond the paper (nlprune.nonlinear.output, options, method): the
attention-output objective, re-fitting the kept weights by gradient steps, N:M masks, the
recipes, bad combinations."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlprune import api
from nlprune.cli import main as cli_main
from nlprune.methods import get_method
from nlprune.nonlinear import groups, output
from nlprune.nonlinear.options import NonlinearOptions
from nlprune.prune.wanda import wanda_scores
from nlprune.sparsity import assert_mask, mask_from_scores, parse_pattern
from test_nonlinear_qk import tiny_layer, to_float64  # tests/ is on sys.path (pytest's rootdir conftest)

PATTERN = parse_pattern("unstructured", 0.5)
NM = parse_pattern("2:4")


def wanda_init(attn, X, cos, sin):
    norms_x = jnp.sqrt(jnp.sum(X.reshape(-1, X.shape[-1]) ** 2, 0))
    ctx = jax.vmap(lambda x: attn.context(x, cos, sin))(X)
    norms_c = jnp.sqrt(jnp.sum(jnp.square(ctx.reshape(-1, ctx.shape[-1])), 0))
    return {n: wanda_scores(getattr(attn, n).weight, norms_c if n == "o_proj" else norms_x) for n in groups.ATTN_LINEARS}


def wanda_masks(attn, X, cos, sin, pattern):
    """Wanda's masks; o's per row of each KV group's column slice (the solver's comparison group)."""
    g = attn.num_kv_heads
    return {n: groups.from_groups(n, mask_from_scores(groups.to_groups(n, s, g), pattern, "row"))
            for n, s in wanda_init(attn, X, cos, sin).items()}


# ----------------------------------------------------------------------------- the split


@pytest.mark.parametrize("bias", [False, True])
def test_groups_sum_to_the_models_attention_output(bias):
    layer, X, cos, sin = tiny_layer(bias=bias)
    attn = layer.self_attn
    key = jax.random.PRNGKey(3)
    masks = {n: jax.random.bernoulli(k, 0.6, getattr(attn, n).weight.shape).astype(jnp.float32)
             for n, k in zip(groups.ATTN_LINEARS, jax.random.split(key, 4))}
    stack = groups.split_attention_groups(attn, masks)
    ours = groups.stacked_response(stack, X, cos, sin, "output").sum(0)  # (windows, seq, hidden)
    masked = eqx.tree_at(lambda a: tuple(getattr(a, n).mask for n in groups.ATTN_LINEARS), attn,
                         tuple(masks[n] for n in groups.ATTN_LINEARS), is_leaf=lambda x: x is None)
    theirs = jax.vmap(lambda x: masked(x, cos, sin))(X)
    if bias:
        theirs = theirs - attn.o_proj.bias
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)
    for n in groups.ATTN_LINEARS:  # the per-group layout round-trips
        a = masks[n]
        np.testing.assert_array_equal(groups.from_groups(n, groups.to_groups(n, a, attn.num_kv_heads)), a)


# ----------------------------------------------------------------------------- output objective


@pytest.mark.parametrize("pattern", [PATTERN, NM], ids=["unstructured", "2:4"])
def test_output_objective_starts_at_wanda_descends_and_beats_it(pattern):
    layer, X, cos, sin = tiny_layer()
    attn = layer.self_attn
    init = wanda_init(attn, X, cos, sin)
    masks, sol = output.solve_attention_masks(attn, X, cos, sin, pattern, init, objective="output", steps=20,
                                           eta=0.1, window_batch=1)
    assert sol.n_increases == 0  # every accepted step lowered its mini-batch's binary-mask loss
    assert sol.losses.shape == (2, 20, 2)  # 2 KV groups, 20 one-window rounds
    wanda = wanda_masks(attn, X, cos, sin, pattern)
    before = output.attention_loss(attn, X, cos, sin, wanda, "output")
    after = output.attention_loss(attn, X, cos, sin, masks, "output")
    assert after < 0.95 * before
    for n, m in masks.items():  # exact pattern; o's comparison group is a row of a group's slice
        assert m.dtype == jnp.bool_
        assert_mask(m, pattern, "row")
        if n == "o_proj" and not pattern.is_nm:
            for sl in groups.to_groups(n, m, attn.num_kv_heads):
                assert_mask(sl, pattern, "row")
    if pattern.is_nm:
        for m in masks.values():
            counts = np.asarray(m).reshape(m.shape[0], -1, 4).sum(-1)
            assert np.all(counts == 2)


def test_output_objective_step_zero_sees_wanda_masks():
    layer, X, cos, sin = tiny_layer()
    attn = layer.self_attn
    init = wanda_init(attn, X, cos, sin)
    _, sol = output.solve_attention_masks(attn, X, cos, sin, PATTERN, init, objective="output", steps=4,
                                       eta=0.1, window_batch=None)  # full batch: step 0 is the whole loss
    wanda = wanda_masks(attn, X, cos, sin, PATTERN)
    assert sol.losses[:, 0, 0].sum() == pytest.approx(output.attention_loss(attn, X, cos, sin, wanda, "output"), rel=1e-4)
    assert np.all(np.diff(sol.losses[:, 0, :], axis=-1) <= 0)


def test_probs_objective_refuses_v_and_o():
    layer, X, cos, sin = tiny_layer()
    with pytest.raises(ValueError, match="probs objective sees only q_proj and k_proj"):
        output.solve_attention_masks(layer.self_attn, X, cos, sin, PATTERN, wanda_init(layer.self_attn, X, cos, sin),
                                  objective="probs")


# ----------------------------------------------------------------------------- gradient refit


@pytest.mark.parametrize("objective, names", [("probs", ("q_proj", "k_proj")), ("output", ("q_proj", "k_proj", "v_proj"))])
def test_gradient_refit_keeps_sparsity_and_lowers_the_objective(objective, names):
    layer, X, cos, sin = tiny_layer()
    attn = layer.self_attn
    masks = wanda_masks(attn, X, cos, sin, PATTERN)
    if objective == "probs":
        masks = {n: masks[n] for n in ("q_proj", "k_proj")}
    weights, sol = output.refit_attention(attn, X, cos, sin, masks, names, objective=objective, steps=10, eta=0.01)
    assert sol.n_increases == 0 and int(np.sum(sol.step_sizes > 0)) > 0
    for n in names:
        w = np.asarray(weights[n])
        assert np.all(w[~np.asarray(masks[n])] == 0)  # pruned weights stay exactly 0
        assert not np.allclose(w, np.asarray(getattr(attn, n).weight) * np.asarray(masks[n]))  # kept ones moved
    before = output.attention_loss(attn, X, cos, sin, masks, objective)
    after = output.attention_loss(attn, X, cos, sin, masks, objective, weights)
    assert after < 0.97 * before


@pytest.mark.parametrize("objective, names", [("probs", ("q_proj", "k_proj")), ("output", ("q_proj", "k_proj", "v_proj"))])
def test_refit_and_masks_with_recomputed_targets_match_stored_ones(objective, names, monkeypatch):
    """--recompute-targets in the gradient refit and the output objective's mask descent:
    each round's targets come from the dense group as it was before the descent (not the
    weights being re-fitted), never all windows' at once, and the steps are those of the
    stored targets (float64)."""
    stacked, recompute = output.stacked_response, False

    def stored_only(*args, **kwargs):
        assert not recompute, "every window's dense targets were built"
        return stacked(*args, **kwargs)

    monkeypatch.setattr(output, "stacked_response", stored_only)
    with jax.enable_x64(True):
        layer, X, cos, sin = (to_float64(t) for t in tiny_layer())
        attn = layer.self_attn
        masks = wanda_masks(attn, X, cos, sin, PATTERN)
        if objective == "probs":
            masks = {n: masks[n] for n in ("q_proj", "k_proj")}
        init = wanda_init(attn, X, cos, sin)
        runs, mask_runs = [], []
        for recompute in (False, True):
            runs.append(output.refit_attention(attn, X, cos, sin, masks, names, objective=objective, steps=6,
                                               eta=0.01, window_batch=2, recompute_targets=recompute))
            if objective == "output":
                mask_runs.append(output.solve_attention_masks(attn, X, cos, sin, PATTERN, init, steps=4,
                                                              recompute_targets=recompute))
        (w0, s0), (w1, s1) = runs
        assert int(np.sum(s0.step_sizes > 0)) > 0
        np.testing.assert_allclose(s1.losses, s0.losses, rtol=1e-10)
        for n in names:
            np.testing.assert_allclose(w1[n], w0[n], rtol=1e-9, atol=1e-12)
        if mask_runs:
            (m0, t0), (m1, t1) = mask_runs
            np.testing.assert_allclose(t1.losses, t0.losses, rtol=1e-10)
            assert all(bool(jnp.all(m0[n] == m1[n])) for n in groups.ATTN_LINEARS)


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
def test_prune_cli_variants_end_to_end(extra, tiny_model_dir, shared_data_dir, tmp_path, nonlinear_cli):
    out = tmp_path / "run"
    assert nonlinear_cli(out, *extra) == 0
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


def test_refit_changes_the_weights_but_not_the_masks(tiny_model_dir, shared_data_dir, tmp_path, nonlinear_cli):
    """Same options with and without --refit: layer 0's q/k/v masks are the same (same inputs;
    o and the MLP see the re-fitted q/k/v), every weight is re-fitted."""
    base = ["--sparsity-ratio", "0.5", "--straight-through", "--steps", "3"]
    assert nonlinear_cli(tmp_path / "a", *base) == 0
    assert nonlinear_cli(tmp_path / "b", *base, "--refit", "--refit-steps", "3") == 0
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
        (["--refit-eta", "0.1", "--refit-cg", "2"], "--refit-cg, --refit-eta apply only with --refit"),
        (["--refit", "--refit-eta", "0"], "--refit-eta must be a finite number > 0"),
        (["--refit", "--refit-steps", "-1"], "--refit-steps must be an integer >= 0"),
        (["--refit", "--refit-cg", "-2"], "--refit-cg must be an integer >= 0"),
    ],
)
def test_bad_variant_arguments(args, message, tiny_model_dir, shared_data_dir, tmp_path, capsys, nonlinear_cli):
    out = tmp_path / "run"
    assert nonlinear_cli(out, "--sparsity-ratio", "0.5", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "results.json").exists()


def test_variant_flags_with_another_method_are_refused(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    rc = cli_main(["prune", "--model", str(tiny_model_dir), "--data-dir", str(shared_data_dir), "--output",
                   str(tmp_path / "r"), "--prune-method", "sparsegpt", "--sparsity-ratio", "0.5", "--refit",
                   "--refit-steps", "3"])
    assert rc == 2 and "--refit-steps (nonlinear) does not apply to --prune-method sparsegpt" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --recipe


def test_recipe_best_prunes_as_its_flags_do(tiny_model_dir, shared_data_dir, tmp_path, nonlinear_cli):
    """--recipe best is --straight-through --linear-method sparsegpt --refit: the same masks and
    weights on every layer; a flag given with it wins over the preset."""
    short = ["--sparsity-ratio", "0.5", "--steps", "3", "--refit-steps", "2", "--refit-cg", "2"]
    assert nonlinear_cli(tmp_path / "preset", *short, "--recipe", "best") == 0
    flags = ["--straight-through", "--linear-method", "sparsegpt", "--refit"]
    assert nonlinear_cli(tmp_path / "flags", *short, *flags) == 0
    options = json.loads((tmp_path / "preset" / "results.json").read_text())["args"]["options"]
    assert options["recipe"] == "best" and options["straight_through"] and options["refit"]
    assert options["linear_method"] == "sparsegpt" and options["refit_steps"] == 2
    a, _ = api.load_run(tmp_path / "preset")
    b, _ = api.load_run(tmp_path / "flags")
    for la, lb in zip(a.model.layers, b.model.layers):
        for name, lin in la.linears().items():
            assert bool(jnp.all(lin.mask == lb.linears()[name].mask)), name
            np.testing.assert_array_equal(np.asarray(lin.weight), np.asarray(lb.linears()[name].weight), err_msg=name)



def test_recipes_resolve_once_into_typed_options():
    """Recipes are partial instances of the options; given values win over the recipe, the
    recipe over what --straight-through implies, that over the field defaults (the paper's)."""
    def build(**given):
        return NonlinearOptions.build("nonlinear", **given)

    assert build(recipe="best", linear_method="wanda").linear_method == "wanda"
    fast = build(recipe="fast")
    assert fast.straight_through and fast.refit and fast.linear_method == "sparsegpt"
    assert (fast.steps, fast.refit_steps, fast.refit_cg) == (10, 0, 10)
    assert (fast.step_rule, fast.mask_init, fast.eta, fast.eta_relative) == ("backtracking", "wanda", 0.1, True)
    assert build(recipe="fast", steps=3).steps == 3
    paper = build()
    assert paper.recipe == "paper" and not paper.straight_through and not paper.refit
    assert paper.mask_init == "ones" and paper.steps == 100 and paper.linear_method == "wanda"
    assert paper.step_rule == "fixed" and paper.eta is None and paper.window_batch is None  # Algorithm 1: full batch
    assert fast.window_batch == 1  # what --straight-through implies
    assert build(straight_through=True).steps == 20 and build(straight_through=True, steps=7).steps == 7
    method = get_method("nonlinear", recipe="best")
    assert method.options == build(recipe="best") and method.fill_in.name == "sparsegpt" and method.needs_hessian
    assert not get_method("nonlinear").needs_hessian  # the paper's Wanda fill-in needs no X^T X
    with pytest.raises(TypeError, match="unknown option.*'stepz'"):
        build(stepz=3)


def test_unknown_recipe_is_refused(tiny_model_dir, shared_data_dir, tmp_path, capsys, nonlinear_cli):
    with pytest.raises(ValueError, match="unknown --recipe 'quick'; use one of paper, best, fast"):
        get_method("nonlinear", recipe="quick")
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        nonlinear_cli(out, "--recipe", "quick")
    assert "invalid choice: 'quick'" in capsys.readouterr().err and not out.exists()
