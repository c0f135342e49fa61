"""Batched, jitted pieces of the Llama forward pass, for layer-by-layer work.

Pruning and evaluation run the model one decoder layer at a time over batches of windows
(batch, seq, hidden): every layer has the same shapes, so each piece compiles once. The
pieces split a layer where pruning needs to look inside it:

    h ─ attn_input ─> x_attn ─ (q/k/v) ─ attn_context ─> context ─ after_attention ─> h'
    h' ─ mlp_input ─> x_mlp ─ (gate/up) ─ mlp_hidden ─> act ─ after_mlp ─> layer output

``run_layer`` is the whole layer; ``layer_inputs`` gives the input of every group of linears
that share one (the calibration statistics of a dense layer).

Evaluation (perplexity, task log-likelihoods) uses the faster forward of
:mod:`nlprune.modeling.inference`, re-exported here: ``hidden_states(model, ids)`` (the last
layer's output), ``token_nll(model, h, ids)`` and ``batch_token_nll(model, ids)`` (per-token
next-token NLL). Its numerics equal these pieces' up to float rounding; pruning keeps these.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp

from nlprune.modeling.inference import batch_token_nll, hidden_states, token_nll
from nlprune.modeling.llama import (
    DecoderLayer,
    LlamaConfig,
    LlamaForCausalLM,
    rope_cos_sin,
    rope_inverse_frequencies,
)

__all__ = [
    "after_attention", "after_mlp", "attn_context", "attn_input", "batch_token_nll", "embed",
    "hidden_states", "layer_inputs", "mlp_hidden", "mlp_input", "rope_tables", "rope_tables_of", "run_layer",
    "token_nll",
]


@eqx.filter_jit
def embed(model: LlamaForCausalLM, ids: jax.Array) -> jax.Array:
    """Token embeddings of a batch of windows (batch, seq) -> (batch, seq, hidden)."""
    return model.embed(ids)


def rope_tables(model: LlamaForCausalLM, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables of positions 0..seq_len-1, shared by every layer."""
    return rope_tables_of(model.config, seq_len)


@functools.partial(jax.jit, static_argnums=(0, 1))
def rope_tables_of(config: LlamaConfig, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """:func:`rope_tables` from the config alone (a streamed run holds no model)."""
    return rope_cos_sin(jnp.asarray(rope_inverse_frequencies(config)), jnp.arange(seq_len))


@eqx.filter_jit
def run_layer(layer: DecoderLayer, h: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """One decoder layer on a batch h (batch, seq, hidden)."""
    return jax.vmap(layer, in_axes=(0, None, None))(h, cos, sin)


@eqx.filter_jit
def layer_inputs(layer: DecoderLayer, h: jax.Array, cos: jax.Array, sin: jax.Array) -> dict[str, jax.Array]:
    """Inputs of every linear group of ``layer`` for a batch h (batch, seq, hidden)."""
    return jax.vmap(layer.linear_inputs, in_axes=(0, None, None))(h, cos, sin)


@eqx.filter_jit
def attn_input(layer: DecoderLayer, h: jax.Array) -> jax.Array:
    """input_layernorm(h): the input of q/k/v."""
    return jax.vmap(layer.input_layernorm)(h)


@eqx.filter_jit
def attn_context(layer: DecoderLayer, h: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """The attention heads' outputs (batch, seq, heads * hd): the input of o_proj."""
    return jax.vmap(lambda x: layer.self_attn.context(layer.input_layernorm(x), cos, sin))(h)


@eqx.filter_jit
def after_attention(layer: DecoderLayer, h: jax.Array, context: jax.Array) -> jax.Array:
    """The residual stream after the attention block."""
    return h + layer.self_attn.o_proj(context)


@eqx.filter_jit
def mlp_input(layer: DecoderLayer, h: jax.Array) -> jax.Array:
    """post_attention_layernorm(h): the input of gate/up."""
    return jax.vmap(layer.post_attention_layernorm)(h)


@eqx.filter_jit
def mlp_hidden(layer: DecoderLayer, h: jax.Array) -> jax.Array:
    """SwiGLU activations (batch, seq, intermediate): the input of down_proj."""
    return layer.mlp.hidden(jax.vmap(layer.post_attention_layernorm)(h))


@eqx.filter_jit
def after_mlp(layer: DecoderLayer, h: jax.Array, act: jax.Array) -> jax.Array:
    """The layer's output: the residual stream after the MLP block."""
    return h + layer.mlp.down_proj(act)
