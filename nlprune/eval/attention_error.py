"""How far a pruned model's attention matrices are from the dense model's.

Per layer: the mean over query heads of ||softmax_pruned - softmax_dense||_F^2 / n, on
held-out windows, both computed from the *dense* model's input to that layer, so the number
isolates what pruning this layer's Q and K did (the quantity the non-linear method optimises)
rather than errors accumulated upstream.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from nlprune.modeling.forward import embed, rope_tables, rope_tables_of, run_layer
from nlprune.modeling.llama import DecoderLayer, LlamaConfig, LlamaForCausalLM


@eqx.filter_jit
def layer_attention_error(dense: DecoderLayer, pruned: DecoderLayer, h, cos, sin) -> jax.Array:
    """Summed over windows: mean over heads of ||P_pruned - P_dense||_F^2 / n."""

    def one(x):
        x = dense.input_layernorm(x)
        p_dense = dense.self_attn.attention_probs(*dense.self_attn.project_qk(x, cos, sin))
        p_pruned = pruned.self_attn.attention_probs(*pruned.self_attn.project_qk(x, cos, sin))
        return jnp.mean(jnp.sum((p_pruned - p_dense) ** 2, axis=(-2, -1))) / x.shape[0]

    return jnp.sum(jax.vmap(one)(h))


def attention_error(
    dense: LlamaForCausalLM, pruned: LlamaForCausalLM, windows: np.ndarray, batch_size: int = 1
) -> list[float]:
    """Per-layer attention error (mean over windows) of ``pruned`` against ``dense``,
    ``batch_size`` windows per call (each holds every head's n x n attention of both models:
    one window at a time by default, as ``nlprune plan`` counts)."""
    windows = jnp.asarray(windows, jnp.int32)
    cos, sin = rope_tables(dense, windows.shape[1])
    errors = np.zeros(len(dense.model.layers))
    for start in range(0, windows.shape[0], batch_size):
        h = embed(dense, windows[start : start + batch_size])
        for i, (d, p) in enumerate(zip(dense.model.layers, pruned.model.layers, strict=True)):
            errors[i] += float(layer_attention_error(d, p, h, cos, sin))
            h = run_layer(d, h, cos, sin)
    return (errors / windows.shape[0]).tolist()


def attention_error_streamed(
    config: LlamaConfig, embed_rows: Callable[[np.ndarray], np.ndarray], dense_layer: Callable[[int], DecoderLayer],
    pruned_layer: Callable[[int], DecoderLayer], windows: np.ndarray, batch_size: int = 1,
) -> list[float]:
    """:func:`attention_error` holding one dense and one pruned decoder layer at a time
    (``embed_rows(ids)``: the embedding rows; ``dense_layer(i)``, ``pruned_layer(i)``: layer
    i of each model). The same sums in the same order: the same numbers."""
    windows = np.asarray(windows, np.int32)
    cos, sin = rope_tables_of(config, windows.shape[1])
    hidden = [jnp.asarray(embed_rows(windows[s : s + batch_size])) for s in range(0, windows.shape[0], batch_size)]
    errors = np.zeros(config.num_hidden_layers)
    for i in range(config.num_hidden_layers):
        d, p = dense_layer(i), pruned_layer(i)
        for b, h in enumerate(hidden):
            errors[i] += float(layer_attention_error(d, p, h, cos, sin))
            hidden[b] = run_layer(d, h, cos, sin)
        del d, p
    return (errors / windows.shape[0]).tolist()
