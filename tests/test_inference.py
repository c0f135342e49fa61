"""The evaluation forward (nlprune.modeling.inference) against the model's plain forward."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlprune.convert.hf import from_transformers
from nlprune.modeling import forward, inference
from nlprune.modeling.masks import mask_filter_spec, with_masks

from test_llama_parity import random_hf_model, tiny_hf_config


def logits_nll(model, ids):
    """-log softmax(logits)[next token] from the full (seq, vocab) logits of each window."""
    logits = jax.vmap(model)(ids)[:, :-1]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]


def pruning_forward_hidden(model, ids):
    """The last layer's output through the pruning pipeline's own layer forward."""
    cos, sin = forward.rope_tables(model, ids.shape[1])
    h = forward.embed(model, ids)
    for layer in model.model.layers:
        h = forward.run_layer(layer, h, cos, sin)
    return h


@pytest.mark.parametrize(
    "overrides, token_chunk, vocab_slice",
    [
        # vocab 301 = 7 * 43: slices of 43 rows; 16-token chunks leave a ragged last chunk
        pytest.param({"vocab_size": 301, "tie_word_embeddings": True}, 16, 64, id="tied-sliced"),
        # prime vocabulary 97: no useful divisor, one slice of the whole vocabulary
        pytest.param({}, 1024, 64, id="untied-prime-vocab"),
        pytest.param({"vocab_size": 256}, 7, 2048, id="chunk-not-multiple-of-8"),
    ],
)
def test_token_nll_equals_logits_nll(overrides, token_chunk, vocab_slice):
    model = from_transformers(random_hf_model(tiny_hf_config(**overrides)))
    vocab = model.config.vocab_size
    ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (3, 37)), jnp.int32)  # 108 targets
    h = inference.hidden_states(model, ids)
    got = inference.token_nll(model, h, ids, token_chunk, vocab_slice)
    want = logits_nll(model, ids)
    assert got.shape == (3, 36)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_lm_head_bias_is_used():
    """A biased LM head (not in HF Llama, allowed by the port) enters logsumexp and target."""
    model = from_transformers(random_hf_model(tiny_hf_config()))
    bias = jnp.asarray(np.random.default_rng(2).normal(size=model.config.vocab_size), jnp.float32)
    model = eqx.tree_at(lambda m: m.lm_head.bias, model, bias, is_leaf=lambda x: x is None)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, 20)), jnp.int32)
    got = inference.batch_token_nll(model, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(logits_nll(model, ids)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="gqa2"),
        pytest.param({"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True}, id="mqa-biases"),
        pytest.param({"num_key_value_heads": 4}, id="mha"),
    ],
)
def test_hidden_states_equal_pruning_forward(overrides):
    """Several query blocks with a ragged last one, a batch that leaves the sequence loop a
    remainder step (3 sequences of 301 tokens per step, 5 sequences), and masks folded into
    the weights."""
    model = with_masks(from_transformers(random_hf_model(tiny_hf_config(**overrides))))
    rng = np.random.default_rng(1)
    masks, rest = eqx.partition(model, mask_filter_spec(model))
    masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) > 0.3, m.dtype), masks)
    model = eqx.combine(masks, rest)
    seq = 2 * inference.QUERY_BLOCK + 45
    assert inference.TOKENS_PER_STEP // seq == 3
    ids = jnp.asarray(rng.integers(0, model.config.vocab_size, (5, seq)), jnp.int32)
    got = inference.hidden_states(model, ids)
    want = pruning_forward_hidden(model, ids)
    assert got.shape == (5, seq, model.config.hidden_size)
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got - want).max()) <= 1e-5 * scale
    # the masks mattered
    dense = pruning_forward_hidden(eqx.combine(jax.tree.map(jnp.ones_like, masks), rest), ids)
    assert float(jnp.abs(dense - want).max()) > 1e-2 * scale


def test_forward_reexports_the_evaluation_forward():
    """Other evaluators import hidden_states / token NLL from nlprune.modeling.forward."""
    assert forward.hidden_states is inference.hidden_states
    assert forward.batch_token_nll is inference.batch_token_nll
    assert forward.token_nll is inference.token_nll
