"""The layer-by-layer pipeline and `nlprune prune` end to end (tiny model, real C4)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlprune import api
from nlprune.cli import main as cli_main
from nlprune.modeling.forward import embed, layer_inputs
from nlprune.prune import LayerStats, get_method, parse_pattern
from nlprune.prune.pipeline import prune_model


def prune_cli(tiny_model_dir, shared_data_dir, out, *extra):
    return cli_main(
        ["prune", "--model", str(tiny_model_dir), "--nsamples", "4", "--seqlen", "64",
         "--data-dir", str(shared_data_dir), "--output", str(out), *extra]
    )


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", ["unstructured", "2:4"])
def test_prune_cli_writes_a_complete_run(method, sparsity, tiny_model_dir, shared_data_dir, tmp_path):
    out = tmp_path / "run"
    rc = prune_cli(tiny_model_dir, shared_data_dir, out, "--prune_method", method, "--sparsity_ratio", "0.5",
                   "--sparsity-type", sparsity, "--eval", "--eval-nsamples", "4", "--eval-seqlen", "64")
    assert rc == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["args"]["prune_method"] == method and rec["args"]["sparsity_type"] == sparsity
    assert len(rec["sparsity"]["per_linear"]) == 6 * 7
    assert all(abs(v - 0.5) < 1e-6 for v in rec["sparsity"]["per_linear"].values())
    assert rec["calibration"]["files"][0]["sha256"] and rec["calibration"]["seed"] == 0
    assert rec["model"]["weights_sha256"] and rec["prune_seconds"] > 0 and rec["peak_rss_bytes"] > 0
    assert rec["perplexity"] > rec["dense_perplexity"] * 0.5 and np.isfinite(rec["perplexity"])
    assert len(rec["attention_error"]["per_layer"]) == 6
    # the run directory is what `nlprune eval --run` reads
    model, _ = api.load_run(out)
    assert not (out / "progress").exists()
    assert all(lin.mask is not None for l in model.model.layers for lin in l.linears().values())


def test_eval_reads_a_run(tiny_model_dir, shared_data_dir, tmp_path):
    out = tmp_path / "run"
    assert prune_cli(tiny_model_dir, shared_data_dir, out, "--prune-method", "wanda", "--sparsity-ratio", "0.5",
                     "--eval", "--eval-nsamples", "4", "--eval-seqlen", "64") == 0
    rec = json.loads((out / "results.json").read_text())
    ev = api.evaluate(str(tiny_model_dir), run_dir=out, nsamples=4, seqlen=64, data_dir=shared_data_dir, progress=False)
    assert ev["perplexity"] == pytest.approx(rec["perplexity"], rel=1e-6)


def test_refuses_existing_run_without_overwrite(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert prune_cli(tiny_model_dir, shared_data_dir, out, "--prune-method", "magnitude", "--sparsity-ratio", "0.5") == 0
    before = (out / "results.json").read_bytes()
    assert prune_cli(tiny_model_dir, shared_data_dir, out, "--prune-method", "wanda", "--sparsity-ratio", "0.5") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    assert prune_cli(tiny_model_dir, shared_data_dir, out, "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["args"]["prune_method"] == "wanda"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prune-method", "wanda", "--sparsity-ratio", "1.5"], "outside [0, 1)"),
        (["--prune-method", "wanda", "--sparsity-ratio", "-0.1"], "outside [0, 1)"),
        (["--prune-method", "wanda", "--sparsity-type", "3:7"], "multiple of 7"),
        (["--prune-method", "wanda", "--sparsity-type", "2:4", "--sparsity-ratio", "0.3"], "removes 0.5"),
        (["--prune-method", "wanda", "--sparsity-type", "banana"], "unknown sparsity type"),
    ],
)
def test_bad_prune_arguments(args, message, tiny_model_dir, shared_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert prune_cli(tiny_model_dir, shared_data_dir, out, *args) == 2
    assert message in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="known methods: magnitude, nonlinear, sparsegpt, wanda"):
        get_method("obs")


@pytest.mark.parametrize("true_sequential", [True, False])
def test_pipeline_modes_prune_every_linear(true_sequential, tiny_model_dir, shared_data_dir):
    loaded = api.load(str(tiny_model_dir))
    from nlprune.data import calibration_windows

    cal, _ = calibration_windows(loaded.tokenizer, 4, 64, 0, data_dir=shared_data_dir)
    pruned, report = prune_model(loaded.model, cal, "wanda", parse_pattern("unstructured", 0.5),
                                 progress=False, true_sequential=true_sequential)
    assert report.overall_sparsity == pytest.approx(0.5)
    # dense weights unchanged where kept, zero where pruned
    for d, p in zip(loaded.model.model.layers, pruned.model.layers):
        for name, lin in p.linears().items():
            dw, pw = np.asarray(d.linears()[name].weight), np.asarray(lin.effective_weight)
            keep = np.asarray(lin.mask).astype(bool)
            np.testing.assert_array_equal(pw[keep], dw[keep])
            assert np.all(pw[~keep] == 0)


@pytest.mark.slow
def test_reconstruction_error_order_on_real_smollm2_inputs(smollm2, shared_data_dir):
    """At 50% on real layer inputs: SparseGPT < Wanda < magnitude in ||XW^T - XW'^T||_F."""
    from nlprune.data import calibration_windows

    cal, _ = calibration_windows(smollm2.tokenizer, 4, 512, 0, data_dir=shared_data_dir)
    model = smollm2.model
    cos, sin = model.rope(jnp.arange(512))
    h = embed(model, jnp.asarray(cal))
    for layer_index in (0, 1):
        layer = model.model.layers[layer_index]
        inputs = layer_inputs(layer, h, cos, sin)
        for group, name in (("qkv", "q_proj"), ("gate_up", "up_proj"), ("down", "down_proj")):
            x = inputs[group].reshape(-1, inputs[group].shape[-1])
            w = layer.linears()[name].weight
            stats = LayerStats.from_inputs(x, with_hessian=True)
            err = {}
            for method in ("magnitude", "wanda", "sparsegpt"):
                res = get_method(method).prune(w, stats, parse_pattern("unstructured", 0.5))
                err[method] = float(jnp.linalg.norm(x @ w.T - x @ res.weight.T))
            assert err["sparsegpt"] < err["wanda"] < err["magnitude"], (layer_index, name, err)
        h = jax.vmap(layer, in_axes=(0, None, None))(h, cos, sin)
