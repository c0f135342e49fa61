"""Storage precision: the weights a run holds and writes, float32 or bfloat16.

With ``--dtype bfloat16`` the decoder layers' linears, the embeddings and the LM head are held
(and written to the run directory) in bfloat16, half of float32; RMSNorm weights stay float32.
Computation stays float32: a linear promotes its bfloat16 weight against float32 activations,
the embedding lookup returns float32 rows, and a method prunes a float32 copy of the layer in
hand (:func:`in_float32`), whose pruned weights are rounded back afterwards (:func:`cast_layer`).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp

from nlprune.modeling.llama import DecoderLayer, LlamaForCausalLM

STORAGE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def storage_dtype(name: str):
    """The jnp dtype of a ``--dtype`` name."""
    if name not in STORAGE_DTYPES:
        raise ValueError(f"unknown --dtype {name!r}; choose one of {', '.join(STORAGE_DTYPES)}.")
    return STORAGE_DTYPES[name]


def layer_dtype(layer: DecoderLayer):
    """The dtype the layer's linears are held in."""
    return layer.self_attn.q_proj.weight.dtype


def cast_layer(layer: DecoderLayer, dtype) -> DecoderLayer:
    """The layer with its linears' weights and biases in ``dtype`` (masks and norms as they
    are); the same object when they already are."""
    lins = list(layer.linears().values())
    if all(lin.weight.dtype == dtype for lin in lins):
        return layer
    nodes = lambda l: [a for lin in l.linears().values() for a in (lin.weight, lin.bias) if a is not None]
    return eqx.tree_at(nodes, layer, [a.astype(dtype) for a in nodes(layer)])


def in_float32(layer: DecoderLayer) -> DecoderLayer:
    """The float32 copy a method prunes (the layer itself when it is float32)."""
    return cast_layer(layer, jnp.float32)


def cast_model(model: LlamaForCausalLM, dtype) -> LlamaForCausalLM:
    """Every decoder layer (:func:`cast_layer`), the embeddings and the LM head in ``dtype``."""
    layers = [cast_layer(layer, dtype) for layer in model.model.layers]
    model = eqx.tree_at(lambda m: m.model.layers, model, layers)
    heads = lambda m: [m.model.embed_tokens.weight] + ([] if m.lm_head is None else [m.lm_head.weight])
    if all(w.dtype == dtype for w in heads(model)):
        return model
    return eqx.tree_at(heads, model, [w.astype(dtype) for w in heads(model)])
