"""The contract every registered pruning method keeps, tested over the registry: a method added
to the registry and nowhere else is tested here.

One weight: exact sparsity per comparison group and per N:M group, pruned weights exactly 0,
kept weights untouched unless the method declares that it updates them, batching equal to one
at a time, and the pattern checks. A whole run (tiny model, real C4): a complete results.json,
exact sparsity in every linear, the masks applied, a killed run resumed to the identical model,
the same masks on a 4-device mesh as on one device, and ``--refit`` as a stage of every linear
method.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from nlprune import api
from nlprune.methods import available_methods, get_method
from nlprune.prune import LayerStats
from nlprune.prune.base import fill_in_methods
from nlprune.sparsity import PatternError, assert_mask, parse_pattern
from test_parallel import of_run, run_meshes
from test_prune_methods import correlated_inputs

METHODS = available_methods()
PATTERNS = {"50%": ("unstructured", 0.5), "30%": ("unstructured", 0.3), "2:4": ("2:4", None), "4:8": ("4:8", None)}
# Options that keep a whole-model run of a slow method short on the tiny model (nothing else).
QUICK = {"nonlinear": {"steps": 2}}


def quick_flags(method: str) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in QUICK.get(method, {}).items()]


def test_the_registry_is_what_the_command_line_offers():
    from nlprune.cli import build_parser

    text = build_parser().format_help() + " ".join(
        a.format_help() for a in build_parser()._subparsers._group_actions[0].choices.values())
    assert {"magnitude", "wanda", "sparsegpt", "nonlinear", "alps", "ria"} <= set(METHODS)
    for name in METHODS:
        assert name in text, name


# --------------------------------------------------------------------------------- one weight


@pytest.mark.parametrize("sparsity", list(PATTERNS))
@pytest.mark.parametrize("method_name", METHODS)
def test_one_weight_keeps_the_contract(method_name, sparsity):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 200)).astype(np.float32)
    stats = LayerStats.from_inputs(correlated_inputs(256, 200, seed=5))
    pattern = parse_pattern(*PATTERNS[sparsity])
    method = get_method(method_name)
    result = method.prune(w, stats, pattern)
    mask, pruned = np.asarray(result.mask), np.asarray(result.weight)
    assert mask.dtype == bool and mask.shape == w.shape == pruned.shape and pruned.dtype == w.dtype
    group, blocksize = method.comparison_group(pattern)
    assert_mask(mask, pattern, group, blocksize)  # raises on a wrong count in any group
    assert (pruned[~mask] == 0).all() and np.isfinite(pruned).all()
    if not method.updates_weights:
        np.testing.assert_array_equal(pruned[mask], w[mask])


@pytest.mark.parametrize("method_name", METHODS)
def test_shared_input_batching_equals_one_at_a_time(method_name):
    rng = np.random.default_rng(9)
    # q, k, v read one input; k and v share a shape (methods may batch them)
    weights = [rng.standard_normal(s).astype(np.float32) for s in [(48, 64), (16, 64), (16, 64)]]
    stats = LayerStats.from_inputs(correlated_inputs(256, 64, seed=10))
    pattern = parse_pattern("unstructured", 0.5)
    method = get_method(method_name)
    for w, shared in zip(weights, method.prune_many(weights, stats, pattern), strict=True):
        alone = method.prune(w, stats, pattern)
        np.testing.assert_array_equal(np.asarray(shared.mask), np.asarray(alone.mask))
        np.testing.assert_allclose(np.asarray(shared.weight), np.asarray(alone.weight), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method_name", METHODS)
def test_an_nm_pattern_the_width_cannot_take_is_a_pattern_error(method_name):
    w = np.ones((4, 10), np.float32)
    with pytest.raises(PatternError, match="multiple of 4"):
        get_method(method_name).prune(w, LayerStats.from_inputs(np.ones((8, 10), np.float32)), parse_pattern("2:4"))


def test_a_pattern_the_options_cannot_do_is_refused_before_loading(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from nlprune import cards
    from nlprune.cli import main as cli_main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the pattern was checked")

    monkeypatch.setattr(cards, "load_model", no_loading)
    for method in ("sparsegpt", "nonlinear"):
        extra = ["--linear-method", "sparsegpt"] if method == "nonlinear" else []
        rc = cli_main(["prune", "--model", str(tiny_model_dir), "--prune-method", method, *extra, "--blocksize", "130",
                       "--sparsity-type", "2:4", "--output", str(tmp_path / method)])
        err = capsys.readouterr().err
        assert rc == 2 and "--blocksize to be a multiple of 4" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / method).exists()


# --------------------------------------------------------------------------------- a whole run


@pytest.mark.parametrize("sparsity", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", METHODS)
def test_a_run_is_complete_and_exact(method, sparsity, prune_cli, tmp_path):
    out = tmp_path / "run"
    assert prune_cli(out, "--prune-method", method, *quick_flags(method), "--sparsity-ratio", "0.5",
                     "--sparsity-type", sparsity, "--eval", "--eval-nsamples", "4", "--eval-seqlen", "64") == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["args"]["prune_method"] == method and rec["args"]["sparsity_type"] == sparsity
    assert rec["args"]["options"] == get_method(method, **QUICK.get(method, {})).options.as_dict()
    assert len(rec["sparsity"]["per_linear"]) == 6 * 7
    assert all(abs(v - 0.5) < 1e-6 for v in rec["sparsity"]["per_linear"].values())
    assert rec["calibration"]["files"][0]["sha256"] and rec["model"]["weights_sha256"]
    assert rec["prune_seconds"] > 0 and rec["peak_rss_bytes"] > 0 and len(rec["layer_seconds"]) == 6
    assert np.isfinite(rec["perplexity"]) and len(rec["attention_error"]["per_layer"]) == 6
    model, _ = api.load_run(out)
    pattern = parse_pattern(sparsity, 0.5 if sparsity == "unstructured" else None)
    group, blocksize = get_method(method, **QUICK.get(method, {})).comparison_group(pattern)
    for layer in model.model.layers:
        for name, lin in layer.linears().items():
            mask = np.asarray(lin.mask).astype(bool)
            assert (np.asarray(lin.effective_weight)[~mask] == 0).all(), name  # the mask is applied
            if sparsity == "2:4":
                assert_mask(mask, pattern, "row")


KILLED_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    from nlprune import api
    from nlprune.runs import RunDir

    model, data, method, options, out = sys.argv[1:6]
    original = RunDir.save_layer

    def save_then_die(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like a lost machine

    RunDir.save_layer = save_then_die
    api.prune(model, method, 0.5, nsamples=4, seqlen=64, data_dir=data, output=out, progress=False,
              options=json.loads(options))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_killed_run_resumes_identically(method, tiny_model_dir, shared_data_dir, tmp_path):
    out, options = tmp_path / "killed", QUICK.get(method, {})
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tiny_model_dir), str(shared_data_dir), method,
                           json.dumps(options), str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == -9, proc.stderr[-2000:]
    common = dict(nsamples=4, seqlen=64, data_dir=shared_data_dir, progress=False, options=options)
    _, record = api.prune(str(tiny_model_dir), method, 0.5, output=out, **common)
    assert record["resumed_from_layer"] == 3
    straight, _ = api.prune(str(tiny_model_dir), method, 0.5, output=tmp_path / "straight", **common)
    leaves_a, tree_a = jax.tree.flatten(api.load_run(out)[0])
    leaves_b, tree_b = jax.tree.flatten(straight)
    assert tree_a == tree_b
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Least agreement of layer 0's masks and of the later layers'. ALPS's ADMM re-projects onto 2:4
# at every iteration and adapts its penalty to how many entries changed, so statistics summed in
# another order can send even layer 0 another way (q/k/v identical, 98.1% of down_proj; 88.6% the
# least later on, and the last layer's outputs 14% apart: measured here, the same on every
# rerun; another machine measured 92-100%). The linears after a differing mask see other
# inputs (down_proj's kept weights in rows whose masks agree: 9e-4 relative), so ALPS's
# weights are held to 1% (Frobenius).
AGREEMENT = {"alps": (0.95, 0.8)}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_sharded_run_has_the_one_device_masks(method, tiny_model_dir, tmp_path):
    """2:4 on a 4-device mesh (rows over 'model', windows over 'data') against one device.
    Layer 0 sees the same inputs, its statistics summed in another order: at least 99.5% of
    each mask agrees (95% for ALPS: AGREEMENT), and the weights agree in the rows whose masks agree
    whole (a method that solves a row's kept weights together, as ALPS and the refit do, moves
    every kept weight of a row whose mask differs anywhere: seen on CI, 28 weights of one
    gate_proj row). Later layers see the earlier layers' differences: an iterative method may
    take another path through its discrete decisions, so the whole model is held to 90% (ALPS
    80%); every mask is exact either way (the pipeline checks each)."""
    runs = [["none", 8], ["data=2,model=2", 8]]
    arrays, summary = run_meshes(tmp_path, tiny_model_dir, method, runs, options=QUICK.get(method, {}),
                                 sparsity_type="2:4")
    ref, got = of_run(arrays, "none@8"), of_run(arrays, "data=2,model=2@8")
    assert summary["data=2,model=2@8"]["q_proj_devices"] == 4
    masks = [k for k in ref if k.endswith(".mask")]
    assert len(masks) == 6 * 7
    for k in masks:
        agree = np.mean(ref[k] == got[k])
        first, later = AGREEMENT.get(method, (0.995, 0.9))
        assert agree >= (first if k.startswith("0.") else later), (k, agree)
        if k.startswith("0."):
            rows = np.all(ref[k] == got[k], axis=-1, keepdims=True)
            assert rows.mean() >= 0.5, (k, rows.mean())  # something left to compare
            same, w = ref[k] & got[k] & rows, k.replace(".mask", ".weight")
            if method in AGREEMENT:  # a later linear's inputs follow the earlier masks
                drift = np.linalg.norm(got[w][same] - ref[w][same]) / np.linalg.norm(ref[w][same])
                assert drift <= 1e-2, (k, drift)
            else:
                np.testing.assert_allclose(got[w][same], ref[w][same], rtol=1e-3, atol=1e-4, err_msg=k)


@pytest.mark.parametrize("name", fill_in_methods())
def test_refit_is_a_pipeline_stage_for_every_linear_method(name, tiny_model_dir):
    """--refit: the same masks where the inputs are the same (layer 0's q/k/v), new kept
    weights, and the pruned model's calibration outputs closer to the dense model's."""
    import jax.numpy as jnp

    from nlprune.modeling.forward import hidden_states
    from nlprune.prune.pipeline import prune_model

    loaded = api.load(str(tiny_model_dir))
    cal = np.random.default_rng(0).integers(0, loaded.model.config.vocab_size, (4, 32))
    pattern = parse_pattern("unstructured", 0.5)
    plain, _ = prune_model(loaded.model, cal, get_method(name), pattern, progress=False)
    method = get_method(name, refit=True, refit_cg=5)
    assert method.needs_hessian
    fitted, _ = prune_model(loaded.model, cal, method, pattern, progress=False)
    p0, f0 = plain.model.layers[0].linears(), fitted.model.layers[0].linears()
    for n in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_array_equal(np.asarray(p0[n].mask), np.asarray(f0[n].mask), err_msg=n)
        assert not np.allclose(np.asarray(p0[n].weight), np.asarray(f0[n].weight)), n
    ids = jnp.asarray(cal, jnp.int32)
    dense = hidden_states(loaded.model, ids)

    def err(model):
        return float(jnp.linalg.norm(hidden_states(model, ids) - dense))

    assert err(fitted) < err(plain), (err(fitted), err(plain))


def test_the_plan_and_the_command_line_know_no_method_by_name():
    """nlprune plan and the command line ask the configured method (its declared hooks), never
    its name: a new method needs nothing there."""
    from nlprune import cli, cli_methods, cli_prune, plan

    for module in (plan, cli, cli_methods, cli_prune):
        text = open(module.__file__).read()
        named = [name for name in METHODS if f'"{name}"' in text or f"'{name}'" in text]
        assert not named, (module.__name__, named)


def test_every_linear_method_can_fill_in_for_the_nonlinear_method():
    assert set(fill_in_methods()) == set(METHODS) - {"nonlinear"}
    for name in fill_in_methods():
        assert get_method("nonlinear", linear_method=name).fill_in.name == name
    with pytest.raises(ValueError, match="unknown --linear-method 'nonlinear'; use one of alps, magnitude"):
        get_method("nonlinear", linear_method="nonlinear")
    with pytest.raises(ValueError, match="--linear-method ria does not take --blocksize"):
        get_method("nonlinear", linear_method="ria", blocksize=64)
