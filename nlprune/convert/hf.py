"""Hugging Face <-> Equinox conversion.

Names and shapes mirror Hugging Face's exactly, so the conversion is a name mapping with no
transposes: ``state["model.layers.3.mlp.up_proj.weight"]`` is
``model.model.layers[3].mlp.up_proj.weight``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nlprune.modeling.llama import (
    PRUNABLE_LINEARS,
    Attention,
    DecoderLayer,
    Embedding,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    Linear,
    MLP,
    RMSNorm,
    with_layers,
)


INDEX_FILE = "model.safetensors.index.json"  # a sharded folder's tensor -> file map
EMBED = "model.embed_tokens.weight"


class WeightsError(ValueError):
    """Weights that do not match their config, or a checkpoint that cannot be read."""


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of an HF LlamaForCausalLM state dict with its shape."""
    c, hd = config, config.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.norm.weight": (c.hidden_size,),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    linear_shapes = {
        "self_attn.q_proj": (q, c.hidden_size, c.attention_bias),
        "self_attn.k_proj": (kv, c.hidden_size, c.attention_bias),
        "self_attn.v_proj": (kv, c.hidden_size, c.attention_bias),
        "self_attn.o_proj": (c.hidden_size, q, c.attention_bias),
        "mlp.gate_proj": (c.intermediate_size, c.hidden_size, c.mlp_bias),
        "mlp.up_proj": (c.intermediate_size, c.hidden_size, c.mlp_bias),
        "mlp.down_proj": (c.hidden_size, c.intermediate_size, c.mlp_bias),
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (c.hidden_size,)
        shapes[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        for name, (out_f, in_f, bias) in linear_shapes.items():
            shapes[f"{p}{name}.weight"] = (out_f, in_f)
            if bias:
                shapes[f"{p}{name}.bias"] = (out_f,)
    return shapes


def check_state_dict(config: LlamaConfig, state: Mapping[str, Any], source: str = "weights") -> None:
    """Refuse a state dict whose tensors are missing or disagree with the config."""
    want = expected_shapes(config)
    missing = sorted(set(want) - set(state))
    wrong = [
        f"{k}: has {tuple(state[k].shape)}, config implies {want[k]}"
        for k in want
        if k in state and tuple(state[k].shape) != want[k]
    ]
    if missing or wrong:
        lines = [f"{source} do not match their config:"]
        if wrong:
            lines += ["  shape mismatch " + w for w in wrong[:8]]
            lines += [f"  ... and {len(wrong) - 8} more"] if len(wrong) > 8 else []
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {missing[:6]}")
        lines.append("Check that config.json belongs to these weights.")
        raise WeightsError("\n".join(lines))


def from_state_dict(config: LlamaConfig, state: Mapping[str, Any]) -> LlamaForCausalLM:
    """Build the Equinox model from an HF-named state dict of arrays (numpy or jax)."""
    check_state_dict(config, state)
    layers = [layer_from_state(config, state, i) for i in range(config.num_hidden_layers)]
    return with_layers(shell_from_state(config, state), layers)


def _float32(state: Mapping[str, Any], name: str) -> jax.Array:
    return jnp.asarray(np.asarray(state[name], dtype=np.float32))


def layer_from_state(config: LlamaConfig, state: Mapping[str, Any], i: int) -> DecoderLayer:
    """Decoder layer ``i`` from the ``model.layers.{i}.*`` tensors of an HF-named mapping
    (only those are looked up, so the mapping may read them from disk on demand)."""
    c, p = config, f"model.layers.{i}."

    def linear(prefix, bias):
        return Linear(_float32(state, prefix + ".weight"), _float32(state, prefix + ".bias") if bias else None)

    def norm(name):
        return RMSNorm(_float32(state, p + name), c.rms_norm_eps)

    attn = Attention(
        *(linear(p + f"self_attn.{n}", c.attention_bias) for n in PRUNABLE_LINEARS[:4]),
        num_heads=c.num_attention_heads,
        num_kv_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
    )
    mlp = MLP(*(linear(p + f"mlp.{n}", c.mlp_bias) for n in PRUNABLE_LINEARS[4:]))
    return DecoderLayer(norm("input_layernorm.weight"), attn, norm("post_attention_layernorm.weight"), mlp)


def shell_from_state(config: LlamaConfig, state: Mapping[str, Any]) -> LlamaForCausalLM:
    """The model without decoder layers (embedding, final norm, LM head) from an HF-named
    mapping; ``lm_head.weight`` is not looked up when the embeddings are tied."""
    lm_head = None if config.tie_word_embeddings else Linear(_float32(state, "lm_head.weight"), None)
    embed = Embedding(_float32(state, "model.embed_tokens.weight"))
    body = LlamaModel(embed, [], RMSNorm(_float32(state, "model.norm.weight"), config.rms_norm_eps))
    return LlamaForCausalLM(body, lm_head, config)


def layer_state_dict(layer: DecoderLayer, i: int) -> dict[str, jax.Array]:
    """The HF-named tensors of decoder layer ``i`` (masks folded into the weights)."""
    p = f"model.layers.{i}."
    state = {
        p + "input_layernorm.weight": layer.input_layernorm.weight,
        p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight,
    }
    for name, lin in layer.linears().items():
        sub = "self_attn" if name in PRUNABLE_LINEARS[:4] else "mlp"
        state[f"{p}{sub}.{name}.weight"] = lin.effective_weight
        if lin.bias is not None:
            state[f"{p}{sub}.{name}.bias"] = lin.bias
    return state


def to_state_dict(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """HF-named float32 numpy state dict; masks are folded into the weights (exact zeros)."""
    c = model.config
    state = {
        "model.embed_tokens.weight": model.model.embed_tokens.weight,
        "model.norm.weight": model.model.norm.weight,
    }
    if model.lm_head is not None:
        state["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.model.layers):
        state.update(layer_state_dict(layer, i))
    out = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
    check_state_dict(c, out, "exported weights")
    return out


def from_transformers(hf_model) -> LlamaForCausalLM:
    """From an in-memory ``transformers`` LlamaForCausalLM (any dtype; converted to float32)."""
    config = LlamaConfig.from_hf_dict(hf_model.config.to_dict())
    state = {k: v.detach().float().cpu().numpy() for k, v in hf_model.state_dict().items()}
    state.pop("lm_head.weight", None) if config.tie_word_embeddings else None
    return from_state_dict(config, state)


def read_config(folder: Path) -> LlamaConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder} has no config.json: it is not a Hugging Face model folder.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e}).") from None
    return LlamaConfig.from_hf_dict(raw)


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a folder's ``*.safetensors`` files (sharded or not) as numpy arrays."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise WeightsError(
            f"{folder} has no *.safetensors files. nlprune reads Hugging Face folders saved with "
            "safetensors (save_pretrained(..., safe_serialization=True))."
        )
    state: dict[str, np.ndarray] = {}
    for f in files:
        try:
            try:
                tensors = load_file(str(f))
            except TypeError:
                # bfloat16 tensors have no numpy dtype: read them through torch.
                tensors = _read_with_torch(f)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(
                f"cannot read {f} ({f.stat().st_size} bytes): {e}. The file is truncated or "
                "corrupt; re-download or re-export it."
            ) from None
        state.update(tensors)
    return state


def _read_with_torch(path: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def load_hf_folder(folder: str | Path) -> LlamaForCausalLM:
    """A local Hugging Face checkpoint folder (config.json + safetensors) to Equinox."""
    folder = Path(folder)
    config = read_config(folder)
    state = read_safetensors(folder)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return from_state_dict(config, state)
