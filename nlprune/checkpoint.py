"""Crash-safe checkpoints: a model (weights + masks), or any pytree of arrays, plus JSON.

Layout of a checkpoint directory::

    <path>/arrays/                  Orbax (StandardCheckpointHandler) flat dict of arrays
    <path>/nlprune_checkpoint.json  sidecar: format, config, leaf table, user meta

The sidecar is written last, so a directory without it is never taken for a checkpoint.
Every save is built in a hidden temporary sibling (``.<name>.tmp-<host>-<pid>-<token>``)
and swapped onto ``<path>`` only once complete (:func:`nlprune.atomic.write_atomically`): a
crash leaves either the old or the new checkpoint restorable.

Masks that hold only 0 and 1 are stored bit-packed (1 bit per weight) and restored to their
original dtype bit for bit. The sidecar holds the sha256 of every Orbax file and its own, so
a damaged checkpoint is refused on load (``CheckpointError``) before Orbax reads it, never
restored into a wrong model. The directory steps live in :mod:`nlprune.atomic`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from nlprune.atomic import (
    deferred_signals, file_digests, leftovers, os_error_in, recover_interrupted_swap, write_atomically,
)
from nlprune.modeling.init import init_llama
from nlprune.modeling.llama import LlamaConfig, LlamaForCausalLM
from nlprune.modeling.masks import linear_paths, prunable_linears, with_masks

log = logging.getLogger(__name__)

FORMAT = "nlprune-checkpoint"
VERSION = 1
SIDECAR = "nlprune_checkpoint.json"
ARRAYS = "arrays"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt, or for another model."""


class _OrbaxThreadNoise(logging.Filter):
    """Orbax logs every failure of its writer threads with a traceback and then raises the
    same error to the caller, which reports it in one line: drop the duplicate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "_SignalingThread.run() raised" not in str(record.msg)


logging.getLogger("absl").addFilter(_OrbaxThreadNoise())


def _sidecar_checksum(sidecar: dict[str, Any]) -> str:
    body = {k: v for k, v in sidecar.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _read_sidecar(sidecar_path: Path) -> dict[str, Any]:
    """The sidecar, refused (CheckpointError) unless it is an nlprune sidecar matching its checksum."""
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{sidecar_path} is not valid JSON ({e}); the checkpoint is corrupt.") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        raise CheckpointError(f"{sidecar_path} is not an nlprune checkpoint sidecar.")
    if "checksum" in sidecar and sidecar["checksum"] != _sidecar_checksum(sidecar):
        raise CheckpointError(f"{sidecar_path} does not match its checksum; the checkpoint is corrupt.")
    return sidecar


# --------------------------------------------------------------------------- orbax + sidecar


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


def _checkpointer():
    # Synchronous: the sidecar must only be written once the arrays are on disk.
    ocp = _orbax()
    if jax.process_count() == 1:
        return ocp.Checkpointer(ocp.StandardCheckpointHandler())
    # Several JAX processes: this one alone (a run's writer, process 0, saves whole arrays by
    # itself; see nlprune.processes), not Orbax's default of every process at a barrier.
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.Checkpointer(ocp.StandardCheckpointHandler(multiprocessing_options=alone),
                            multiprocessing_options=alone)


def _json_or_raise(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=2, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from None


def _is_binary(a: np.ndarray) -> bool:
    """Bitwise 0/1 (``-0.0`` and soft masks are not, so those are stored raw)."""
    if a.dtype == np.bool_:
        return True
    rebuilt = (a != 0).astype(a.dtype)
    if a.dtype.itemsize in (1, 2, 4, 8):  # compare bit patterns, so -0.0 != 0.0
        bits = f"u{a.dtype.itemsize}"
        return np.array_equal(rebuilt.view(bits), a.view(bits))
    return np.array_equal(rebuilt, a)


def _save(
    path: str | Path,
    arrays: dict[str, Any],
    leaves: dict[str, dict[str, Any]],
    sidecar: dict[str, Any],
) -> Path:
    """Atomically write ``arrays`` (already encoded) with Orbax and the sidecar last."""
    path = Path(path)
    _check_replaceable(path)
    sidecar = {"format": FORMAT, "version": VERSION, **sidecar, "leaves": leaves}
    _json_or_raise(sidecar, "checkpoint meta")  # fail before touching the disk

    arrays = {k: v for k, v in arrays.items() if leaves[k]["encoding"] != "empty"}

    def write(tmp: Path) -> None:
        if arrays:
            try:
                _checkpointer().save(tmp / ARRAYS, args=_orbax().args.StandardSave(arrays))
            except ValueError as e:  # tensorstore reports OS errors as ValueError
                raise (os_error_in(e, path) or e) from None
        # Each Orbax file's sha256: a damaged file is found before Orbax reads it.
        full = {**sidecar, "files": file_digests(tmp / ARRAYS) if arrays else {}}
        (tmp / SIDECAR).write_text(_json_or_raise({**full, "checksum": _sidecar_checksum(full)}, "checkpoint meta"))

    return write_atomically(path, write)


def _check_replaceable(path: Path) -> None:
    """Only an earlier checkpoint (or an empty directory) may be replaced by a save."""
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    if path.is_dir() and (path / SIDECAR).is_file():
        return
    raise CheckpointError(
        f"{path} exists and is not an nlprune checkpoint (no {SIDECAR}); refusing to replace "
        "it. Choose another checkpoint path or delete it yourself."
    )


def _open(path: str | Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """Validate a checkpoint directory and return it with its sidecar."""
    path = Path(path).absolute()
    for leftover_kind in ("tmp", "old"):
        if path.name.startswith(".") and f".{leftover_kind}-" in path.name:
            raise CheckpointError(
                f"{path} is a temporary directory left by an interrupted save, not a "
                "checkpoint. Delete it and load the checkpoint it was meant to replace (the "
                "same name without the leading '.' and the suffix), or save again."
            )
    recover_interrupted_swap(path)
    if not path.exists():
        partial = [str(p) for p, _, _ in leftovers(path, "tmp")]
        hint = (
            f" An interrupted save left {partial[0]}; it is incomplete and was not used: "
            "delete it and save again." if partial else ""
        )
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist.{hint}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory.")
    sidecar_path = path / SIDECAR
    if not sidecar_path.is_file():
        raise CheckpointError(
            f"{path} is not a complete nlprune checkpoint: {SIDECAR} is missing (the save did "
            "not finish, or this is not a checkpoint directory). Save it again."
        )
    sidecar = _read_sidecar(sidecar_path)
    if int(sidecar.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer nlprune (checkpoint version {sidecar['version']}, "
            f"this one reads up to {VERSION}); upgrade nlprune."
        )
    if sidecar.get("kind") != kind:
        loader = {"model": "nlprune.checkpoint.load_model", "state": "nlprune.checkpoint.load_state",
                  "layered-model": "nlprune.layered.load_any_model"}.get(sidecar.get("kind"), "?")
        raise CheckpointError(
            f"{path} holds a {sidecar.get('kind')!r} checkpoint, not a {kind!r} one; read it with {loader}."
        )
    stored = [v for v in sidecar["leaves"].values() if v["encoding"] != "empty"]
    if stored and not (path / ARRAYS).is_dir():
        raise CheckpointError(
            f"{path} is incomplete: its Orbax array directory {path / ARRAYS} is missing. The "
            "checkpoint cannot be restored; save it again."
        )
    found = file_digests(path / ARRAYS) if stored and "files" in sidecar else {}
    bad = sorted(n for n in set(sidecar.get("files", {})) | set(found) if sidecar["files"].get(n) != found.get(n))
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} file(s) differ from their checksums ({bad[0]}, ...); the "
                              "checkpoint is corrupt; save it again.")
    return path, sidecar


def _restore(path: Path, leaves: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Orbax restore of the stored (encoded) arrays, numpy or on the default device."""
    leaves = {k: v for k, v in leaves.items() if v["encoding"] != "empty"}
    if not leaves:
        return {}
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets: dict[str, Any] = {}
    for name, info in leaves.items():
        shape, dtype = tuple(info["stored_shape"]), np.dtype(info["stored_dtype"])
        if info.get("type") == "jax" and info.get("encoding") == "raw":
            targets[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=device)
        else:  # decoded on the host first, or kept as numpy
            targets[name] = np.empty(shape, dtype)
    try:
        with deferred_signals():  # no reader threads left behind by a Ctrl-C
            return _checkpointer().restore(path / ARRAYS, args=_orbax().args.StandardRestore(targets))
    except Exception as e:  # orbax/tensorstore raise many types for a damaged directory
        raise CheckpointError(
            f"cannot restore the arrays of {path} ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
            "The checkpoint is corrupt or incomplete; save it again."
        ) from None


def _encode(name: str, value: Any, compact: bool) -> tuple[Any, dict[str, Any]]:
    """(stored array, leaf-table entry) for one leaf."""
    kind = "jax" if isinstance(value, jax.Array) else "numpy"
    if kind == "jax" and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        raise TypeError(f"{name}: typed PRNG keys are not supported; save jax.random.key_data(key).")
    if isinstance(value, np.generic):
        kind = "numpy-scalar"
    info = {"shape": list(np.shape(value)), "dtype": str(np.dtype(value.dtype)), "type": kind}
    if np.size(value) == 0:
        # Orbax refuses zero-size arrays; shape and dtype alone rebuild them.
        info.update(encoding="empty", stored_shape=info["shape"], stored_dtype=info["dtype"])
        return None, info
    if compact:
        host = np.asarray(value)
        if _is_binary(host):
            packed = np.packbits(host.reshape(-1) != 0)  # 1 bit per weight
            info.update(encoding="packbits", stored_shape=list(packed.shape), stored_dtype="uint8")
            return packed, info
    stored = value if kind == "jax" else np.asarray(value)
    info.update(encoding="raw", stored_shape=info["shape"], stored_dtype=info["dtype"])
    return stored, info


def _decode(stored: Any, info: dict[str, Any]) -> Any:
    dtype, shape = np.dtype(info["dtype"]), tuple(info["shape"])
    if info["encoding"] == "empty":
        value = np.zeros(shape, dtype)
        return jax.device_put(value, jax.devices()[0]) if info["type"] == "jax" else value
    if info["encoding"] == "packbits":
        bits = np.unpackbits(np.asarray(stored), count=int(np.prod(shape, dtype=np.int64)))
        value = bits.reshape(shape).astype(dtype)
        return jax.device_put(value, jax.devices()[0]) if info["type"] == "jax" else value
    if info["type"] == "numpy-scalar":
        return np.asarray(stored)[()]
    return stored


# --------------------------------------------------------------------------- models


def _leaf_names(model: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(model)
    return [(jax.tree_util.keystr(p, simple=True, separator="."), leaf) for p, leaf in flat]


def save_model(path: str | Path, model: LlamaForCausalLM, meta: dict[str, Any] | None = None) -> Path:
    """Save a model's weights (and masks, bit-packed when 0/1) with Orbax, atomically.

    ``meta`` (model card, source, weights sha256, run arguments, ...) must be
    JSON-serialisable and comes back from :func:`load_model`.
    """
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"save_model takes an nlprune LlamaForCausalLM, not {type(model).__name__}")
    arrays, leaves = {}, {}
    for name, leaf in _leaf_names(model):
        arrays[name], leaves[name] = _encode(name, leaf, compact=name.endswith(".mask"))
    sidecar = {
        "kind": "model",
        "config": model.config.to_hf_dict(),
        "masks": [n for n in leaves if n.endswith(".mask")],
        "meta": meta or {},
    }
    return _save(path, arrays, leaves, sidecar)


def config_differences(saved: LlamaConfig, other: LlamaConfig) -> list[str]:
    """``"field: checkpoint A, model B"`` for every field that differs."""
    pairs = [(f.name, getattr(saved, f.name), getattr(other, f.name)) for f in dataclasses.fields(LlamaConfig)]
    return [f"{name}: checkpoint {a}, model {b}" for name, a, b in pairs if a != b]


def _abstract_model(config: LlamaConfig, masks: set[str]) -> LlamaForCausalLM:
    """Shapes-only model with mask leaves exactly where the checkpoint has them."""
    def build(key):
        model = init_llama(config, key)
        return with_masks(model) if masks else model

    abstract = eqx.filter_eval_shape(build, jax.random.key(0))
    if not masks:
        return abstract
    linears = {p: lin for p, lin in zip(linear_paths(config), prunable_linears(abstract))}
    drop = [p for p in linears if f"{p}.mask" not in masks]
    if drop:
        abstract = eqx.tree_at(
            lambda m: [lin.mask for p, lin in zip(linear_paths(config), prunable_linears(m)) if p in drop],
            abstract,
            [None] * len(drop),
        )
    return abstract


def load_model(
    path: str | Path, expect_config: LlamaConfig | None = None
) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """Restore ``(model, meta)`` saved by :func:`save_model`, bit for bit.

    With ``expect_config``, a checkpoint of any other architecture is refused, naming the
    fields that differ.
    """
    path, sidecar = _open(path, "model")
    try:
        config = LlamaConfig.from_hf_dict(sidecar["config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path / SIDECAR}: unreadable model config ({e}).") from None
    if expect_config is not None and config != expect_config:
        diffs = "; ".join(config_differences(config, expect_config))
        raise CheckpointError(
            f"checkpoint {path} is for another model configuration: {diffs}. Resume with the "
            "model it was made from, or start a fresh run (another checkpoint path)."
        )
    abstract = _abstract_model(config, set(sidecar.get("masks", [])))
    expected = _leaf_names(abstract)
    leaves = sidecar["leaves"]
    names = [n for n, _ in expected]
    if names != list(leaves):
        missing, extra = sorted(set(names) - set(leaves)), sorted(set(leaves) - set(names))
        raise CheckpointError(
            f"{path}: stored arrays do not match the model layout (missing {missing[:4]}, "
            f"unexpected {extra[:4]}); the checkpoint is damaged or from an incompatible "
            "nlprune version."
        )
    for name, leaf in expected:
        if tuple(leaves[name]["shape"]) != tuple(leaf.shape):
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(leaves[name]['shape'])}, its config implies "
                f"{tuple(leaf.shape)}; the checkpoint is damaged."
            )
    stored = _restore(path, leaves)
    values = [_decode(stored.get(n), leaves[n]) for n in names]
    values = [v if isinstance(v, jax.Array) else jax.device_put(v) for v in values]
    model = jax.tree.unflatten(jax.tree.structure(abstract), values)
    return model, sidecar.get("meta", {})


def read_meta(path: str | Path) -> dict[str, Any]:
    """The sidecar of a complete checkpoint (kind, config, meta, leaf table), arrays unread."""
    sidecar_path = Path(path) / SIDECAR
    if not sidecar_path.is_file():
        raise CheckpointError(f"{path} is not a complete nlprune checkpoint ({SIDECAR} missing).")
    return _read_sidecar(sidecar_path)


# --------------------------------------------------------------------------- arbitrary state


def _encode_tree(node: Any, arrays: dict[str, Any], leaves: dict[str, Any], where: str) -> Any:
    """JSON description of a pytree of dict/list/tuple/None/scalars/arrays; arrays collected."""
    if isinstance(node, dict):
        bad = [k for k in node if not isinstance(k, str)]
        if bad:
            raise TypeError(f"state{where}: dict keys must be strings, got {bad[0]!r}")
        return {"dict": {k: _encode_tree(v, arrays, leaves, f"{where}[{k!r}]") for k, v in node.items()}}
    if isinstance(node, (list, tuple)):
        kind = "list" if isinstance(node, list) else "tuple"
        return {kind: [_encode_tree(v, arrays, leaves, f"{where}[{i}]") for i, v in enumerate(node)]}
    # Arrays first: np.float64 is also a Python float, and must stay a numpy scalar.
    if isinstance(node, (np.ndarray, np.generic, jax.Array)):
        name = f"leaf{len(arrays)}"
        # booleans (masks) as bits
        arrays[name], leaves[name] = _encode(f"state{where}", node, compact=np.dtype(node.dtype) == np.bool_)
        return {"array": name}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"value": node}
    raise TypeError(
        f"state{where}: cannot checkpoint a {type(node).__name__}; use dicts, lists, tuples, "
        "arrays and JSON scalars."
    )


def _decode_tree(desc: Any, values: dict[str, Any]) -> Any:
    (kind, body), = desc.items()
    if kind == "dict":
        return {k: _decode_tree(v, values) for k, v in body.items()}
    if kind in ("list", "tuple"):
        items = [_decode_tree(v, values) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "value":
        return body
    return values[body]


def save_state(path: str | Path, state: Any, meta: dict[str, Any] | None = None) -> Path:
    """Atomically save a pytree of arrays (nested dict/list/tuple; numpy or jax leaves; JSON
    scalars and None allowed) and JSON ``meta``. :func:`load_state` gives it back with the
    same structure, leaf types (numpy stays numpy, jax goes to the default device) and bits."""
    arrays: dict[str, Any] = {}
    leaves: dict[str, Any] = {}
    structure = _encode_tree(state, arrays, leaves, "")
    return _save(path, arrays, leaves, {"kind": "state", "structure": structure, "meta": meta or {}})


def load_state(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """``(state, meta)`` saved by :func:`save_state`."""
    path, sidecar = _open(path, "state")
    leaves = sidecar["leaves"]
    stored = _restore(path, leaves)
    values = {n: _decode(stored.get(n), leaves[n]) for n in leaves}
    return _decode_tree(sidecar["structure"], values), sidecar.get("meta", {})
