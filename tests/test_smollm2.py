"""The real SmolLM2-135M through nlprune's GGUF converter vs transformers loading the same GGUF."""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nlprune.data import eval_windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    from transformers import AutoModelForCausalLM

    path = smollm2.source.weights_path
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def test_logits_match_transformers_on_real_c4(smollm2, hf_smollm2, shared_data_dir):
    windows, _ = eval_windows(smollm2.tokenizer, "c4", 1, 512, data_dir=shared_data_dir, progress=False)
    ids = windows[0]
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor(ids[None]).long()).logits[0].numpy()
    ours = np.asarray(eqx.filter_jit(smollm2.model)(jnp.asarray(ids)))
    assert ours.shape == ref.shape == (512, 49152)
    assert np.abs(ours - ref).max() <= 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.999


def test_gguf_weights_equal_transformers_dequantization(smollm2, hf_smollm2):
    """Names, the q/k un-permutation and tied embeddings, tensor by tensor."""
    from nlprune.convert.hf import to_state_dict

    ours = to_state_dict(smollm2.model)
    theirs = {k: v.detach().numpy() for k, v in hf_smollm2.state_dict().items()}
    assert "lm_head.weight" not in ours  # tied
    for name, value in ours.items():
        np.testing.assert_allclose(value, theirs[name], rtol=0, atol=1e-6, err_msg=name)


def test_smollm2_config(smollm2):
    c = smollm2.model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rope_scaling is None
