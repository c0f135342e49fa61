"""Seeded random weights of a Llama config (tests, shape planning, ``--random-weights``).

Each decoder layer, the embeddings, the final norm and the head come from their own keys, so
any piece can be made alone (:func:`init_layer`, :func:`shell_part_blocks`) and equals the
same piece of :func:`init_llama` bit for bit: a model larger than memory is written a layer
at a time (:mod:`nlprune.convert.random_weights`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from nlprune.modeling.llama import (
    MLP, SHELL_PARTS, Attention, DecoderLayer, Embedding, LlamaConfig, LlamaForCausalLM, LlamaModel, Linear, RMSNorm,
    with_layers,
)

# Random weights (tests, shape planning, --random-weights). Each piece has its own key, so any
# piece can be generated alone (a model larger than memory is written layer by layer):
#   decoder layer i                  <- fold_in(key, i), split into one key per tensor
#   embedding, final norm, LM head   <- fold_in(fold_in(key, num_hidden_layers), 0 / 1 / 2)
# and each tensor is drawn in blocks of RANDOM_BLOCK_ROWS rows, block b from fold_in(its key, b),
# so that even a 128256-row embedding is generated (and written) a block at a time (64 MB for
# Llama 3.1-8B's) rather than needing several copies of the whole table at once.
# Linears (weights and biases) and the embedding are N(0, std^2); norm gains 1 + N(0, 0.1^2).
RANDOM_BLOCK_ROWS = 4096
RANDOM_STD = 0.02  # --random-weights: linears and embeddings N(0, RANDOM_STD^2)
# Recorded in every random-weights folder and model description: its text stays as it was
# when this code lived in nlprune.modeling.llama, so written folders and digests stay valid.
RANDOM_SCHEME = (
    "nlprune.modeling.llama.init_llama, per-layer keys: decoder layer i from fold_in(key(seed), i), "
    "embedding/norm/lm_head from fold_in(fold_in(key(seed), num_hidden_layers), 0/1/2); "
    f"tensors drawn in blocks of {RANDOM_BLOCK_ROWS} rows, block b from fold_in(tensor key, b)"
)
_KEYS_PER_LAYER = 16  # 7 linears x (weight, bias) + 2 norms


@functools.partial(jax.jit, static_argnums=(1, 3))
def _normal_block(key: jax.Array, shape: tuple[int, ...], scale: float, offset: float) -> jax.Array:
    """``offset + scale * N(0, 1)`` in float32, compiled as one program. Every random array
    goes through here, so pieces made alone equal those of a whole model bit for bit."""
    x = scale * jax.random.normal(key, shape, jnp.float32)
    return x + offset if offset else x


def random_normal_blocks(
    key: jax.Array, shape: tuple[int, ...], scale: float, offset: float = 0.0
) -> Iterator[jax.Array]:
    """A random tensor as its row blocks, in order (see the scheme above)."""
    rows = shape[0]
    for b, start in enumerate(range(0, rows, RANDOM_BLOCK_ROWS)):
        block_shape = (min(RANDOM_BLOCK_ROWS, rows - start), *shape[1:])
        yield _normal_block(jax.random.fold_in(key, b), block_shape, scale, offset)


def _random_normal(key: jax.Array, shape: tuple[int, ...], scale: float, offset: float = 0.0) -> jax.Array:
    blocks = list(random_normal_blocks(key, shape, scale, offset))
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks)


def layer_key(key: jax.Array, i: int) -> jax.Array:
    return jax.random.fold_in(key, i)


def shell_key(config: LlamaConfig, key: jax.Array) -> jax.Array:
    return jax.random.fold_in(key, config.num_hidden_layers)


def init_layer(config: LlamaConfig, key: jax.Array, std: float = 0.02) -> DecoderLayer:
    """One random decoder layer from its own key (``layer_key(model_key, i)``); float32."""
    keys = iter(jax.random.split(key, _KEYS_PER_LAYER))

    def linear(out_f, in_f, bias):
        w_key, b_key = next(keys), next(keys)  # both drawn, so the scheme is the same with or without biases
        b = _random_normal(b_key, (out_f,), std) if bias else None
        return Linear(_random_normal(w_key, (out_f, in_f), std), b)

    def norm():
        return RMSNorm(_random_normal(next(keys), (config.hidden_size,), 0.1, 1.0), config.rms_norm_eps)

    c, hd = config, config.head_dim
    attn = Attention(
        q_proj=linear(c.num_attention_heads * hd, c.hidden_size, c.attention_bias),
        k_proj=linear(c.num_key_value_heads * hd, c.hidden_size, c.attention_bias),
        v_proj=linear(c.num_key_value_heads * hd, c.hidden_size, c.attention_bias),
        o_proj=linear(c.hidden_size, c.num_attention_heads * hd, c.attention_bias),
        num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads, head_dim=hd,
    )
    mlp = MLP(
        gate_proj=linear(c.intermediate_size, c.hidden_size, c.mlp_bias),
        up_proj=linear(c.intermediate_size, c.hidden_size, c.mlp_bias),
        down_proj=linear(c.hidden_size, c.intermediate_size, c.mlp_bias),
    )
    return DecoderLayer(norm(), attn, norm(), mlp)


def shell_part_blocks(config: LlamaConfig, key: jax.Array, part: str, std: float = 0.02) -> Iterator[jax.Array]:
    """The float32 weight of one of :data:`SHELL_PARTS`, as row blocks, from the shell key
    (``shell_key(config, model_key)``); no blocks for ``lm_head`` when tied."""
    c = config
    part_key = jax.random.fold_in(key, SHELL_PARTS.index(part))
    if part == "norm":
        return random_normal_blocks(part_key, (c.hidden_size,), 0.1, 1.0)
    if part == "lm_head" and c.tie_word_embeddings:
        return iter(())
    return random_normal_blocks(part_key, (c.vocab_size, c.hidden_size), std)


def init_shell(config: LlamaConfig, key: jax.Array, std: float = 0.02) -> LlamaForCausalLM:
    """The random model without decoder layers (``layers == []``) from the shell key."""
    embed, norm, head = (list(shell_part_blocks(config, key, part, std)) for part in SHELL_PARTS)
    join = jnp.concatenate
    body = LlamaModel(Embedding(join(embed)), [], RMSNorm(join(norm), config.rms_norm_eps))
    return LlamaForCausalLM(body, Linear(join(head), None) if head else None, config)


def init_llama(config: LlamaConfig, key: jax.Array, std: float = 0.02) -> LlamaForCausalLM:
    """Random weights (for tests and shape planning); HF-shaped, float32. Layer i is
    ``init_layer(config, layer_key(key, i))``, the rest ``init_shell(config, shell_key(config, key))``."""
    layers = [init_layer(config, layer_key(key, i), std) for i in range(config.num_hidden_layers)]
    return with_layers(init_shell(config, shell_key(config, key), std), layers)
