"""The layer-by-layer pipeline and `nlprune prune` end to end (tiny model, real C4)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlprune import api
from nlprune.cli import main as cli_main
from nlprune.modeling.forward import embed, layer_inputs
from nlprune.methods import get_method
from nlprune.prune import GroupContext, LayerStats, PruningMethod
from nlprune.prune.pipeline import prune_model
from nlprune.prune.wanda import wanda_prune
from nlprune.sparsity import parse_pattern


def test_eval_reads_a_run(tiny_model_dir, shared_data_dir, tmp_path, prune_cli):
    out = tmp_path / "run"
    assert prune_cli(out, "--prune-method", "wanda", "--sparsity-ratio", "0.5",
                     "--eval", "--eval-nsamples", "4", "--eval-seqlen", "64") == 0
    rec = json.loads((out / "results.json").read_text())
    ev = api.evaluate(str(tiny_model_dir), run_dir=out, nsamples=4, seqlen=64, data_dir=shared_data_dir, progress=False)
    assert ev["perplexity"] == pytest.approx(rec["perplexity"], rel=1e-6)


def test_refuses_existing_run_without_overwrite(tiny_model_dir, shared_data_dir, tmp_path, capsys, prune_cli):
    out = tmp_path / "run"
    assert prune_cli(out, "--prune-method", "magnitude", "--sparsity-ratio", "0.5") == 0
    before = (out / "results.json").read_bytes()
    assert prune_cli(out, "--prune-method", "wanda", "--sparsity-ratio", "0.5") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    assert prune_cli(out, "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--overwrite") == 0
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
def test_bad_prune_arguments(args, message, tiny_model_dir, shared_data_dir, tmp_path, capsys, prune_cli):
    out = tmp_path / "run"
    assert prune_cli(out, *args) == 2
    assert message in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="known methods: alps, magnitude, nonlinear, ria, sparsegpt, wanda"):
        get_method("obs")


@pytest.mark.parametrize("true_sequential", [True, False])
def test_pipeline_modes_prune_every_linear(true_sequential, tiny_model_dir, shared_data_dir):
    loaded = api.load(str(tiny_model_dir))
    from nlprune.data import calibration_windows

    cal, _ = calibration_windows(loaded.tokenizer, 4, 64, 0, data_dir=shared_data_dir)
    pruned, report = prune_model(loaded.model, cal, get_method("wanda"), parse_pattern("unstructured", 0.5),
                                 progress=False, true_sequential=true_sequential)
    assert report.overall_sparsity == pytest.approx(0.5)
    # dense weights unchanged where kept, zero where pruned
    for d, p in zip(loaded.model.model.layers, pruned.model.layers):
        for name, lin in p.linears().items():
            dw, pw = np.asarray(d.linears()[name].weight), np.asarray(lin.effective_weight)
            keep = np.asarray(lin.mask).astype(bool)
            np.testing.assert_array_equal(pw[keep], dw[keep])
            assert np.all(pw[~keep] == 0)


class Recorder(PruningMethod):
    """Wanda, recording what the pipeline hands each group (not registered)."""

    name = "recorder"

    def __init__(self, reads_dense: bool = True):
        super().__init__()
        self.seen: list[GroupContext] = []
        self.reads_dense = reads_dense

    @property
    def needs_dense_layer(self) -> bool:
        return self.reads_dense

    def needs_inputs(self, group: str) -> bool:
        return True

    def _prune(self, weight, stats, pattern):
        return wanda_prune(weight, stats.sq_norms, pattern)

    def prune_group(self, ctx: GroupContext):
        self.seen.append(ctx)
        return super().prune_group(ctx)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_one_dispatch_path_hands_every_group_its_context(true_sequential, tiny_model_dir):
    """Both orders call the method's one hook per group, in order, with the layer's
    calibration inputs, the group's own inputs and statistics over every token; only the
    sequential flag (and where the statistics come from) differs."""
    loaded = api.load(str(tiny_model_dir))
    cfg = loaded.model.config
    cal = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 32))
    method = Recorder()
    prune_model(loaded.model, cal, method, parse_pattern("unstructured", 0.5), progress=False,
                true_sequential=true_sequential, batch_size=2)
    widths = {"qkv": cfg.hidden_size, "o": cfg.num_attention_heads * cfg.head_dim, "gate_up": cfg.hidden_size,
              "down": cfg.intermediate_size}
    assert [c.group for c in method.seen] == ["qkv", "o", "gate_up", "down"] * cfg.num_hidden_layers
    for c in method.seen:
        assert c.sequential is true_sequential
        assert c.hidden.shape == (3, 32, cfg.hidden_size)
        assert c.inputs.shape == (3, 32, widths[c.group]) and c.stats.n_tokens == 3 * 32
        assert len(c.weights) == len(c.names)
        np.testing.assert_allclose(c.stats.sq_norms, np.sum(np.square(np.asarray(c.inputs).reshape(-1, widths[c.group])), 0),
                                   rtol=1e-4)
    # true-sequential: o's inputs come from the pruned q/k/v; otherwise from the dense layer
    o = method.seen[1]
    dense_context = np.asarray(jax.vmap(lambda x: o.dense_layer.self_attn.context(
        o.dense_layer.input_layernorm(x), *loaded.model.rope(jnp.arange(32))))(o.hidden))
    differs = not np.allclose(np.asarray(o.inputs), dense_context, atol=1e-6)
    assert differs is true_sequential


def test_a_method_that_never_reads_the_dense_layer_is_not_handed_one(tiny_model_dir):
    """True-sequential: without needs_dense_layer the pipeline keeps no reference to the layer
    before pruning (its replaced weights can be freed); the masks are the same either way."""
    loaded = api.load(str(tiny_model_dir))
    cal = np.random.default_rng(0).integers(0, loaded.model.config.vocab_size, (3, 32))
    runs = {}
    for reads in (True, False):
        method = Recorder(reads_dense=reads)
        runs[reads] = prune_model(loaded.model, cal, method, parse_pattern("unstructured", 0.5), progress=False,
                                  batch_size=2)[0]
        assert all((c.dense_layer is not None) is reads for c in method.seen)
    for a, b in zip(jax.tree.leaves(runs[True]), jax.tree.leaves(runs[False]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
