"""One attention layer as a stack of independent per-KV-group problems (leading axis G).

Given the layer's inputs X, each KV group (its W_K slice (hd, hidden) and its n_rep query
heads' W_Q slices) is an independent problem: the layer's linears are split into a stack of
per-group ``Attention`` modules (leading axis G = num_kv_heads, ``num_heads = n_rep``,
``num_kv_heads = 1``), so one group's solver runs on all groups at once under ``jax.vmap``.
Two splits: :func:`split_groups` keeps q/k only (the attention matrix softmax(QK^T) does not
see v and o), :func:`split_attention_groups` all four, where group g holds its n_rep*hd
*columns* of o_proj (its slice of the output projection), so

    out_g(X) = o_g(softmax(q_g k_g^T) v_g)        and    attn(X) = sum_g out_g(X) + b_o.

Masks are leaves of these modules: ``eqx.partition`` with a filter spec selects them as the
parameters of a descent, everything else is held fixed.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp

from nlprune.modeling.llama import Attention, Linear
from nlprune.sparsity import SparsityPattern, mask_from_scores

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------------------------
# q/k only (the attention matrix)
# --------------------------------------------------------------------------------------------


def split_groups(attn: Attention) -> Attention:
    """The layer's q/k as a stack of per-KV-group ``Attention`` modules with all-ones masks.

    Every array leaf gets a leading group axis G = num_kv_heads: q_proj (G, n_rep*hd, hidden),
    k_proj (G, hd, hidden) (rows of HF's weights: query head h belongs to group h // n_rep).
    v/o are dropped (None): the softmax does not see them. Existing masks are folded in, so
    the dense reference is what the layer computes now.
    """
    g, hd = attn.num_kv_heads, attn.head_dim
    rep = attn.num_heads // g

    def stack(lin: Linear, rows: int) -> Linear:
        w = lin.effective_weight.reshape(g, rows, -1)
        b = None if lin.bias is None else lin.bias.reshape(g, rows)
        return Linear(w, b, jnp.ones_like(w))

    return Attention(
        q_proj=stack(attn.q_proj, rep * hd),
        k_proj=stack(attn.k_proj, hd),
        v_proj=None,
        o_proj=None,
        num_heads=rep,
        num_kv_heads=1,
        head_dim=hd,
    )


def qk_mask_spec(groups: Attention) -> Attention:
    """Filter spec for ``eqx.partition``: True exactly at the q_proj and k_proj mask leaves."""
    spec = jax.tree.map(lambda _: False, groups)
    return eqx.tree_at(lambda a: (a.q_proj.mask, a.k_proj.mask), spec, (True, True))


def partition_masks(groups: Attention) -> tuple[Attention, Attention]:
    """(masks, rest): the mask leaves (the GD parameters) and everything else."""
    return eqx.partition(groups, qk_mask_spec(groups))


def with_qk_masks(groups: Attention, mask_q: jax.Array, mask_k: jax.Array) -> Attention:
    """``groups`` with the given masks, in full-weight shapes (H*hd, hidden), (KV*hd, hidden)."""
    g = groups.q_proj.weight.shape[0]
    return eqx.tree_at(
        lambda a: (a.q_proj.mask, a.k_proj.mask),
        groups,
        (mask_q.reshape(g, -1, mask_q.shape[-1]), mask_k.reshape(g, -1, mask_k.shape[-1])),
    )


def full_masks(masks: Attention) -> tuple[jax.Array, jax.Array]:
    """Stacked per-group masks back in the shapes of q_proj.weight and k_proj.weight."""
    mq, mk = masks.q_proj.mask, masks.k_proj.mask
    return mq.reshape(-1, mq.shape[-1]), mk.reshape(-1, mk.shape[-1])


def ones_like_masks(masks: Attention) -> Attention:
    return jax.tree.map(jnp.ones_like, masks)


def group_probs(group: Attention, X: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """One group's causal attention (windows, n_rep, seq, seq), by the model's own code."""
    return jax.vmap(lambda x: group.attention_probs(*group.project_qk(x, cos, sin)))(X)


@eqx.filter_jit
def stacked_probs(groups: Attention, X: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Every group's attention: (G, windows, n_rep, seq, seq)."""
    return jax.vmap(group_probs, in_axes=(0, None, None, None))(groups, X, cos, sin)


# --------------------------------------------------------------------------------------------
# q, k, v and o's column slice (the attention output)
# --------------------------------------------------------------------------------------------


def _o_slices(w: jax.Array, g: int) -> jax.Array:
    """o_proj (hidden, H*hd) -> (G, hidden, rep*hd): group g's columns."""
    return w.reshape(w.shape[0], g, -1).transpose(1, 0, 2)


def _o_full(w: jax.Array) -> jax.Array:
    """(G, hidden, rep*hd) -> (hidden, H*hd)."""
    return w.transpose(1, 0, 2).reshape(w.shape[1], -1)


def to_groups(name: str, a: jax.Array, g: int) -> jax.Array:
    """A full-shape array of linear ``name`` (weight, mask or scores) in per-group shape."""
    return _o_slices(a, g) if name == "o_proj" else a.reshape(g, -1, a.shape[-1])


def from_groups(name: str, a: jax.Array) -> jax.Array:
    """Per-group shape back to the linear's full shape."""
    return _o_full(a) if name == "o_proj" else a.reshape(-1, a.shape[-1])


def split_attention_groups(attn: Attention, masks: dict[str, jax.Array] | None = None) -> Attention:
    """All four attention linears as a stack of per-KV-group modules (leading axis G).

    Weights are the current effective weights (existing masks folded in, so the dense
    reference is what the layer computes now); masks are ``masks[name]`` (full shapes) or all
    ones. o_proj's bias is dropped: it is added once to the whole layer's output, the same in
    the pruned and the dense attention, so it cancels in every error.
    """
    g, hd = attn.num_kv_heads, attn.head_dim
    masks = masks or {}

    def stack(name: str, lin: Linear) -> Linear:
        w = to_groups(name, lin.effective_weight, g)
        m = masks.get(name)
        m = jnp.ones_like(w) if m is None else to_groups(name, jnp.asarray(m, w.dtype), g)
        b = None if (lin.bias is None or name == "o_proj") else lin.bias.reshape(g, -1)
        return Linear(w, b, m)

    return Attention(
        q_proj=stack("q_proj", attn.q_proj), k_proj=stack("k_proj", attn.k_proj),
        v_proj=stack("v_proj", attn.v_proj), o_proj=stack("o_proj", attn.o_proj),
        num_heads=attn.num_heads // g, num_kv_heads=1, head_dim=hd,
    )


def leaf_spec(groups: Attention, names, leaf: str) -> Attention:
    """Filter spec: True at the ``leaf`` ("mask" or "weight") of each linear in ``names``."""
    spec = jax.tree.map(lambda _: False, groups)
    return eqx.tree_at(
        lambda a: tuple(getattr(getattr(a, n), leaf) for n in names), spec, tuple(True for _ in names)
    )


def group_outputs(group: Attention, X, cos, sin) -> jax.Array:
    """One group's attention output (windows, seq, hidden), o_proj bias excluded."""
    return jax.vmap(lambda x: group(x, cos, sin))(X)


def response(objective: str):
    return group_outputs if objective == "output" else group_probs


@functools.partial(jax.jit, static_argnames=("objective",))
def stacked_response(groups: Attention, X, cos, sin, objective: str) -> jax.Array:
    """Every group's output (G, windows, seq, hidden) or probabilities (G, windows, rep, seq, seq)."""
    return jax.vmap(response(objective), in_axes=(0, None, None, None))(groups, X, cos, sin)


# --------------------------------------------------------------------------------------------
# Helpers of the descents: straight-through masks, window chunks, pytree arithmetic
# --------------------------------------------------------------------------------------------


def straight_through(scores: jax.Array, pattern: SparsityPattern) -> jax.Array:
    """The binary top-k-per-row mask of ``scores`` in the forward pass, the identity in the
    backward pass (a straight-through estimator)."""
    binary = mask_from_scores(scores, pattern, "row").astype(scores.dtype)
    return binary + (scores - jax.lax.stop_gradient(scores))  # exactly binary in the forward


def window_chunks(X, target, chunk: int | None):
    """Windows (and targets) reshaped to (n_chunks, chunk, ...) for a scan."""
    Xc = X.reshape(-1, chunk, *X.shape[1:])
    Tc = None if target is None else target.reshape(-1, chunk, *target.shape[1:])
    return Xc, Tc


def sq_norm(tree) -> jax.Array:
    return sum(jnp.sum(m * m) for m in jax.tree.leaves(tree))


def tree_index(tree, i: int):
    return jax.tree.map(lambda a: a[i], tree)
