"""Pruning masks as leaves of the model: every prunable linear has an optional ``mask``.

``with_masks`` adds all-ones masks, ``eqx.partition(model, mask_filter_spec(model))`` selects
exactly them (how a method trains masks and nothing else), ``apply_masks`` folds them into
the weights, and ``set_linears`` replaces (weight, mask) of a layer's named linears.
Names mirror Hugging Face's (``model.layers.3.self_attn.q_proj``).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from nlprune.modeling.llama import PRUNABLE_LINEARS, DecoderLayer, LlamaConfig, LlamaForCausalLM, Linear


def linear_paths(config: LlamaConfig) -> list[str]:
    """HF-style names of every prunable linear, e.g. ``model.layers.0.self_attn.q_proj``."""
    out = []
    for i in range(config.num_hidden_layers):
        for name in PRUNABLE_LINEARS:
            sub = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            out.append(f"model.layers.{i}.{sub}.{name}")
    return out


def prunable_linears(model: LlamaForCausalLM) -> list[Linear]:
    return [lin for layer in model.model.layers for lin in layer.linears().values()]


def with_masks(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Give every prunable linear an all-ones float mask (dense model, masks now leaves)."""
    return eqx.tree_at(
        lambda m: [lin.mask for lin in prunable_linears(m)],
        model,
        [jnp.ones_like(lin.weight) for lin in prunable_linears(model)],
        is_leaf=lambda x: x is None,
    )


def mask_filter_spec(model: LlamaForCausalLM) -> Any:
    """Filter spec for ``eqx.partition``: True exactly at the mask leaves."""
    spec = jax.tree.map(lambda _: False, model)
    return eqx.tree_at(
        lambda m: [lin.mask for lin in prunable_linears(m)],
        spec,
        [lin.mask is not None for lin in prunable_linears(model)],
        is_leaf=lambda x: x is None,
    )


def apply_masks(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Fold masks into weights (weight * mask) and drop them: the pruned model proper."""
    def nodes(m):
        return [node for lin in prunable_linears(m) for node in (lin.weight, lin.mask)]

    values = [v for lin in prunable_linears(model) for v in (lin.effective_weight, None)]
    return eqx.tree_at(nodes, model, values, is_leaf=lambda x: x is None)


def set_linears(layer: DecoderLayer, updates: dict[str, tuple[jax.Array, jax.Array]]) -> DecoderLayer:
    """Replace (weight, mask) of the named linears. A boolean mask stays boolean (a byte per
    weight, a quarter of a float32 mask); any other mask (a relaxed one) takes its weight's dtype."""
    names = list(updates)

    def nodes(l):
        lins = l.linears()
        return [node for n in names for node in (lins[n].weight, lins[n].mask)]

    values = [v for n in names for v in (updates[n][0], _mask_leaf(updates[n][1], updates[n][0].dtype))]
    return eqx.tree_at(nodes, layer, values, is_leaf=lambda x: x is None)


def _mask_leaf(mask: jax.Array, weight_dtype: Any) -> jax.Array:
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask.astype(weight_dtype)
