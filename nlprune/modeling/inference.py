"""The evaluation forward pass: hidden states and per-token NLL of batches of windows.

Same maths as ``LlamaForCausalLM.__call__`` followed by a log-softmax, arranged for a CPU's
caches (evaluation only: pruning calibrates with :mod:`nlprune.modeling.forward`, whose
numerics it must keep):

- each decoder layer runs a few sequences at a time (``lax.map``, about
  ``TOKENS_PER_STEP`` tokens per step), so their activations (attention scores, the MLP's
  intermediate) stay in cache between the GEMMs instead of streaming a whole batch through
  memory at every op;
- attention goes in blocks of queries, each against the keys up to its own end, with the
  query heads of one KV head stacked into the rows of one matrix product;
- the LM head never materialises a window's logits: tokens go in chunks, and each chunk
  walks the vocabulary in slices keeping a running max and sum of exponentials
  (logsumexp), while the target's logit is one dot product per token.

Pieces carry ``jax.named_scope`` names (:data:`PIECES`) so a profile of the compiled
program can attribute its time (benchmarks/eval/bench_eval_profile.py).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from nlprune.modeling.llama import Attention, DecoderLayer, LlamaForCausalLM, apply_rope

# Query positions per attention block: each block computes its scores against the keys up
# to its own end only, so smaller blocks skip more of the causal mask's zeros but make more,
# smaller matrix products.
QUERY_BLOCK = 128
# Tokens per step of the layer loop (``lax.map`` over whole sequences): enough rows for
# efficient GEMMs, few enough that a step's activations stay in cache.
TOKENS_PER_STEP = 1024
# LM head + NLL: tokens per chunk, and the largest vocabulary slice of one step.
TOKEN_CHUNK = 1024
VOCAB_SLICE = 2048

PIECES = (
    "embed", "norms", "qkv_proj", "rope", "attn_scores", "attn_softmax", "attn_context", "o_proj",
    "mlp_gate_up", "mlp_act", "mlp_down", "head_logits", "head_logsumexp", "head_target",
)


def causal_attention(attn: Attention, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """The heads' outputs (seq, heads * hd) for one normalised sequence x (seq, hidden):
    the same values as ``Attention.context`` up to float rounding."""
    seq = x.shape[0]
    g, hd = attn.num_kv_heads, attn.head_dim
    rep = attn.num_heads // g
    with jax.named_scope("qkv_proj"):
        q = attn.q_proj(x).reshape(seq, attn.num_heads, hd)
        k = attn.k_proj(x).reshape(seq, g, hd)
        v = attn.v_proj(x).reshape(seq, g, hd)
    with jax.named_scope("rope"):
        q = apply_rope(q, cos[:, None], sin[:, None]) / jnp.sqrt(jnp.float32(hd))
        k = apply_rope(k, cos[:, None], sin[:, None])
        # Rows (position, head of the group) per KV head: one product serves the whole group.
        q = q.reshape(seq, g, rep, hd).transpose(1, 0, 2, 3).reshape(g, seq * rep, hd)
        k, v = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
    outs = []
    for start in range(0, seq, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, seq)
        with jax.named_scope("attn_scores"):
            scores = jnp.einsum("gmd,gkd->gmk", q[:, start * rep : stop * rep], k[:, :stop])
        with jax.named_scope("attn_softmax"):
            query_pos = jnp.repeat(jnp.arange(start, stop), rep)
            causal = jnp.arange(stop)[None, :] <= query_pos[:, None]
            probs = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(scores.dtype).min), axis=-1)
        with jax.named_scope("attn_context"):
            outs.append(jnp.einsum("gmk,gkd->gmd", probs, v[:, :stop]))
    with jax.named_scope("attn_context"):
        out = jnp.concatenate(outs, axis=1).reshape(g, seq, rep, hd)
        return out.transpose(1, 0, 2, 3).reshape(seq, attn.num_heads * hd)


def decoder_layer(layer: DecoderLayer, h: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """One pre-norm block on one sequence h (seq, hidden), as ``DecoderLayer.__call__``."""
    with jax.named_scope("norms"):
        x = layer.input_layernorm(h)
    context = causal_attention(layer.self_attn, x, cos, sin)
    with jax.named_scope("o_proj"):
        h = h + layer.self_attn.o_proj(context)
    with jax.named_scope("norms"):
        x = layer.post_attention_layernorm(h)
    mlp = layer.mlp
    with jax.named_scope("mlp_gate_up"):
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    with jax.named_scope("mlp_act"):
        act = jax.nn.silu(gate) * up
    with jax.named_scope("mlp_down"):
        return h + mlp.down_proj(act)


def fold_masks(layer: DecoderLayer) -> DecoderLayer:
    """The layer with each linear's mask multiplied into its weight (computed once per call,
    not once per step of the sequence loop)."""
    linears = list(layer.linears().values())
    nodes = lambda l: [node for lin in l.linears().values() for node in (lin.weight, lin.mask)]
    values = [v for lin in linears for v in (lin.effective_weight, None)]
    return eqx.tree_at(nodes, layer, values, is_leaf=lambda x: x is None)


@eqx.filter_jit
def run_layer(layer: DecoderLayer, h: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """One decoder layer on a batch h (batch, seq, hidden): on CPU a few sequences per step
    (cache locality), elsewhere the whole batch at once."""
    layer = fold_masks(layer)
    one = lambda x: decoder_layer(layer, x, cos, sin)
    per_step = max(1, TOKENS_PER_STEP // h.shape[1])
    if jax.default_backend() != "cpu" or per_step >= h.shape[0]:
        return jax.vmap(one)(h)
    return jax.lax.map(one, h, batch_size=per_step)


@eqx.filter_jit
def embed_and_rope(model: LlamaForCausalLM, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Token embeddings (batch, seq, hidden) and the cos/sin tables of positions 0..seq-1."""
    with jax.named_scope("embed"):
        cos, sin = model.rope(jnp.arange(ids.shape[1]))
        return model.embed(ids), cos, sin


def hidden_states(model: LlamaForCausalLM, ids: jax.Array) -> jax.Array:
    """The last decoder layer's output (batch, seq, hidden) for token ids (batch, seq)."""
    h, cos, sin = embed_and_rope(model, ids)
    for layer in model.model.layers:
        h = run_layer(layer, h, cos, sin)
    return h


def _vocab_slice(vocab: int, limit: int) -> int:
    """The largest divisor of ``vocab`` up to ``limit``; the whole vocabulary when that
    divisor is under a tenth of the limit (a prime vocabulary size, say)."""
    best = max(d for d in range(1, min(vocab, limit) + 1) if vocab % d == 0)
    return best if best * 10 >= min(vocab, limit) else vocab


@eqx.filter_jit
def token_nll(
    model: LlamaForCausalLM,
    h: jax.Array,
    ids: jax.Array,
    token_chunk: int = TOKEN_CHUNK,
    vocab_slice: int = VOCAB_SLICE,
) -> jax.Array:
    """Next-token NLL (batch, seq - 1) from the last hidden states h (batch, seq, hidden):
    entry [b, i] is -log p(ids[b, i + 1] | ids[b, : i + 1]). ``token_chunk`` tokens at a
    time, each walking the vocabulary in slices of at most ``vocab_slice`` rows."""
    b, s, d = h.shape
    with jax.named_scope("norms"):
        x = model.final_hidden(h[:, :-1]).reshape(-1, d)
    targets = ids[:, 1:].reshape(-1)
    n = x.shape[0]
    chunk = min(token_chunk, -(-n // 8) * 8)
    pad = (-n) % chunk
    x = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, d)
    targets = jnp.pad(targets, (0, pad)).reshape(-1, chunk)
    w = model.head_weight()
    bias = None if model.lm_head is None else model.lm_head.bias
    vocab = w.shape[0]
    width = _vocab_slice(vocab, vocab_slice)
    w_slices = w.reshape(vocab // width, width, d)
    b_slices = None if bias is None else bias.reshape(vocab // width, width)

    def chunk_nll(args):
        xc, tc = args

        def vocab_step(carry, ws):
            run_max, run_sum = carry
            w_s, b_s = ws
            with jax.named_scope("head_logits"):
                logits = xc @ w_s.T
                if b_s is not None:
                    logits = logits + b_s
            with jax.named_scope("head_logsumexp"):
                new_max = jnp.maximum(run_max, jnp.max(logits, axis=-1))
                run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.sum(
                    jnp.exp(logits - new_max[:, None]), axis=-1
                )
            return (new_max, run_sum), None

        init = (jnp.full((chunk,), -jnp.inf, x.dtype), jnp.zeros((chunk,), x.dtype))
        (run_max, run_sum), _ = jax.lax.scan(vocab_step, init, (w_slices, b_slices))
        with jax.named_scope("head_target"):
            target_logit = jnp.sum(xc * w[tc], axis=-1)
            if bias is not None:
                target_logit = target_logit + bias[tc]
        return run_max + jnp.log(run_sum) - target_logit

    nll = jax.lax.map(chunk_nll, (x, targets))
    return nll.reshape(-1)[:n].reshape(b, s - 1)


def batch_token_nll(model: LlamaForCausalLM, ids: jax.Array) -> jax.Array:
    """Next-token NLL (batch, seq - 1) of a batch of token ids (batch, seq)."""
    return token_nll(model, hidden_states(model, ids), ids)
