"""The sequential layer-by-layer pruning pipeline (as SparseGPT and Wanda run it).

For each decoder layer, in order:
  1. run the calibration windows through it (batch by batch) to collect the statistics of
     each group of linears that share an input: q/k/v, o, gate/up, down;
  2. prune its 7 linears with the chosen method (shared inputs pruned together, so a
     method can share work such as SparseGPT's inverse Hessian);
  3. recompute the layer's outputs with the pruned weights: the next layer is calibrated
     on what the pruned model really feeds it.

Only the hidden states of the calibration windows (nsamples x seqlen x hidden) and one
batch of a layer's intermediate activations are held at once.

On a device mesh (``mesh=``, see :mod:`nlprune.parallel`) the same code runs with its arrays
placed: hidden states by windows over 'data', each layer's weights by rows over 'model'; the
jitted steps are partitioned by XLA (the statistics' sums over tokens become all-reduces).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from nlprune import parallel
from nlprune.modeling.forward import (
    after_attention,
    after_mlp,
    attn_context,
    attn_input,
    embed,
    layer_inputs,
    mlp_hidden,
    mlp_input,
    rope_tables,
    run_layer,
)
from nlprune.modeling.llama import DecoderLayer, LlamaForCausalLM
from nlprune.prune.base import LayerStats, PruningMethod, get_method
from nlprune.prune.patterns import SparsityPattern

# Linears that read the same input, pruned together (the keys of DecoderLayer.linear_inputs).
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_SUBMODULE = {n: ("self_attn" if g in ("qkv", "o") else "mlp") for g, ns in INPUT_GROUPS.items() for n in ns}


def _chunks(arrays: tuple[jax.Array, ...], batch_size: int):
    """The forward batches of windows, as tuples of slices of ``arrays`` (windows first).

    One device: ``batch_size`` consecutive windows at a time. Windows sharded over 'data' in D
    contiguous blocks: each batch takes up to ``batch_size`` windows from every block (so each
    device works on its own windows and nothing moves between devices)."""
    n = arrays[0].shape[0]
    d = parallel.window_shards(n)
    if d == 1:
        for i in range(0, n, batch_size):
            yield tuple(a[i : i + batch_size] for a in arrays)
        return
    per = n // d
    if per <= batch_size:
        yield tuple(arrays)
        return
    views = [a.reshape(d, per, *a.shape[1:]) for a in arrays]
    for i in range(0, per, batch_size):
        yield tuple(parallel.shard_windows(v[:, i : i + batch_size].reshape(-1, *v.shape[2:])) for v in views)


def _unchunk(outputs: list[jax.Array], n: int) -> jax.Array:
    """Reassemble the per-batch outputs of :func:`_chunks` in window order."""
    d = parallel.window_shards(n)
    if d == 1:
        return jnp.concatenate(outputs)
    if len(outputs) == 1:
        return parallel.shard_windows(outputs[0])
    blocks = [o.reshape(d, -1, *o.shape[1:]) for o in outputs]
    return parallel.shard_windows(jnp.concatenate(blocks, axis=1).reshape(n, *outputs[0].shape[1:]))


def collect_stats(
    layer: DecoderLayer, hidden: jax.Array, cos, sin, batch_size: int, with_hessian: bool
) -> dict[str, LayerStats]:
    """Calibration statistics of each input group, accumulated batch by batch."""
    stats: dict[str, LayerStats] = {}
    for (h,) in _chunks((hidden,), batch_size):
        inputs = layer_inputs(layer, h, cos, sin)
        for group, x in inputs.items():
            part = LayerStats.from_inputs(x, with_hessian=with_hessian)
            stats[group] = part if group not in stats else stats[group].merge(part)
    return stats


def propagate(layer: DecoderLayer, hidden: jax.Array, cos, sin, batch_size: int) -> jax.Array:
    """The layer's outputs for all calibration windows."""
    return _batched(lambda h: run_layer(layer, h, cos, sin), batch_size, hidden)


def set_linears(layer: DecoderLayer, updates: dict[str, tuple[jax.Array, jax.Array]]) -> DecoderLayer:
    """Replace (weight, mask) of the named linears; masks are stored as float leaves."""
    names = list(updates)

    def nodes(l):
        lins = l.linears()
        return [node for n in names for node in (lins[n].weight, lins[n].mask)]

    values = [v for n in names for v in (updates[n][0], updates[n][1].astype(updates[n][0].dtype))]
    return eqx.tree_at(nodes, layer, values, is_leaf=lambda x: x is None)


def _prune_many(method: PruningMethod, weights, stats: LayerStats, pattern: SparsityPattern, options):
    """``method.prune_many`` with the weights' rows over the mesh's 'model' axis (if any) when
    each row's mask is chosen on its own (per-row ranking, N:M). A ranking over whole blocks
    of rows (SparseGPT unstructured) would gather every block's scores across devices inside
    its column loop (measured 250x slower on a 4-device CPU mesh): those weights are replicated."""
    if pattern.is_nm or method.comparison_group(pattern, **options)[0] == "row":
        return method.prune_many([parallel.shard_rows(w) for w in weights], stats, pattern, **options)
    if parallel.axis_sizes(parallel.current_mesh())[parallel.MODEL] > 1:
        parallel.note(f"{method.name} {pattern.name} ranks whole blocks of rows together: its weights are "
                      "pruned replicated, not over 'model'")
    return method.prune_many([parallel.replicate(w) for w in weights], stats, pattern, **options)


def needs_hessian(method: PruningMethod, options: dict[str, Any]) -> bool:
    """Whether the statistics need X^T X; a method whose answer depends on its options (the
    non-linear method's linear fill-in) says so with ``needs_hessian_for(options)``."""
    hook = getattr(method, "needs_hessian_for", None)
    return bool(hook(options)) if hook is not None else method.needs_hessian


def prune_qkv(
    layer: DecoderLayer,
    stats: LayerStats,
    method: PruningMethod,
    pattern: SparsityPattern,
    options: dict[str, Any],
    attn_inputs: jax.Array | None = None,
    cos: jax.Array | None = None,
    sin: jax.Array | None = None,
) -> DecoderLayer:
    """Prune q/k/v. A method with a ``prune_qk(layer, inputs, cos, sin, pattern, **options)``
    hook (the non-linear method) gets the raw attention inputs of all calibration windows
    (windows, seq, hidden) for q/k, and prunes v from the statistics as usual."""
    names = INPUT_GROUPS["qkv"]
    lins = layer.linears()
    hook = getattr(method, "prune_qk", None)
    if hook is None:
        results = _prune_many(method, [lins[n].weight for n in names], stats, pattern, options)
        updates = {n: (r.weight, r.mask) for n, r in zip(names, results, strict=True)}
    else:
        if attn_inputs is None:
            raise ValueError(f"method {method.name!r} prunes q/k from the layer inputs: pass attn_inputs, cos, sin")
        updates = {n: (r.weight, r.mask) for n, r in hook(layer, attn_inputs, cos, sin, pattern, **options).items()}
        if "v_proj" not in updates:  # the hook may prune v (and o) too: nonlinear --objective output
            (v,) = _prune_many(method, [lins["v_proj"].weight], stats, pattern, options)
            updates["v_proj"] = (v.weight, v.mask)
    return set_linears(layer, updates)


def _group_hook(method, group, layer, dense_layer, stats, pattern, options, hidden=None, cos=None, sin=None,
                batch_size=8):
    """A method's own pruning of one later group (``prune_group``: the non-linear method's o_proj,
    whose mask its q/k hook may have chosen), or None: prune the group with ``prune_many``.
    ``dense_layer`` is the layer before any pruning; ``hidden`` its calibration inputs."""
    hook = getattr(method, "prune_group", None)
    if hook is None:
        return None
    return hook(group, layer, dense_layer, stats, pattern, hidden, cos, sin, batch_size, **options)


def prune_layer(
    layer: DecoderLayer,
    stats: dict[str, LayerStats],
    method: PruningMethod,
    pattern: SparsityPattern,
    options: dict[str, Any],
    attn_inputs: jax.Array | None = None,
    cos: jax.Array | None = None,
    sin: jax.Array | None = None,
) -> DecoderLayer:
    """Prune all linears of one layer from its statistics (``attn_inputs``, ``cos``, ``sin``:
    see :func:`prune_qkv`)."""
    dense = layer
    layer = prune_qkv(layer, stats["qkv"], method, pattern, options, attn_inputs, cos, sin)
    lins = layer.linears()
    updates = {}
    for group, names in INPUT_GROUPS.items():
        if group == "qkv":
            continue
        results = _group_hook(method, group, layer, dense, stats[group], pattern, options)
        if results is None:
            results = _prune_many(method, [lins[n].weight for n in names], stats[group], pattern, options)
        updates.update({n: (r.weight, r.mask) for n, r in zip(names, results, strict=True)})
    return set_linears(layer, updates)


def _batched(fn, batch_size: int, *arrays):
    """Apply a jitted batch function over the leading axis in chunks; concatenate results."""
    return _unchunk([fn(*chunk) for chunk in _chunks(arrays, batch_size)], arrays[0].shape[0])


def _group_stats(xs: jax.Array, batch_size: int, with_hessian: bool) -> LayerStats:
    return LayerStats.from_chunks((x for (x,) in _chunks((xs,), batch_size)), with_hessian=with_hessian)


def prune_layer_true_sequential(
    layer: DecoderLayer,
    hidden: jax.Array,
    cos,
    sin,
    method: PruningMethod,
    pattern: SparsityPattern,
    options: dict[str, Any],
    batch_size: int,
) -> tuple[DecoderLayer, jax.Array]:
    """Prune q/k/v, then o, then gate/up, then down, each calibrated on the outputs of the
    already-pruned sublayers before it; returns the pruned layer and its outputs.

    One forward pass per layer (the layer-at-once order needs two: a dense one for the
    statistics and a pruned one for the outputs)."""
    hess = needs_hessian(method, options)
    dense, layer_in = layer, hidden

    def prune_group(layer, group, stats):
        names = INPUT_GROUPS[group]
        lins = layer.linears()
        results = _group_hook(method, group, layer, dense, stats, pattern, options, layer_in, cos, sin, batch_size)
        if results is None:
            results = _prune_many(method, [lins[n].weight for n in names], stats, pattern, options)
        return set_linears(layer, {n: (r.weight, r.mask) for n, r in zip(names, results, strict=True)})

    attn_in = _batched(lambda h: attn_input(layer, h), batch_size, hidden)
    layer = prune_qkv(layer, _group_stats(attn_in, batch_size, hess), method, pattern, options, attn_in, cos, sin)
    del attn_in
    context = _batched(lambda h: attn_context(layer, h, cos, sin), batch_size, hidden)
    layer = prune_group(layer, "o", _group_stats(context, batch_size, hess))
    hidden = _batched(lambda h, c: after_attention(layer, h, c), batch_size, hidden, context)
    del context
    layer = prune_group(layer, "gate_up", _group_stats(_batched(lambda h: mlp_input(layer, h), batch_size, hidden), batch_size, hess))
    act = _batched(lambda h: mlp_hidden(layer, h), batch_size, hidden)
    layer = prune_group(layer, "down", _group_stats(act, batch_size, hess))
    return layer, _batched(lambda h, a: after_mlp(layer, h, a), batch_size, hidden, act)


@dataclasses.dataclass
class PruneReport:
    method: str
    pattern: str
    ratio: float
    true_sequential: bool
    prune_seconds: float  # pruning only: no model load, evaluation or checkpoint writes
    checkpoint_seconds: float
    layer_seconds: list[float]
    sparsity: dict[str, float]  # per linear, HF names
    overall_sparsity: float  # over all prunable linears
    mesh: dict[str, Any] | None = None  # parallel.describe: axes, devices, fallbacks taken

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measured_sparsity(model: LlamaForCausalLM) -> tuple[dict[str, float], float]:
    """Fraction of exact zeros in each prunable linear's effective weight, and overall."""
    per, zeros, total = {}, 0, 0
    for i, layer in enumerate(model.model.layers):
        for name, lin in layer.linears().items():
            w = parallel.to_host(lin.effective_weight)
            z = int(w.size - np.count_nonzero(w))
            per[f"model.layers.{i}.{_SUBMODULE[name]}.{name}"] = z / w.size
            zeros, total = zeros + z, total + w.size
    return per, zeros / total


def prune_model(
    model: LlamaForCausalLM,
    calibration: np.ndarray,
    method: str | PruningMethod,
    pattern: SparsityPattern,
    options: dict[str, Any] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    start_layer: int = 0,
    hidden: jax.Array | None = None,
    on_layer_done: Callable[[int, LlamaForCausalLM, jax.Array], None] | None = None,
    true_sequential: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[LlamaForCausalLM, PruneReport]:
    """Prune every decoder layer of ``model`` in order on calibration windows (n, seqlen).

    ``start_layer`` with ``hidden`` (the inputs of that layer) resumes a run;
    ``on_layer_done(i, model, outputs_of_layer_i)`` is called after each layer (checkpoints);
    its time is not counted in ``prune_seconds``.
    ``true_sequential`` calibrates each sublayer on the pruned sublayers before it (one
    forward per layer); False collects every sublayer's statistics from the dense layer
    first, as Wanda's reference code does (two forwards per layer).
    ``mesh``: run on a device mesh (``nlprune.parallel.parse_mesh``); None or one device is
    the one-device path.
    """
    with parallel.use_mesh(mesh):
        return _prune_model(
            model, calibration, method, pattern, options, batch_size, progress, start_layer, hidden,
            on_layer_done, true_sequential,
        )


def _prune_model(
    model, calibration, method, pattern, options, batch_size, progress, start_layer, hidden, on_layer_done,
    true_sequential,
) -> tuple[LlamaForCausalLM, PruneReport]:
    method = get_method(method) if isinstance(method, str) else method
    options = method.resolve_options(**(options or {}))
    calibration = jnp.asarray(calibration, jnp.int32)
    cos, sin = parallel.replicate(rope_tables(model, calibration.shape[1]))
    start = time.perf_counter()
    if hidden is None:
        hidden = embed(model, calibration)
    hidden = parallel.shard_windows(hidden)
    layers = list(model.model.layers)
    seconds, checkpoint_seconds = [], 0.0
    bar = tqdm(range(start_layer, len(layers)), desc=f"{method.name} {pattern.name}", unit="layer", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        layers[i] = parallel.place_layer(layers[i])
        if true_sequential:
            bar.set_postfix_str(f"layer {i}: sublayers in order")
            layers[i], hidden = prune_layer_true_sequential(
                layers[i], hidden, cos, sin, method, pattern, options, batch_size
            )
        else:
            bar.set_postfix_str(f"layer {i}: statistics")
            stats = collect_stats(layers[i], hidden, cos, sin, batch_size, needs_hessian(method, options))
            bar.set_postfix_str(f"layer {i}: pruning")
            attn_in = None
            if hasattr(method, "prune_qk"):  # q/k see the raw inputs (the dense layer's: q/k/v come first)
                attn_in = _batched(lambda h: attn_input(layers[i], h), batch_size, hidden)
            layers[i] = prune_layer(layers[i], stats, method, pattern, options, attn_in, cos, sin)
            del attn_in
            bar.set_postfix_str(f"layer {i}: outputs")
            hidden = propagate(layers[i], hidden, cos, sin, batch_size)
        hidden.block_until_ready()
        seconds.append(time.perf_counter() - t0)
        if on_layer_done is not None:
            bar.set_postfix_str(f"layer {i}: checkpoint")
            t1 = time.perf_counter()
            on_layer_done(i, eqx.tree_at(lambda m: m.model.layers, model, layers), hidden)
            checkpoint_seconds += time.perf_counter() - t1
    model = eqx.tree_at(lambda m: m.model.layers, model, layers)
    elapsed = time.perf_counter() - start - checkpoint_seconds
    per, overall = measured_sparsity(model)
    mesh = parallel.current_mesh()
    report = PruneReport(
        method.name, pattern.name, pattern.ratio, true_sequential, elapsed, checkpoint_seconds, seconds, per, overall,
        None if mesh is None else parallel.describe(mesh),
    )
    return model, report
