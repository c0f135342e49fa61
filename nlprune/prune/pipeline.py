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
from collections.abc import Callable, Mapping
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
    rope_tables_of,
    run_layer,
)
from nlprune.modeling.llama import DecoderLayer, LlamaConfig, LlamaForCausalLM
from nlprune.modeling.masks import set_linears
from nlprune.modeling.precision import cast_layer, in_float32, layer_dtype
from nlprune.prune.base import INPUT_GROUPS, GroupContext, PruneResult, PruningMethod
from nlprune.prune.refit import refit_group
from nlprune.prune.stats import LayerStats
from nlprune.sparsity import LINEAR_SUBMODULES, SparsityPattern, SparsityProfile, linear_name

# A layer's pattern: one for every linear, or each linear's own (short names, e.g. q_proj).
LayerPatterns = SparsityPattern | Mapping[str, SparsityPattern]

SUBMODULE = {n: ("self_attn" if g in ("qkv", "o") else "mlp") for g, ns in INPUT_GROUPS.items() for n in ns}


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
    return batched(lambda h: run_layer(layer, h, cos, sin), batch_size, hidden)


def batched(fn, batch_size: int, *arrays):
    """Apply a jitted batch function over the leading axis in chunks; concatenate results.

    Every forward pass of the pipeline over the calibration windows goes through here (looked up
    at call time, so a profiler may wrap it: benchmarks/profile/profile_prune.py)."""
    return _unchunk([fn(*chunk) for chunk in _chunks(arrays, batch_size)], arrays[0].shape[0])


_batched = batched  # the name before it was public


def _group_stats(xs: jax.Array, batch_size: int, with_hessian: bool) -> LayerStats:
    return LayerStats.from_chunks((x for (x,) in _chunks((xs,), batch_size)), with_hessian=with_hessian)


def group_inputs(layer: DecoderLayer, hidden: jax.Array, cos, sin, group: str, batch_size: int) -> jax.Array:
    """The inputs of one group of ``layer``'s linears for all calibration windows."""
    if group == "qkv":
        return batched(lambda h: attn_input(layer, h), batch_size, hidden)
    if group == "o":
        return batched(lambda h: attn_context(layer, h, cos, sin), batch_size, hidden)
    mid = batched(lambda h: after_attention(layer, h, attn_context(layer, h, cos, sin)), batch_size, hidden)
    if group == "gate_up":
        return batched(lambda h: mlp_input(layer, h), batch_size, mid)
    return batched(lambda h: mlp_hidden(layer, h), batch_size, mid)


def patterns_by_linear(pattern: LayerPatterns) -> dict[str, SparsityPattern]:
    """Each prunable linear's pattern (short names): ``pattern`` for all, or as mapped."""
    if isinstance(pattern, SparsityPattern):
        return dict.fromkeys(LINEAR_SUBMODULES, pattern)
    return dict(pattern)


def placed_weights(method: PruningMethod, pattern: SparsityPattern, weights) -> tuple[jax.Array, ...]:
    """The weights of a group placed for pruning: rows over the mesh's 'model' axis (if any)
    when each row's mask is chosen on its own (per-row ranking, N:M). A ranking over whole
    blocks of rows (SparseGPT unstructured) would gather every block's scores across devices
    inside its column loop: those weights are replicated (BENCHMARKS.md has the cost)."""
    if method.shards_rows(pattern):
        return tuple(parallel.shard_rows(w) for w in weights)
    if parallel.axis_sizes(parallel.current_mesh())[parallel.MODEL] > 1:
        parallel.note(f"{method.name} {pattern.name} ranks whole blocks of rows together: its weights are "
                      "pruned replicated, not over 'model'")
    return tuple(parallel.replicate(w) for w in weights)


def prune_group(
    method: PruningMethod, group: str, layer: DecoderLayer, dense: DecoderLayer, stats: LayerStats,
    pattern: LayerPatterns, hidden: jax.Array, cos, sin, batch_size: int, sequential: bool,
    inputs: jax.Array | None,
) -> DecoderLayer:
    """The one dispatch path: build the group's context, let the method prune it, put the
    results into the layer. ``hidden`` is the layer's calibration inputs.

    When the group's linears have different patterns (a per-linear profile), the method prunes
    the group once per pattern, in a context carrying that pattern, and each linear is taken
    from the pass at its own pattern."""
    lins = layer.linears()
    names = INPUT_GROUPS[group]
    patterns = patterns_by_linear(pattern)
    results: dict[str, PruneResult] = {}
    extras: set[str] = set()
    for each in dict.fromkeys(patterns[n] for n in names):  # every distinct pattern once, in order
        ctx = GroupContext(
            group=group, layer=layer, dense_layer=dense,
            weights=placed_weights(method, each, [lins[n].weight for n in names]),
            stats=stats, pattern=each, hidden=hidden, cos=cos, sin=sin, batch_size=batch_size,
            sequential=sequential, inputs=inputs,
        )
        out: dict[str, PruneResult] = method.prune_group(ctx)
        missing = [n for n in names if n not in out]
        if missing:
            raise RuntimeError(f"method {method.name!r} returned no result for {missing} of group {group!r}")
        # a method may also set linears outside the group (the output objective: o_proj's mask
        # is chosen with q/k/v); each is taken from the pass at its own pattern
        results.update({n: r for n, r in out.items() if patterns.get(n, each) == each})
        extras.update(n for n in out if n not in names)
    unset = sorted(extras - results.keys())
    if unset:
        raise ValueError(f"method {method.name!r} chooses {unset} together with {list(names)}: give them the same ratio.")
    results = {n: results[n] for n in (*names, *sorted(extras))}
    if method.options.refit:
        damping = method.options.refit_percdamp
        results = refit_group(ctx, results, cg_iters=method.options.refit_cg, percdamp=damping,
                              blocksize=method.refit_blocksize(), skip=method.refits_itself(group),
                              fitted=method.kept_weights_damping == damping)
    return set_linears(layer, {n: (r.weight, r.mask) for n, r in results.items()})


def prune_layer(
    layer: DecoderLayer, hidden: jax.Array, cos, sin, method: PruningMethod, pattern: LayerPatterns,
    batch_size: int,
) -> tuple[DecoderLayer, jax.Array]:
    """Wanda's reference order: every group's statistics from the dense layer first, then
    prune the groups, then the pruned layer's outputs (two forward passes per layer)."""
    stats = collect_stats(layer, hidden, cos, sin, batch_size, method.needs_hessian)
    dense = layer
    for group in INPUT_GROUPS:
        inputs = group_inputs(dense, hidden, cos, sin, group, batch_size) if method.needs_inputs(group) else None
        layer = prune_group(method, group, layer, dense, stats[group], pattern, hidden, cos, sin, batch_size,
                            False, inputs)
        del inputs
    return layer, propagate(layer, hidden, cos, sin, batch_size)


def prune_layer_true_sequential(
    layer: DecoderLayer, hidden: jax.Array, cos, sin, method: PruningMethod, pattern: LayerPatterns,
    batch_size: int,
) -> tuple[DecoderLayer, jax.Array]:
    """Prune q/k/v, then o, then gate/up, then down, each calibrated on the outputs of the
    already-pruned sublayers before it; returns the pruned layer and its outputs.

    One forward pass per layer (the layer-at-once order needs two: a dense one for the
    statistics and a pruned one for the outputs)."""
    hess = method.needs_hessian
    # the layer before pruning, for methods that read it: without it each pruned linear's
    # dense weights are freed as soon as they are replaced
    dense, layer_in = (layer if method.needs_dense_layer else None), hidden

    def prune(layer, group, inputs):
        stats = _group_stats(inputs, batch_size, hess)
        return prune_group(method, group, layer, dense, stats, pattern, layer_in, cos, sin, batch_size, True, inputs)

    attn_in = batched(lambda h: attn_input(layer, h), batch_size, hidden)
    layer = prune(layer, "qkv", attn_in)
    del attn_in
    context = batched(lambda h: attn_context(layer, h, cos, sin), batch_size, hidden)
    layer = prune(layer, "o", context)
    hidden = batched(lambda h, c: after_attention(layer, h, c), batch_size, hidden, context)
    del context
    layer = prune(layer, "gate_up", batched(lambda h: mlp_input(layer, h), batch_size, hidden))
    act = batched(lambda h: mlp_hidden(layer, h), batch_size, hidden)
    layer = prune(layer, "down", act)
    return layer, batched(lambda h, a: after_mlp(layer, h, a), batch_size, hidden, act)


@dataclasses.dataclass
class PruneReport:
    method: str
    pattern: str
    ratio: float
    true_sequential: bool
    prune_seconds: float  # pruning only: no model load, layer reads, evaluation or checkpoint writes
    checkpoint_seconds: float
    layer_seconds: list[float]
    sparsity: dict[str, float]  # per linear, HF names
    overall_sparsity: float  # over all prunable linears
    layer_sparsity: list[float] = dataclasses.field(default_factory=list)  # per decoder layer
    mesh: dict[str, Any] | None = None  # parallel.describe: axes, devices, fallbacks taken
    read_seconds: float = 0.0  # reading layers from disk (streamed runs)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def layer_zeros(index: int, layer: DecoderLayer) -> dict[str, tuple[int, int]]:
    """(exact zeros, size) of each prunable linear's effective weight, HF names."""
    out = {}
    for name, lin in layer.linears().items():
        w = parallel.to_host(lin.effective_weight)
        out[linear_name(index, name)] = (int(w.size - np.count_nonzero(w)), int(w.size))
    return out


def sparsity_of(zeros: list[dict[str, tuple[int, int]]]) -> tuple[dict[str, float], float, list[float]]:
    """Per linear, overall and per layer sparsity from :func:`layer_zeros` of every layer."""
    per = {name: z / n for layer in zeros for name, (z, n) in layer.items()}
    sums = [(sum(z for z, _ in layer.values()), sum(n for _, n in layer.values())) for layer in zeros]
    return per, sum(z for z, _ in sums) / sum(n for _, n in sums), [z / n for z, n in sums]


def measured_sparsity(model: LlamaForCausalLM) -> tuple[dict[str, float], float]:
    """Fraction of exact zeros in each prunable linear's effective weight, and overall."""
    per, overall, _ = measured_sparsity_by_layer(model)
    return per, overall


def measured_sparsity_by_layer(model: LlamaForCausalLM) -> tuple[dict[str, float], float, list[float]]:
    """Fraction of exact zeros per prunable linear, overall, and per decoder layer."""
    return sparsity_of([layer_zeros(i, layer) for i, layer in enumerate(model.model.layers)])


def _check_method(method: PruningMethod) -> None:
    if not isinstance(method, PruningMethod):
        raise TypeError(f"prune_model takes a configured method (nlprune.methods.get_method), not {method!r}")


def _profile(pattern: SparsityPattern | SparsityProfile, num_layers: int) -> SparsityProfile:
    if isinstance(pattern, SparsityPattern):
        return SparsityProfile.uniform(pattern, num_layers)
    if pattern.num_layers != num_layers:
        raise ValueError(f"the sparsity profile is for {pattern.num_layers} layers, the model has {num_layers}.")
    return pattern


def prune_model(
    model: LlamaForCausalLM,
    calibration: np.ndarray,
    method: PruningMethod,
    pattern: SparsityPattern | SparsityProfile,
    batch_size: int = 8,
    progress: bool = True,
    start_layer: int = 0,
    hidden: jax.Array | None = None,
    on_layer_done: Callable[[int, DecoderLayer, jax.Array], None] | None = None,
    true_sequential: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[LlamaForCausalLM, PruneReport]:
    """Prune every decoder layer of ``model`` in order on calibration windows (n, seqlen).

    ``method`` is a configured method (``nlprune.methods.get_method(name, **options)``);
    ``pattern`` the sparsity of every linear, or a :class:`~nlprune.sparsity.SparsityProfile`
    giving each layer (or linear) its own.
    ``start_layer`` with ``hidden`` (the inputs of that layer) resumes a run;
    ``on_layer_done(i, pruned_layer_i, outputs_of_layer_i)`` is called after each layer
    (checkpoints); its time is not counted in ``prune_seconds``.
    ``true_sequential`` calibrates each sublayer on the pruned sublayers before it (one
    forward per layer); False collects every sublayer's statistics from the dense layer
    first, as Wanda's reference code does (two forwards per layer).
    ``mesh``: run on a device mesh (``nlprune.parallel.parse_mesh``); None or one device is
    the one-device path.
    """
    _check_method(method)
    layers = list(model.model.layers)
    profile = _profile(pattern, len(layers))

    def keep(i, layer, outputs):
        layers[i] = layer
        if on_layer_done is not None:
            on_layer_done(i, layer, outputs)

    with parallel.use_mesh(mesh):
        if hidden is None:
            hidden = embed(model, jnp.asarray(calibration, jnp.int32))
        report = prune_layers(
            model.config, layers.__getitem__, hidden, method, profile, batch_size, progress, start_layer, keep,
            true_sequential, [layer_zeros(i, layers[i]) for i in range(start_layer)],
        )
    return eqx.tree_at(lambda m: m.model.layers, model, layers), report


def prune_streamed(
    config: LlamaConfig,
    read_layer: Callable[[int], DecoderLayer],
    hidden: jax.Array,
    method: PruningMethod,
    pattern: SparsityPattern | SparsityProfile,
    on_layer_done: Callable[[int, DecoderLayer, jax.Array], None],
    batch_size: int = 8,
    progress: bool = True,
    start_layer: int = 0,
    true_sequential: bool = True,
    earlier_zeros: list[dict[str, tuple[int, int]]] | None = None,
) -> PruneReport:
    """:func:`prune_model` holding one decoder layer at a time: layer i comes from
    ``read_layer(i)`` (from disk), ``hidden`` are layer ``start_layer``'s calibration inputs
    (the embedded windows at 0), and each pruned layer goes to ``on_layer_done`` and is then
    dropped. ``earlier_zeros``: :func:`layer_zeros` of the layers before ``start_layer``."""
    _check_method(method)
    profile = _profile(pattern, config.num_hidden_layers)
    return prune_layers(config, read_layer, hidden, method, profile, batch_size, progress, start_layer,
                        on_layer_done, true_sequential, list(earlier_zeros or []))


def prune_layers(
    config, read_layer, hidden, method, profile, batch_size, progress, start_layer, on_layer_done, true_sequential,
    zeros,
) -> PruneReport:
    """The layer loop shared by :func:`prune_model` and :func:`prune_streamed`."""
    cos, sin = parallel.replicate(rope_tables_of(config, hidden.shape[1]))
    start = time.perf_counter()
    hidden = parallel.shard_windows(hidden)
    seconds, checkpoint_seconds, read_seconds = [], 0.0, 0.0
    prune_one = prune_layer_true_sequential if true_sequential else prune_layer
    target = profile.target
    name = target.name if profile.is_uniform else f"{target.name} ({profile.source} profile)"
    bar = tqdm(range(start_layer, config.num_hidden_layers), desc=f"{method.name} {name}", unit="layer",
               disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        bar.set_postfix_str(f"layer {i}: reading")
        layer = parallel.place_layer(read_layer(i))
        jax.block_until_ready(layer)
        t1 = time.perf_counter()
        read_seconds += t1 - t0
        bar.set_postfix_str(f"layer {i}: " + ("sublayers in order" if true_sequential else "dense statistics first"))
        patterns = target if profile.is_uniform else profile.layer_patterns(i)
        stored = layer_dtype(layer)  # methods prune in float32; the layer is kept as it came (--dtype)
        layer = in_float32(layer)  # (rebound: the held copy is not kept beside the float32 one)
        layer, hidden = prune_one(layer, hidden, cos, sin, method, patterns, batch_size)
        layer = cast_layer(layer, stored)
        hidden.block_until_ready()
        seconds.append(time.perf_counter() - t1)
        zeros.append(layer_zeros(i, layer))
        if on_layer_done is not None:
            bar.set_postfix_str(f"layer {i}: checkpoint")
            t2 = time.perf_counter()
            on_layer_done(i, layer, hidden)
            checkpoint_seconds += time.perf_counter() - t2
        del layer
    elapsed = time.perf_counter() - start - checkpoint_seconds - read_seconds
    per, overall, per_layer = sparsity_of(zeros)
    mesh = parallel.current_mesh()
    return PruneReport(
        method.name, target.name, target.ratio, true_sequential, elapsed, checkpoint_seconds, seconds, per, overall,
        per_layer, None if mesh is None else parallel.describe(mesh), read_seconds,
    )
