"""``--dtype bfloat16``: weights held and written in bfloat16, computed in float32; and masks
held as booleans. Streamed and in-memory runs must still agree bit for bit."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlprune import api
from nlprune.methods import available_methods

EVAL = ["--eval", "--eval-nsamples", "4", "--eval-seqlen", "64", "--attention-windows", "2"]
QUICK = {"nonlinear": ["--steps", "2"]}


def record(out):
    return json.loads((out / "results.json").read_text())


def linears(model):
    return [(i, n, lin) for i, layer in enumerate(model.model.layers) for n, lin in layer.linears().items()]


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_a_bfloat16_run_holds_and_writes_bfloat16_and_masks_as_booleans(method, prune_cli, tmp_path):
    flags = ["--prune-method", method, *QUICK.get(method, []), "--sparsity-ratio", "0.5", *EVAL]
    assert prune_cli(tmp_path / "f32", *flags) == 0
    assert prune_cli(tmp_path / "bf16", *flags, "--dtype", "bfloat16") == 0
    wide, narrow = record(tmp_path / "f32"), record(tmp_path / "bf16")
    assert narrow["args"]["dtype"] == "bfloat16" and wide["args"]["dtype"] == "float32"
    model, _ = api.load_run(tmp_path / "bf16")
    for i, name, lin in linears(model):
        assert lin.weight.dtype == jnp.bfloat16, (i, name)
        assert lin.mask.dtype == jnp.bool_, (i, name)
        # exactly zero off the mask, and the mask's share of zeros is the ratio asked for
        assert not np.any(np.asarray(lin.weight, np.float32)[~np.asarray(lin.mask)])
        assert np.mean(~np.asarray(lin.mask)) == pytest.approx(0.5, abs=0.01)
    assert model.model.embed_tokens.weight.dtype == jnp.bfloat16
    assert model.model.layers[0].input_layernorm.weight.dtype == jnp.float32
    # the dense model in bfloat16 is another model: its perplexity is its own cache entry,
    # near float32's (rounding 8 mantissa bits of small random weights) but not equal to it
    assert narrow["dense_perplexity_cache"]["path"] != wide["dense_perplexity_cache"]["path"]
    assert narrow["dense_perplexity"] != wide["dense_perplexity"]
    assert narrow["dense_perplexity"] == pytest.approx(wide["dense_perplexity"], rel=0.01)
    assert narrow["perplexity"] == pytest.approx(wide["perplexity"], rel=0.05)
    # float32 runs keep float32 weights (and boolean masks too)
    full, _ = api.load_run(tmp_path / "f32")
    assert all(lin.weight.dtype == jnp.float32 and lin.mask.dtype == jnp.bool_ for _, _, lin in linears(full))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_streamed_bfloat16_run_is_the_in_memory_bfloat16_run(method, prune_cli, tmp_path):
    flags = ["--prune-method", method, "--sparsity-ratio", "0.5", "--dtype", "bfloat16", *EVAL]
    assert prune_cli(tmp_path / "memory", *flags) == 0
    assert prune_cli(tmp_path / "stream", *flags, "--stream", "--no-cache") == 0
    memory, stream = record(tmp_path / "memory"), record(tmp_path / "stream")
    assert (tmp_path / "stream" / "masks.safetensors").read_bytes() == (
        tmp_path / "memory" / "masks.safetensors").read_bytes()
    assert stream["perplexity"] == memory["perplexity"] and stream["dense_perplexity"] == memory["dense_perplexity"]
    assert stream["attention_error"]["per_layer"] == memory["attention_error"]["per_layer"]
    a, b = api.load_run(tmp_path / "stream")[0], api.load_run(tmp_path / "memory")[0]
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the layered model keeps the embeddings in bfloat16: half the float32 bytes
    config = a.config
    stored = tmp_path / "stream" / "model" / "shell-embed_tokens.bin"
    assert stored.stat().st_size == config.vocab_size * config.hidden_size * 2


def test_a_bfloat16_run_exports_to_transformers(prune_cli, tmp_path):
    from nlprune.cli import main as cli_main

    assert prune_cli(tmp_path / "run", "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--dtype", "bfloat16") == 0
    assert cli_main(["export-hf", "--run", str(tmp_path / "run"), "--output", str(tmp_path / "hf"),
                     "--dtype", "bfloat16"]) == 0
    exported = api.load(str(tmp_path / "hf")).model  # float32 on load: bfloat16 values exactly
    pruned, _ = api.load_run(tmp_path / "run")
    for (_, _, a), (_, _, b) in zip(linears(exported), linears(pruned), strict=True):
        np.testing.assert_array_equal(np.asarray(a.weight), np.asarray(b.effective_weight, np.float32))


def test_the_plan_counts_bfloat16_weights_and_boolean_masks():
    from nlprune.plan import config_of, plan_memory

    config, _ = config_of("llama-3.2-1b")
    wide = plan_memory(config, method="wanda", nsamples=8, seqlen=512)
    narrow = plan_memory(config, method="wanda", nsamples=8, seqlen=512, dtype="bfloat16")
    # the held model halves; the layer in hand is a float32 copy besides its bfloat16 self
    layer = sum(o * i for o, i in _linear_shapes(config))
    assert narrow.dense_weight_bytes == pytest.approx(wide.dense_weight_bytes / 2 + 4 * layer, rel=1e-6)
    assert narrow.peak_bytes < 0.75 * wide.peak_bytes
    with pytest.raises(ValueError, match="unknown dtype 'float16'"):
        plan_memory(config, method="wanda", dtype="float16")


def _linear_shapes(config):
    h, i, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def test_an_unknown_dtype_is_one_line_before_loading(prune_cli, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        prune_cli(tmp_path / "run", "--prune-method", "wanda", "--dtype", "float16")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(ValueError, match="unknown --dtype 'float8'"):
        api.prune("smollm2-135m", "wanda", 0.5, dtype="float8", output=tmp_path / "api")
    assert not (tmp_path / "run").exists() and not (tmp_path / "api").exists()
