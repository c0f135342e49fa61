"""Pruning on a JAX device mesh: the mesh, where arrays live on it, multi-host start-up.

nlprune scales with JAX's own sharding, not a distribution layer of its own: arrays are
placed with ``NamedSharding`` on a two-axis ``jax.sharding.Mesh`` and the jitted pipeline
functions are left to XLA's partitioner, which inserts the collectives. The axes:

  ``data``   calibration windows (data parallel). The statistics are sums over tokens, so a
             jitted reduction over window-sharded activations is the all-reduce (X^T X too).
  ``model``  rows (output features) of the weights: Wanda and SparseGPT treat rows
             independently given the shared input statistics (SparseGPT's unstructured
             mask ranks a whole block of rows together; the partitioner gathers that ranking).

The non-linear method's KV groups are independent problems; they are sharded over as many
devices as divide their count (both axes, else ``model``, else ``data``), and replicated with
a warning when none does (e.g. SmolLM2's 3 groups on 4 devices).

``prune_model(..., mesh=None)`` is the one-device path, unchanged; a one-device mesh is
treated as None. Placement helpers read the mesh of the enclosing ``use_mesh`` block, so the
pipeline and the methods need no extra arguments.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)


class MeshError(ValueError):
    """A --mesh spec that cannot be built on the devices at hand."""


class ShardingFallback(UserWarning):
    """An array that should have been sharded is replicated (its axis does not divide)."""


# --------------------------------------------------------------------------------------------
# Building the mesh
# --------------------------------------------------------------------------------------------

_ITEM = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(-?\d+)\s*$")


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"data=2,model=2"`` -> {"data": 2, "model": 2}; axes left out have size 1."""
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        m = _ITEM.match(item)
        if not m:
            raise MeshError(
                f"--mesh {spec!r}: cannot read {item.strip()!r}; write AXIS=SIZE pairs separated "
                "by commas, e.g. --mesh data=2,model=2 (axes: data, model)."
            )
        name, size = m.group(1), int(m.group(2))
        if name not in AXES:
            raise MeshError(
                f"--mesh {spec!r}: unknown axis {name!r}; the axes are 'data' (calibration "
                "windows) and 'model' (weight rows, non-linear KV groups), e.g. --mesh data=2,model=2."
            )
        if name in sizes:
            raise MeshError(f"--mesh {spec!r}: axis {name!r} is given twice; give each axis once.")
        if size < 1:
            raise MeshError(f"--mesh {spec!r}: axis {name!r} has size {size}; sizes must be >= 1.")
        sizes[name] = size
    return {a: sizes.get(a, 1) for a in AXES}


def make_mesh(sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(sizes.get(a, 1) for a in AXES)
    if math.prod(shape) != len(devices):
        spec = ",".join(f"{a}={s}" for a, s in zip(AXES, shape))
        raise MeshError(
            f"--mesh {spec} needs {math.prod(shape)} devices, but there are {len(devices)} "
            f"({devices[0].platform}); make the axis sizes multiply to {len(devices)}, e.g. "
            f"--mesh data={len(devices)}, or leave --mesh out to use them all on 'data'."
        )
    # Auto axes: shardings are annotations that XLA's partitioner propagates through each jit
    # (jax.make_mesh defaults to Explicit axes, which would put shardings in the types).
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def parse_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of a --mesh spec; None or "" = all devices on the 'data' axis."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {DATA: len(devices), MODEL: 1} if not spec or not spec.strip() else parse_mesh_spec(spec)
    return make_mesh(sizes, devices)


def effective(mesh: Mesh | None) -> Mesh | None:
    """None for no mesh or a one-device mesh: both take the unchanged one-device path."""
    return None if mesh is None or mesh.size == 1 else mesh


def axis_sizes(mesh: Mesh | None) -> dict[str, int]:
    return {a: (1 if mesh is None else int(mesh.shape[a])) for a in AXES}


def mesh_spec(mesh: Mesh | None) -> str:
    s = axis_sizes(mesh)
    return ",".join(f"{a}={s[a]}" for a in AXES)


def describe(mesh: Mesh | None) -> dict[str, Any]:
    """What results.json records about the mesh."""
    devices = jax.devices() if mesh is None else list(mesh.devices.flat)
    return {
        "spec": mesh_spec(mesh),
        "axes": axis_sizes(mesh),
        "devices": 1 if mesh is None else len(devices),
        "platform": devices[0].platform,
        "processes": jax.process_count(),
        "notes": sorted(_NOTES.get()) if _NOTES.get() is not None else [],
    }


def initialize_distributed(force: bool = False) -> bool:
    """``jax.distributed.initialize`` when asked (``--distributed``) or when the environment
    names a coordinator (JAX_COORDINATOR_ADDRESS, with JAX_NUM_PROCESSES and JAX_PROCESS_ID).
    Without the variables, JAX detects SLURM, Open MPI, Kubernetes and TPU pods itself.
    JAX's heartbeat and shutdown timeouts are set from NLPRUNE_PEER_TIMEOUT (see
    :mod:`nlprune.processes`). Must run before anything touches a device; returns whether it
    initialised."""
    import inspect

    from nlprune import processes

    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not force and not address:
        return False
    kwargs: dict[str, Any] = processes.jax_timeouts(set(inspect.signature(jax.distributed.initialize).parameters))
    if address:
        kwargs["coordinator_address"] = address
        for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if os.environ.get(env):
                kwargs[key] = int(os.environ[env])
    with contextlib.suppress(AttributeError):  # (a JAX without it)
        # JAX's preemption service takes SIGTERM over as a notice to checkpoint at a sync point,
        # which nlprune has none of: the process would run on. nlprune's own handler ends it
        # between layers (each layer is saved), and the rerun resumes.
        jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(**kwargs)
    return True


# --------------------------------------------------------------------------------------------
# The current mesh, and notes of what could not be sharded
# --------------------------------------------------------------------------------------------

_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("nlprune_mesh", default=None)
_NOTES: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("nlprune_mesh_notes", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """Run the block with ``mesh`` as the placement helpers' mesh (None: no placement)."""
    mesh = effective(mesh)
    tokens = (_MESH.set(mesh), _NOTES.set(set()))
    try:
        yield mesh
    finally:
        _NOTES.reset(tokens[1])
        _MESH.reset(tokens[0])


def current_mesh() -> Mesh | None:
    return _MESH.get()


def notes() -> list[str]:
    """Fallbacks taken in the current ``use_mesh`` block (for the run record)."""
    found = _NOTES.get()
    return sorted(found) if found else []


def note(message: str) -> None:
    """Record (and warn once per ``use_mesh`` block) that something is not sharded as asked."""
    _fallback(message)


def _fallback(message: str) -> None:
    found = _NOTES.get()
    if found is not None and message in found:
        return  # once per block, not once per layer
    if found is not None:
        found.add(message)
    warnings.warn(message, ShardingFallback, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Placing arrays
# --------------------------------------------------------------------------------------------


def _put(x: Any, sharding: NamedSharding) -> Any:
    if not eqx.is_array(x):
        return x
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    # Several processes: every host holds the same value (seeded data, the same weights), so
    # each builds its own shards from its copy.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(tree: Any, spec: P, mesh: Mesh | None = None) -> Any:
    """Every array leaf of ``tree`` with ``NamedSharding(mesh, spec)`` (no mesh: unchanged)."""
    mesh = current_mesh() if mesh is None else effective(mesh)
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def replicate(tree: Any, mesh: Mesh | None = None) -> Any:
    return place(tree, P(), mesh)


def window_shards(n_windows: int, mesh: Mesh | None = None) -> int:
    """Into how many contiguous blocks ``n_windows`` calibration windows are sharded."""
    mesh = current_mesh() if mesh is None else effective(mesh)
    d = axis_sizes(mesh)[DATA]
    return d if d > 1 and n_windows % d == 0 else 1


def _shard_leading(x: jax.Array, axis: str, mesh: Mesh | None, why_not: str) -> jax.Array:
    """Axis 0 of ``x`` over mesh ``axis``; replicated, with ``why_not`` as the warning, when the
    axis does not divide it."""
    mesh = current_mesh() if mesh is None else effective(mesh)
    if mesh is None:
        return x
    n = axis_sizes(mesh)[axis]
    if n > 1 and x.shape[0] % n:
        _fallback(why_not.format(rows=x.shape[0], n=n))
        return replicate(x, mesh)
    return place(x, P(axis), mesh)


def shard_windows(x: jax.Array, mesh: Mesh | None = None) -> jax.Array:
    """Windows (axis 0) over 'data'; replicated (with a warning) when 'data' does not divide them."""
    return _shard_leading(
        x, DATA, mesh, "{rows} calibration windows do not divide over data={n}: the activations are "
        "replicated (choose --nsamples a multiple of {n} to shard them)",
    )


def shard_rows(w: jax.Array, mesh: Mesh | None = None) -> jax.Array:
    """A weight's rows (axis 0) over 'model'; replicated when 'model' does not divide them."""
    return _shard_leading(w, MODEL, mesh, "a weight with {rows} rows does not divide over model={n}: replicated")


def group_axes(n_groups: int, mesh: Mesh | None = None) -> tuple[str, ...]:
    """The mesh axes the non-linear method's KV groups shard over: both if their product
    divides the group count, else 'model', else 'data', else none (replicated)."""
    mesh = current_mesh() if mesh is None else effective(mesh)
    s = axis_sizes(mesh)
    for axes in ((DATA, MODEL), (MODEL,), (DATA,)):
        size = math.prod(s[a] for a in axes)
        if size > 1 and n_groups % size == 0:
            return axes
    return ()


def shard_groups(tree: Any, mesh: Mesh | None = None) -> Any:
    """Every array leaf's leading (KV group) axis over :func:`group_axes`; leaves without
    that axis (scalars) are replicated."""
    mesh = current_mesh() if mesh is None else effective(mesh)
    if mesh is None:
        return tree
    leaves = [x for x in jax.tree.leaves(tree) if eqx.is_array(x) and x.ndim]
    n = leaves[0].shape[0]
    axes = group_axes(n, mesh)
    if not axes:
        _fallback(
            f"{n} KV groups do not divide over the mesh ({mesh_spec(mesh)}): every device solves "
            f"all of them (a mesh axis of a size dividing {n} shards them)"
        )
    spec = P(axes if len(axes) > 1 else (axes[0] if axes else None))

    def put(x):
        if not eqx.is_array(x):
            return x
        return _put(x, NamedSharding(mesh, spec if x.ndim and x.shape[0] == n else P()))

    return jax.tree.map(put, tree)


def place_layer(layer: Any, mesh: Mesh | None = None) -> Any:
    """A decoder layer on the mesh: the linears' weights and masks by rows over 'model',
    everything else (norms, biases) replicated."""
    mesh = current_mesh() if mesh is None else effective(mesh)
    if mesh is None:
        return layer
    lins = layer.linears()
    names = list(lins)

    def nodes(l):
        ls = l.linears()
        return [ls[n].weight for n in names] + [ls[n].mask for n in names if ls[n].mask is not None]

    rows = [shard_rows(x, mesh) for x in nodes(layer)]
    layer = eqx.tree_at(nodes, layer, rows)
    # what is left (norm weights, biases): replicated; the rows placed above are left as they are
    placed = {id(x) for x in rows}
    return jax.tree.map(lambda x: x if id(x) in placed else replicate(x, mesh), layer)


def place_model(model: Any, mesh: Mesh | None = None) -> Any:
    """A whole model on the mesh: layers by :func:`place_layer`, embeddings/head replicated."""
    mesh = current_mesh() if mesh is None else effective(mesh)
    if mesh is None:
        return model
    layers = [place_layer(l, mesh) for l in model.model.layers]
    model = eqx.tree_at(lambda m: m.model.layers, model, layers)
    placed = {id(x) for l in layers for x in jax.tree.leaves(l)}
    return jax.tree.map(lambda x: x if id(x) in placed else replicate(x, mesh), model)


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) array as one numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:  # every device holds all of it: no collective needed
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gathered(tree: Any, keep: bool = True) -> Any:
    """Every array leaf of ``tree`` whole on the host (a sharded array across processes is
    gathered: every process must call this together); ``keep`` False drops each leaf once
    gathered (a process that writes nothing)."""
    import equinox as eqx

    def host(x):
        if not eqx.is_array(x):
            return x
        whole = to_host(x)
        return whole if keep else None

    return jax.tree.map(host, tree)
