"""Llama (3.x, and Llama-architecture models such as SmolLM2) as Equinox modules.

Parameter names and shapes mirror Hugging Face's ``LlamaForCausalLM`` (``model.layers.3.
self_attn.q_proj.weight`` is ``model.layers[3].self_attn.q_proj.weight`` here, shaped
(out, in)), so conversion is a plain name mapping with no transposes.

Every prunable linear carries an optional ``mask`` leaf of its weight's shape; the effective
weight is ``weight * mask``. Masks are ordinary pytree leaves, so ``eqx.partition`` with a
filter spec selects exactly them (see :func:`mask_filter_spec`).

The forward pass is exposed piece by piece (``embed``, ``decoder layer i``, ``final norm``,
``head``) because pruning calibrates one layer at a time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

PRUNABLE_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A config.json that this port cannot honour exactly."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """``llama3`` frequency scaling of Llama 3.1 / 3.2 (the only scaling type supported)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    # Fields of a Hugging Face config.json that change nothing in a float32 forward pass.
    _INERT = frozenset(
        {
            "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
            "initializer_range", "use_cache", "pad_token_id", "unk_token_id",
            "attention_dropout", "pretraining_tp", "_name_or_path", "_model_name_or_path",
            "quantization_config", "output_attentions", "output_hidden_states",
            "return_dict", "tie_encoder_decoder", "is_decoder", "is_encoder_decoder",
            "id2label", "label2id", "chunk_size_feed_forward", "problem_type",
            "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
            "task_specific_params", "finetuning_task", "torchscript", "use_bfloat16",
            "bad_words_ids", "num_beams", "max_length", "min_length", "do_sample",
            "temperature", "top_k", "top_p", "repetition_penalty", "generation_config",
            "nlprune_sparsity",  # what an nlprune export records about its pruning
        }
    )
    _REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    _KNOWN = frozenset(
        {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
            "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id",
            "eos_token_id", "hidden_act",
        }
    )
    # Features this port does not implement: refused by name rather than silently ignored.
    _UNSUPPORTED_IF_SET = {
        "sliding_window": None,
        "use_sliding_window": False,
        "layer_types": None,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    }

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "LlamaConfig":
        """Build from a Hugging Face ``config.json`` dict, refusing anything not honoured."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"config must be a JSON object, not {type(cfg).__name__}.")
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"model_type={model_type!r} is not supported: only 'llama' is.")
        for field, harmless in cls._UNSUPPORTED_IF_SET.items():
            if cfg.get(field, harmless) not in (harmless, None):
                raise ConfigError(
                    f"config field {field}={cfg[field]!r} is not supported by nlprune's Llama "
                    "port (it computes full causal attention); remove it or use a model "
                    "without it."
                )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config field hidden_act={act!r} is not supported: only 'silu'.")
        unknown = sorted(set(cfg) - cls._KNOWN - cls._INERT - set(cls._UNSUPPORTED_IF_SET))
        if unknown:
            raise ConfigError(
                f"config fields {unknown} are not understood by nlprune's Llama port; refusing "
                "rather than silently ignoring them."
            )

        missing = [k for k in cls._REQUIRED if cfg.get(k) is None]
        if missing:
            raise ConfigError(f"config is missing {', '.join(missing)}: not a complete Llama config.json.")
        bad = [f"{k}={cfg[k]!r}" for k in cls._REQUIRED if type(cfg[k]) is not int or cfg[k] < 1]
        if bad:
            raise ConfigError(f"config has {', '.join(bad)}; these must be positive integers.")
        rope_theta, rope_scaling = _parse_rope(cfg)
        heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers`` reads as a LlamaConfig."""
        rope_scaling = None
        if self.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        }


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read RoPE settings from either the classic (``rope_theta`` + ``rope_scaling``) or the
    transformers >= 5 (``rope_parameters``) spelling."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling")
    if scaling:
        params = {**params, **scaling}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(
            f"config field rope_scaling has rope_type={rope_type!r}; nlprune supports only "
            "plain RoPE and 'llama3' scaling."
        )
    try:
        return theta, RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"config field rope_scaling (llama3) lacks {e.args[0]!r}") from None


# --------------------------------------------------------------------------- rotary


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies in float32, computed as transformers does (including ``llama3``
    scaling) so that angles agree bit for bit at long positions."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq).astype(np.float32)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(inv_freq: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables of shape (seq, head_dim) for integer positions."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (Hugging Face's layout) on x of shape (..., seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------- modules


class Linear(eqx.Module):
    """``y = x @ (weight * mask).T + bias``; weight (out, in) as in ``torch.nn.Linear``."""

    weight: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None = None

    @property
    def effective_weight(self) -> jax.Array:
        return self.weight if self.mask is None else self.weight * self.mask

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.effective_weight.T
        return y if self.bias is None else y + self.bias


class RMSNorm(eqx.Module):
    weight: jax.Array
    eps: float = eqx.field(static=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        return self.weight * (xf * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)


# Query rows per attention block in the forward pass (Attention.context); chosen by
# benchmarks/forward/bench_forward.py (BENCHMARKS.md).
QUERY_BLOCK = 128


class Attention(eqx.Module):
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    def project_qk(self, x, cos, sin):
        """RoPE'd queries (heads, seq, hd) and keys (kv_heads, seq, hd) for x (seq, hidden)."""
        seq = x.shape[0]
        with jax.named_scope("qkv_proj"):
            q = self.q_proj(x).reshape(seq, self.num_heads, self.head_dim).transpose(1, 0, 2)
            k = self.k_proj(x).reshape(seq, self.num_kv_heads, self.head_dim).transpose(1, 0, 2)
        with jax.named_scope("rope"):
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def attention_probs(self, q, k):
        """Causal softmax(QK^T / sqrt(hd)) per query head, GQA-grouped: (heads, seq, seq)."""
        seq = q.shape[1]
        rep = self.num_heads // self.num_kv_heads
        qg = q.reshape(self.num_kv_heads, rep, seq, self.head_dim)
        scores = jnp.einsum("grqd,gkd->grqk", qg, k) / jnp.sqrt(jnp.float32(self.head_dim))
        causal = jnp.tril(jnp.ones((seq, seq), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        return jax.nn.softmax(scores, axis=-1).reshape(self.num_heads, seq, seq)

    def context(self, x, cos, sin):
        """The heads' outputs concatenated (seq, heads * hd): the input of ``o_proj``.

        Queries go in blocks of ``QUERY_BLOCK``, each against the keys up to its own end: the
        causal mask zeroes the rest anyway, so this skips ~40% of the scores and softmax at
        seq 512 (and more at longer seq) with the same result up to float rounding."""
        seq = x.shape[0]
        q, k = self.project_qk(x, cos, sin)
        with jax.named_scope("qkv_proj"):
            v = self.v_proj(x).reshape(seq, self.num_kv_heads, self.head_dim).transpose(1, 0, 2)
        rep = self.num_heads // self.num_kv_heads
        with jax.named_scope("rope"):
            qg = q.reshape(self.num_kv_heads, rep, seq, self.head_dim) / jnp.sqrt(jnp.float32(self.head_dim))
        outs = []
        for start in range(0, seq, QUERY_BLOCK):
            stop = min(start + QUERY_BLOCK, seq)
            with jax.named_scope("attn_scores"):
                scores = jnp.einsum("grqd,gkd->grqk", qg[:, :, start:stop], k[:, :stop])
            with jax.named_scope("attn_softmax"):
                causal = jnp.arange(stop)[None, :] <= jnp.arange(start, stop)[:, None]
                probs = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(scores.dtype).min), axis=-1)
            with jax.named_scope("attn_context"):
                outs.append(jnp.einsum("grqk,gkd->qgrd", probs, v[:, :stop]))
        with jax.named_scope("attn_context"):
            return jnp.concatenate(outs).reshape(seq, self.num_heads * self.head_dim)

    def __call__(self, x, cos, sin):
        context = self.context(x, cos, sin)
        with jax.named_scope("o_proj"):
            return self.o_proj(context)


class MLP(eqx.Module):
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear

    def hidden(self, x):
        """SwiGLU activations (seq, intermediate): the input of ``down_proj``."""
        with jax.named_scope("mlp_gate_up"):
            gate, up = self.gate_proj(x), self.up_proj(x)
        with jax.named_scope("mlp_act"):
            return jax.nn.silu(gate) * up

    def __call__(self, x):
        act = self.hidden(x)
        with jax.named_scope("mlp_down"):
            return self.down_proj(act)


class DecoderLayer(eqx.Module):
    input_layernorm: RMSNorm
    self_attn: Attention
    post_attention_layernorm: RMSNorm
    mlp: MLP

    def __call__(self, h, cos, sin):
        """One pre-norm block on one sequence h (seq, hidden). The named scopes (also in the
        attention and MLP) only label the compiled program's ops for profiles."""
        with jax.named_scope("norms"):
            x = self.input_layernorm(h)
        h = h + self.self_attn(x, cos, sin)
        with jax.named_scope("norms"):
            x = self.post_attention_layernorm(h)
        return h + self.mlp(x)

    def linear_inputs(self, h, cos, sin) -> dict[str, jax.Array]:
        """The input of each group of linears that share one (calibration statistics)."""
        x_attn = self.input_layernorm(h)
        context = self.self_attn.context(x_attn, cos, sin)
        h = h + self.self_attn.o_proj(context)
        x_mlp = self.post_attention_layernorm(h)
        return {"qkv": x_attn, "o": context, "gate_up": x_mlp, "down": self.mlp.hidden(x_mlp)}

    def linears(self) -> dict[str, Linear]:
        a, m = self.self_attn, self.mlp
        return {
            "q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj,
            "gate_proj": m.gate_proj, "up_proj": m.up_proj, "down_proj": m.down_proj,
        }


class Embedding(eqx.Module):
    weight: jax.Array  # (vocab, hidden)

    def __call__(self, ids):
        rows = jnp.take(self.weight, ids, axis=0)
        # weights held in bfloat16 (--dtype) still compute in float32
        return rows.astype(jnp.float32) if rows.dtype in (jnp.bfloat16, jnp.float16) else rows


class LlamaModel(eqx.Module):
    embed_tokens: Embedding
    layers: list[DecoderLayer]
    norm: RMSNorm


class LlamaForCausalLM(eqx.Module):
    """Hugging Face's LlamaForCausalLM semantics; ``lm_head`` is None when tied."""

    model: LlamaModel
    lm_head: Linear | None
    config: LlamaConfig = eqx.field(static=True)

    # ---- pieces, for layer-by-layer use -------------------------------------------------
    def embed(self, ids: jax.Array) -> jax.Array:
        return self.model.embed_tokens(ids)

    def rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos/sin tables for integer positions (seq,)."""
        # The inverse frequencies are a trace-time constant: the config is static.
        return rope_cos_sin(jnp.asarray(rope_inverse_frequencies(self.config)), positions)

    def head_weight(self) -> jax.Array:
        """(vocab, hidden): the LM head, or the embedding when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def final_hidden(self, h: jax.Array) -> jax.Array:
        return self.model.norm(h)

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        logits = self.final_hidden(h) @ self.head_weight().T
        if self.lm_head is not None and self.lm_head.bias is not None:
            logits = logits + self.lm_head.bias
        return logits

    def __call__(self, ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Logits (seq, vocab) for one sequence of token ids (vmap for batches).

        ``positions`` defaults to 0..seq-1; pass others to test long-context RoPE cheaply."""
        cos, sin = self.rope(jnp.arange(ids.shape[-1]) if positions is None else positions)
        h = self.embed(ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        return self.logits_from_hidden(h)


# --------------------------------------------------------------------------- building


def with_layers(model: LlamaForCausalLM, layers: list[DecoderLayer]) -> LlamaForCausalLM:
    """``model`` with its decoder layers replaced by ``layers`` (a shell gets its layers)."""
    body = LlamaModel(model.model.embed_tokens, list(layers), model.model.norm)
    return LlamaForCausalLM(body, model.lm_head, model.config)


SHELL_PARTS = ("embed_tokens", "norm", "lm_head")  # the model without its decoder layers
