"""The Equinox Llama against transformers' own LlamaForCausalLM, float32, tiny configs."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from nlprune.convert.hf import from_transformers
from nlprune.modeling.llama import LlamaConfig, LlamaForCausalLM
from nlprune.modeling.masks import apply_masks, mask_filter_spec, with_masks

LLAMA32_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tiny_hf_config(**overrides) -> dict:
    cfg = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    cfg.update(overrides)
    return cfg


def random_hf_model(cfg: dict, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).float().eval()
    # HF initialises biases and norms to constants; randomise everything so no term hides.
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if "norm" in name or "bias" in name else 0.08
            p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name else 0.0))
    return model


def compare(cfg: dict, seq: int = 24, start: int = 0, seed: int = 0) -> float:
    hf = random_hf_model(cfg, seed)
    ours = from_transformers(hf)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg["vocab_size"], size=(2, seq))
    positions = np.arange(start, start + seq)
    with torch.no_grad():
        ref = hf(
            torch.tensor(ids), position_ids=torch.tensor(positions)[None].expand(2, -1)
        ).logits.numpy()
    fwd = eqx.filter_jit(jax.vmap(lambda m, i, p: m(i, p), in_axes=(None, 0, None)))
    out = np.asarray(fwd(ours, jnp.asarray(ids), jnp.asarray(positions)))
    return float(np.abs(out - ref).max())


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="gqa2-untied"),
        pytest.param({"num_key_value_heads": 1}, id="gqa1-mqa"),
        pytest.param({"num_key_value_heads": 4}, id="mha"),
        pytest.param({"tie_word_embeddings": True}, id="tied"),
        pytest.param({"attention_bias": True, "mlp_bias": True}, id="biases"),
        pytest.param({"rope_theta": 500000.0, "head_dim": 32}, id="theta-500k-hd32"),
        pytest.param(
            {"rope_theta": 500000.0, "rope_scaling": LLAMA32_ROPE, "tie_word_embeddings": True},
            id="llama3-rope",
        ),
    ],
)
def test_logits_match_transformers(overrides):
    assert compare(tiny_hf_config(**overrides)) <= 1e-5


def test_blocked_attention_matches_transformers_across_blocks():
    """Sequences longer than one query block, with a ragged last block (QUERY_BLOCK = 128)."""
    from nlprune.modeling.llama import QUERY_BLOCK

    seq = 2 * QUERY_BLOCK + 45
    assert compare(tiny_hf_config(), seq=seq) <= 1e-5


def test_llama3_rope_beyond_original_context():
    """Llama 3.2-1B's scaling factors at positions past 8192, where the scaling matters."""
    cfg = tiny_hf_config(rope_theta=500000.0, rope_scaling=LLAMA32_ROPE, tie_word_embeddings=True)
    assert compare(cfg, seq=16, start=9000) <= 1e-5
    assert compare(cfg, seq=16, start=60000) <= 1e-5


def test_llama3_scaling_changes_logits():
    """Guard against the scaling being silently ignored: it must change long-range output."""
    base = tiny_hf_config(rope_theta=500000.0)
    scaled = dict(base, rope_scaling=LLAMA32_ROPE)
    hf = random_hf_model(base)
    a = from_transformers(hf)
    ids = jnp.arange(16) % base["vocab_size"]
    pos = jnp.arange(9000, 9016)
    ours_scaled = LlamaForCausalLM(a.model, a.lm_head, LlamaConfig.from_hf_dict(scaled))
    assert jnp.abs(a(ids, pos) - ours_scaled(ids, pos)).max() > 1e-3


def test_masked_logits_equal_zeroed_weights():
    hf = random_hf_model(tiny_hf_config())
    model = with_masks(from_transformers(hf))
    rng = np.random.default_rng(1)
    masks, rest = eqx.partition(model, mask_filter_spec(model))
    masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) > 0.5, m.dtype), masks)
    masked = eqx.combine(masks, rest)
    zeroed = apply_masks(masked)  # weights * mask, masks dropped
    assert all(lin.mask is None for l in zeroed.model.layers for lin in l.linears().values())
    ids = jnp.asarray(rng.integers(0, 97, size=20))
    np.testing.assert_array_equal(np.asarray(masked(ids)), np.asarray(zeroed(ids)))
    # and the masks did something
    assert np.abs(np.asarray(masked(ids)) - np.asarray(model(ids))).max() > 1e-3


def test_mask_filter_spec_selects_only_masks():
    model = with_masks(from_transformers(random_hf_model(tiny_hf_config())))
    masks, rest = eqx.partition(model, mask_filter_spec(model))
    leaves = jax.tree.leaves(masks)
    assert len(leaves) == 7 * 2
    assert all(bool(jnp.all(l == 1)) for l in leaves)
    # gradient wrt masks only: partitioned params are exactly the masks
    ids = jnp.arange(10)

    def loss(masks):
        return eqx.combine(masks, rest)(ids).sum()

    grads = jax.grad(loss)(masks)
    assert jax.tree.structure(grads) == jax.tree.structure(masks)
