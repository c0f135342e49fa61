"""The non-linear q/k solve (nlprune.nonlinear.qk, groups) on real Llama layers: per-group vmap, the loss, the step rules,
the attention it optimises, and `nlprune prune --prune-method nonlinear` end to end."""

from __future__ import annotations

import functools
import json
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from nlprune.cli import main as cli_main
from nlprune.methods import get_method
from nlprune.modeling.forward import rope_tables
from nlprune.modeling.init import init_llama
from nlprune.modeling.llama import LlamaConfig
from nlprune.modeling.masks import set_linears
from nlprune.nonlinear import binarize, groups, lipschitz, qk
from nlprune.nonlinear.method import wanda_init
from nlprune.prune import LayerStats
from nlprune.sparsity import parse_pattern

PATTERN = parse_pattern("unstructured", 0.5)


@functools.lru_cache(maxsize=None)  # building a model compiles many small ops: share them between tests
def tiny_layer(
    seed: int = 0, bias: bool = False, std: float = 0.5, n_win: int = 4, seq: int = 12, hidden: int = 32, hd: int = 8
):
    """A random GQA layer (4 query heads, 2 KV groups, llama3 RoPE) and inputs X (n_win, seq, hidden)."""
    cfg = LlamaConfig.from_hf_dict(
        {
            "vocab_size": 64, "hidden_size": hidden, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": hd,
            "max_position_embeddings": 256, "rope_theta": 500000.0, "attention_bias": bias,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        }
    )
    model = init_llama(cfg, jax.random.PRNGKey(seed), std=std)
    X = jax.random.normal(jax.random.PRNGKey(seed + 1), (n_win, seq, hidden))
    cos, sin = rope_tables(model, seq)
    return model.model.layers[0], X, cos, sin


def group_problem(layer, X, cos, sin, g: int = 0):
    masks, rest = groups.partition_masks(groups.split_groups(layer.self_attn))
    m, r = groups.tree_index(masks, g), groups.tree_index(rest, g)
    target = groups.group_probs(eqx.combine(m, r), X, cos, sin)
    return m, r, target


# ----------------------------------------------------------------------------- the attention


@pytest.mark.parametrize("bias", [False, True])
def test_method_attention_is_the_models_attention(bias):
    """Same masked weights -> the method's per-group attention equals the model's own."""
    layer, X, cos, sin = tiny_layer(bias=bias)
    attn = layer.self_attn
    key_q, key_k = jax.random.split(jax.random.PRNGKey(7))
    mq = jax.random.bernoulli(key_q, 0.5, attn.q_proj.weight.shape).astype(jnp.float32)
    mk = jax.random.uniform(key_k, attn.k_proj.weight.shape)  # relaxed masks too
    stack = groups.with_qk_masks(groups.split_groups(attn), mq, mk)
    ours = groups.stacked_probs(stack, X, cos, sin)  # (G, n, rep, seq, seq)
    masked = set_linears(layer, {"q_proj": (attn.q_proj.weight, mq), "k_proj": (attn.k_proj.weight, mk)}).self_attn
    theirs = jax.vmap(lambda x: masked.attention_probs(*masked.project_qk(x, cos, sin)))(X)  # (n, H, seq, seq)
    G, n, rep = ours.shape[:3]
    ours = ours.transpose(1, 0, 2, 3, 4).reshape(n, G * rep, *ours.shape[-2:])
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-7)
    # and the masked attention really differs from the dense one (the check has teeth)
    assert float(jnp.abs(ours - groups.stacked_probs(groups.split_groups(attn), X, cos, sin).transpose(1, 0, 2, 3, 4).reshape(ours.shape)).max()) > 1e-3


def test_loss_is_zero_at_ones_with_finite_gradient_that_matches_finite_differences():
    layer, X, cos, sin = tiny_layer()
    m, r, target = group_problem(layer, X, cos, sin)
    vg = jax.jit(qk.make_value_and_grad(None, 1.0))
    value, grad = vg(m, r, X, cos, sin, target, 0.0)
    assert abs(float(value)) < 1e-9
    flat_g = ravel_pytree(grad)[0]
    assert bool(jnp.all(jnp.isfinite(flat_g))) and float(jnp.abs(flat_g).max()) < 1e-5
    lam = 0.05
    value, grad = vg(m, r, X, cos, sin, target, lam)
    n_masks = m.q_proj.mask.size + m.k_proj.mask.size
    assert float(value) == pytest.approx(0.5 * lam * n_masks, rel=1e-6)
    # away from the minimum: jax's gradient against a central difference along a direction
    flat, unravel = ravel_pytree(m)
    M = flat - 0.3 * jax.random.uniform(jax.random.PRNGKey(3), flat.shape)
    d = jax.random.normal(jax.random.PRNGKey(4), flat.shape)
    f = lambda v: vg(unravel(v), r, X, cos, sin, target, lam)[0]  # noqa: E731
    with jax.enable_x64(False):
        # A central difference's error grows as eps^2 times the third derivative along d: at
        # 1e-2 it reached 3% on one random layer, at 3e-3 it is ~0.2% (float32 rounding ~1e-4).
        eps = 3e-3
        fd = (f(M + eps * d) - f(M - eps * d)) / (2 * eps)
    g = ravel_pytree(vg(unravel(M), r, X, cos, sin, target, lam)[1])[0]
    assert float(jnp.vdot(g, d)) == pytest.approx(float(fd), rel=2e-2)
    assert abs(float(fd)) > 1.0  # a non-trivial slope


def to_float64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def test_chunked_gradient_equals_all_windows_at_once():
    """Summing the gradient over chunks of windows is the same maths as all windows at once;
    in float64 the two summation orders agree to ~1e-15. (In float32 they differ by up to
    ~1e-6 absolute on components of size ~1e-3: a fresh machine's XLA picked another order
    and broke a float32 rtol of 1e-4, so the exact claim is checked where it is exact.)"""
    with jax.enable_x64(True):
        layer, X, cos, sin = (to_float64(t) for t in tiny_layer())
        m, r, target = group_problem(layer, X, cos, sin)
        m = jax.tree.map(lambda a: a * 0.7, m)
        full = jax.jit(qk.make_value_and_grad(None, 1.0))(m, r, X, cos, sin, target, 0.05)
        chunked = jax.jit(qk.make_value_and_grad(2, 1.0))(m, r, X, cos, sin, None, 0.05)  # target recomputed per chunk
        assert full[0].dtype == jnp.float64
        assert float(chunked[0]) == pytest.approx(float(full[0]), rel=1e-12)
        g_full, g_chunked = ravel_pytree(full[1])[0], ravel_pytree(chunked[1])[0]
        np.testing.assert_allclose(g_chunked, g_full, rtol=1e-9, atol=1e-13 * float(jnp.abs(g_full).max()))
        assert float(jnp.abs(g_full).max()) > 1e-3  # a non-trivial gradient


# ----------------------------------------------------------------------------- vmap and rules


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(step_rule="fixed", eta=0.05, steps=8),
        dict(step_rule="backtracking", steps=6, window_batch=1),
    ],
)
def test_vmap_over_groups_equals_a_loop_over_groups(kwargs):
    """In float64: the vmapped and looped programs sum in different orders, and near M = 1
    the gradient is a difference of nearly equal attentions, so float32 noise (1e-4 of M's
    spread) could reorder entries at the binarisation threshold."""
    with jax.enable_x64(True):
        layer, X, cos, sin = (to_float64(t) for t in tiny_layer())
        a = qk.solve_qk(layer.self_attn, X, cos, sin, vmap=True, **kwargs)
        b = qk.solve_qk(layer.self_attn, X, cos, sin, vmap=False, **kwargs)
        assert a.mask_q.dtype == jnp.float64
        np.testing.assert_allclose(a.mask_q, b.mask_q, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(a.mask_k, b.mask_k, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(a.losses, b.losses, rtol=1e-10)
        assert float(jnp.abs(a.mask_q - 1).max()) > 1e-3  # the masks moved
        assert bool(jnp.all(binarize(a.mask_q, None, PATTERN) == binarize(b.mask_q, None, PATTERN)))
        assert bool(jnp.all(binarize(a.mask_k, None, PATTERN) == binarize(b.mask_k, None, PATTERN)))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(step_rule="fixed", eta=0.05, steps=6),  # full batch: the one round's targets
        dict(step_rule="backtracking", steps=6, window_batch=2),  # each round its own windows'
        dict(step_rule="certified_local", steps=4, window_batch=1),
        "straight-through",
    ],
)
def test_recomputed_targets_solve_the_same_problem_as_stored_ones(kwargs, monkeypatch):
    """--recompute-targets builds each round's dense targets instead of storing every
    window's (never all windows' at once): the same losses, step sizes and masks (float64,
    where both orders are exact)."""
    with jax.enable_x64(True):
        layer, X, cos, sin = (to_float64(t) for t in tiny_layer())
        attn = layer.self_attn
        if kwargs == "straight-through":
            norms = jnp.sqrt(jnp.sum(X.reshape(-1, X.shape[-1]) ** 2, 0))
            init = tuple(wanda_init(w, norms, PATTERN, True) for w in (attn.q_proj.weight, attn.k_proj.weight))
            kwargs = dict(init=init, straight_through=PATTERN, step_rule="backtracking", eta=0.1,
                          eta_relative=True, steps=8, window_batch=1)
        stored = qk.solve_qk(attn, X, cos, sin, **kwargs)
        def all_windows_targets(*args):
            raise AssertionError("every window's dense targets were built")

        monkeypatch.setattr(qk, "stacked_probs", all_windows_targets)
        recomputed = qk.solve_qk(attn, X, cos, sin, recompute_targets=True, **kwargs)
        np.testing.assert_allclose(recomputed.losses, stored.losses, rtol=1e-10)
        np.testing.assert_allclose(recomputed.step_sizes, stored.step_sizes, rtol=1e-10)
        np.testing.assert_allclose(recomputed.mask_q, stored.mask_q, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(recomputed.mask_k, stored.mask_k, rtol=1e-10, atol=1e-12)
        assert np.ptp(stored.losses) > 1e-6  # the descent moved


@pytest.mark.parametrize("rule", ["certified", "certified_local", "backtracking"])
def test_guaranteed_rules_never_increase_the_loss(rule):
    layer, X, cos, sin = tiny_layer()
    sol = qk.solve_qk(layer.self_attn, X, cos, sin, step_rule=rule, steps=15, lam=0.05)
    losses = sol.losses[:, 0, :]  # full batch: one round per group
    assert np.all(np.diff(losses, axis=-1) <= 1e-6 * np.abs(losses[:, 1:])), losses
    if rule != "certified":  # 1/L (the box bound) is ~1e4 x too small to move in 15 steps
        assert np.all(losses[:, -1] < losses[:, 0] - 1e-2)  # and they do descend
    assert sol.n_increases == 0
    if rule == "certified":
        assert float(sol.mask_q.min()) >= 0 and float(sol.mask_q.max()) <= 1  # projected on the box


def test_the_paper_eta_can_raise_the_loss_where_backtracking_does_not():
    """The fixed rule is unguarded: with a large eta on a peaked layer the loss rises."""
    layer, X, cos, sin = tiny_layer()
    fixed = qk.solve_qk(layer.self_attn, X, cos, sin, step_rule="fixed", eta=5.0, steps=10)
    assert fixed.n_increases > 0
    assert qk.solve_qk(layer.self_attn, X, cos, sin, step_rule="backtracking", steps=10).n_increases == 0


def test_certified_box_bound_bounds_the_hessian_and_segment_bound_the_curvature():
    layer, X, cos, sin = tiny_layer(6, std=1.0, seq=8, hidden=12, hd=4)  # 144 mask entries per group
    m, r, target = group_problem(layer, X, cos, sin)
    lam = 0.05
    L = lipschitz.certified_qk_bound(eqx.combine(m, r), X, cos, sin, lam)
    vg = qk.make_value_and_grad(None, 1.0)
    flat, unravel = ravel_pytree(m)
    hess = jax.jit(jax.hessian(lambda v: vg(unravel(v), r, X, cos, sin, target, lam)[0]))
    rng = np.random.default_rng(0)
    points = [flat] + [jnp.asarray(rng.uniform(0, 1, flat.shape), jnp.float32) for _ in range(2)]
    points += [jnp.asarray(rng.integers(0, 2, flat.shape), jnp.float32) for _ in range(2)]
    top = max(float(np.abs(np.linalg.eigvalsh(np.asarray(hess(p), np.float64))).max()) for p in points)
    assert top > 10 * lam and L >= top
    seg = lipschitz.make_segment_bound(None, 1.0)
    for k in range(3):
        M = jnp.asarray(rng.normal(1, 1, flat.shape), jnp.float32)
        D = jnp.asarray(rng.normal(0, 0.3, flat.shape), jnp.float32)
        C = float(seg(unravel(M), unravel(D), r, X, cos, sin, target, lam))
        sup = max(abs(float(D @ hess(M + t * D) @ D)) for t in np.linspace(0, 1, 5))
        assert C >= sup > 0, (k, C, sup)


def test_straight_through_starts_at_wanda_and_lowers_the_binary_loss():
    layer, X, cos, sin = tiny_layer()
    attn = layer.self_attn
    norms = jnp.sqrt(jnp.sum(X.reshape(-1, X.shape[-1]) ** 2, 0))
    init = tuple(wanda_init(w, norms, PATTERN, True) for w in (attn.q_proj.weight, attn.k_proj.weight))
    wanda = get_method("wanda")
    stats = LayerStats.from_inputs(X, with_hessian=False)
    rq, rk = wanda.prune_many([attn.q_proj.weight, attn.k_proj.weight], stats, PATTERN)
    assert bool(jnp.all(binarize(init[0], None, PATTERN) == rq.mask))  # the ranking's top-k is Wanda's mask
    sol = qk.solve_qk(attn, X, cos, sin, init=init, straight_through=PATTERN, step_rule="backtracking",
                      eta=0.1, eta_relative=True, steps=20)
    assert sol.n_increases == 0  # every accepted step lowered the binary masks' loss

    def binary_loss(mq, mk):
        stack = groups.with_qk_masks(groups.split_groups(attn), mq.astype(jnp.float32), mk.astype(jnp.float32))
        dense = groups.stacked_probs(groups.split_groups(attn), X, cos, sin)
        return float(0.5 * jnp.sum((groups.stacked_probs(stack, X, cos, sin) - dense) ** 2))

    before = binary_loss(rq.mask, rk.mask)
    assert sol.losses[:, 0, 0].sum() == pytest.approx(before, rel=1e-4)  # step 0 sees Wanda's masks
    after = binary_loss(binarize(sol.mask_q, None, PATTERN), binarize(sol.mask_k, None, PATTERN))
    assert after < 0.9 * before


# ----------------------------------------------------------------------------- the command line




def test_prune_cli_nonlinear_writes_a_complete_run(tiny_model_dir, shared_data_dir, tmp_path, nonlinear_cli):
    """The paper's defaults (T cut to 5 for time), true-sequential: q/k by the non-linear
    hook, v and the rest by Wanda, exact sparsity, results.json with attention_error."""
    from nlprune import api
    from nlprune.data import calibration_windows
    from nlprune.modeling.forward import attn_input, embed

    out = tmp_path / "run"
    assert nonlinear_cli(out, "--sparsity-ratio", "0.5", "--steps", "5") == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["args"]["prune_method"] == "nonlinear" and rec["args"]["options"]["step_rule"] == "fixed"
    per = rec["sparsity"]["per_linear"]
    assert len(per) == 6 * 7 and all(v == 0.5 for v in per.values())
    assert len(rec["attention_error"]["per_layer"]) == 6
    assert all(np.isfinite(e) and e > 0 for e in rec["attention_error"]["per_layer"])
    reports = rec["method_reports"]
    assert len(reports) == 6 and all(len(r["loss_first"]) == 2 for r in reports)  # 2 KV groups per layer

    # layer 0: v is Wanda's mask from the same inputs, q is not (it went through the hook)
    loaded = api.load(str(tiny_model_dir))
    ids, _ = calibration_windows(loaded.tokenizer, 4, 32, 0, data_dir=shared_data_dir)
    dense0 = loaded.model.model.layers[0]
    stats = LayerStats.from_inputs(attn_input(dense0, embed(loaded.model, jnp.asarray(ids))), with_hessian=False)
    wq, wv = get_method("wanda").prune_many([dense0.self_attn.q_proj.weight, dense0.self_attn.v_proj.weight], stats, PATTERN)
    pruned0 = api.load_run(out)[0].model.layers[0].self_attn
    assert bool(jnp.all(pruned0.v_proj.mask == wv.mask))
    assert not bool(jnp.all(pruned0.q_proj.mask == wq.mask))


def test_prune_cli_nonlinear_layer_at_once_nm_sparsegpt_straight_through(tiny_model_dir, shared_data_dir, tmp_path, nonlinear_cli):
    """The hook in the layer-at-once pipeline, N:M, a fill-in that needs the Hessian, STE."""
    out = tmp_path / "run"
    assert nonlinear_cli(out, "--sparsity-type", "2:4", "--steps", "4",
                     "--linear-method", "sparsegpt", "--no-true-sequential", "--straight-through",
                     "--window-batch", "2") == 0
    rec = json.loads((out / "results.json").read_text())
    options = rec["args"]["options"]
    assert options["linear_method"] == "sparsegpt" and not rec["args"]["true_sequential"]
    # the straight-through defaults, recorded resolved
    assert (options["mask_init"], options["step_rule"], options["eta"], options["eta_relative"]) == (
        "wanda", "backtracking", 0.1, True)
    assert all(v == 0.5 for v in rec["sparsity"]["per_linear"].values())
    assert len(rec["attention_error"]["per_layer"]) == 6
    assert all(r["rule"] == "backtracking" and r["n_increases"] == 0 for r in rec["method_reports"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lambda", "-0.1"], "--lambda must be a finite number >= 0"),
        (["--eta", "0"], "--eta must be a finite number > 0"),
        (["--eta", "-1"], "--eta must be a finite number > 0"),
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--window-batch", "0"], "--window-batch must be an integer >= 1"),
        (["--straight-through", "--mask-init", "ones"], "--mask-init ones (use wanda"),
        (["--straight-through", "--step-rule", "certified"], "--step-rule certified (use backtracking or fixed"),
        (["--straight-through", "--binarize", "matrix"], "--binarize matrix (use row"),
        (["--eta-relative", "--step-rule", "certified_local"], "applies to --step-rule fixed or backtracking"),
        (["--eta-relative", "--mask-init", "wanda"], "--eta-relative needs --eta"),
        (["--eta-relative", "--eta", "0.1"], "--eta-relative needs --mask-init wanda"),
        (["--linear-method", "wanda", "--blocksize", "64"], "does not take --blocksize (taken by sparsegpt)"),
    ],
)
def test_bad_nonlinear_arguments(args, message, tiny_model_dir, shared_data_dir, tmp_path, capsys, nonlinear_cli):
    out = tmp_path / "run"
    assert nonlinear_cli(out, "--sparsity-ratio", "0.5", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err  # refused before loading anything
    assert not (out / "results.json").exists()


def test_certified_rejection_says_by_how_much():
    layer, X, cos, sin = tiny_layer()
    with pytest.raises(ValueError, match=r"exceeds it by a factor") as info:
        qk.solve_qk(layer.self_attn, X, cos, sin, step_rule="certified", eta=1.0, steps=1)
    factor = float(re.search(r"by a factor ([0-9.e+]+[0-9])", str(info.value)).group(1))
    L = float(re.search(r"has L = ([0-9.e+]+[0-9])", str(info.value)).group(1))
    assert factor == pytest.approx(1.0 * L, rel=1e-3) and factor > 1
    # 1/L itself is accepted
    qk.solve_qk(layer.self_attn, X, cos, sin, step_rule="certified", eta=0.999 / L, steps=1)
    with pytest.raises(ValueError, match="must divide the 4 calibration windows"):
        qk.solve_qk(layer.self_attn, X, cos, sin, window_batch=3, steps=1)


def test_nonlinear_flags_with_another_method_are_refused(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    rc = cli_main(["prune", "--model", str(tiny_model_dir), "--data-dir", str(shared_data_dir), "--output",
                   str(tmp_path / "r"), "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--lambda", "0.1"])
    assert rc == 2 and "--lambda (nonlinear) does not apply to --prune-method wanda" in capsys.readouterr().err


@pytest.mark.slow
def test_certified_box_bound_bounds_the_hessian_on_a_real_smollm2_layer(smollm2, shared_data_dir):
    """The real-layer bound (one KV group, box [0, 1]) against power-iteration estimates of the
    top Hessian eigenvalue of the same loss on real SmolLM2 inputs, at M = 1 and at points
    inside the box: the bound must bound every one (a Rayleigh quotient never exceeds the
    top eigenvalue). The ratio is printed: BENCHMARKS.md has the per-layer study."""
    from nlprune.data import calibration_windows
    from nlprune.modeling.forward import attn_input, embed, run_layer
    from nlprune.nonlinear import top_hessian_eigenvalue

    model, lam, tokens = smollm2.model, 0.05, 64
    ids, _ = calibration_windows(smollm2.tokenizer, 2, tokens, 0, data_dir=shared_data_dir)
    h = embed(model, jnp.asarray(ids))
    cos, sin = rope_tables(model, tokens)
    for layer in model.model.layers[:5]:
        h = run_layer(layer, h, cos, sin)
    layer = model.model.layers[5]
    X = attn_input(layer, h)
    masks, rest = groups.partition_masks(groups.split_groups(layer.self_attn))
    m, r = groups.tree_index(masks, 0), groups.tree_index(rest, 0)
    bound = lipschitz.certified_qk_bound(eqx.combine(m, r), X, cos, sin, lam)
    target = groups.group_probs(eqx.combine(m, r), X, cos, sin)
    vg = qk.make_value_and_grad(None, 1.0)
    rng = np.random.default_rng(0)
    points = {"ones": m, "uniform": jax.tree.map(lambda a: jnp.asarray(rng.uniform(0, 1, a.shape), a.dtype), m),
              "binary": jax.tree.map(lambda a: jnp.asarray(rng.integers(0, 2, a.shape), a.dtype), m)}
    eigs = {}
    for name, p in points.items():
        eig = top_hessian_eigenvalue(lambda mm: vg(mm, r, X, cos, sin, target, lam)[0], p, iters=30)
        eigs[name] = eig.magnitude
        assert bound >= eig.magnitude > lam, (name, bound, eig)
    print(f"layer 5, KV group 0, {X.shape[0]} x {tokens} tokens: bound {bound:.3e}, top |eigenvalue| "
          + ", ".join(f"{k} {v:.3e}" for k, v in eigs.items()) + f"; ratio to the largest {bound / max(eigs.values()):.3g}")
