"""A streamed run's pruned model on disk: one decoder layer per state checkpoint.

A streamed run (``nlprune prune --stream``) never holds its model whole, so its pruned model is
stored one decoder layer per state checkpoint (the run's per-layer resume state, hard-linked,
not copied) beside the arrays outside the layers and a sidecar naming every layer's checksum:

    model/nlprune_checkpoint.json   kind "layered-model": config, meta, layer checksums
    model/shell-embed_tokens.bin    raw arrays in the source's precision (norm, lm_head alike;
                                    no lm_head when tied): dtype, shape, sha256 in the sidecar
    model/layer-000/ ...            states: each linear's weight, mask (bits), bias; the norms

:func:`nlprune.checkpoint.load_model` reads it as a whole model; :func:`open_layered` reads it
a layer at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nlprune.atomic import write_atomically
from nlprune.checkpoint import (
    FORMAT, SIDECAR, VERSION, CheckpointError, _check_replaceable, _is_binary, _json_or_raise, _open,
    _sidecar_checksum, config_differences, load_state, read_meta,
)
from nlprune.modeling.llama import (
    PRUNABLE_LINEARS,
    DecoderLayer,
    LlamaConfig,
    LlamaForCausalLM,
    with_layers,
)
from nlprune.modeling.precision import cast_layer, cast_model, storage_dtype

LAYERED_KIND = "layered-model"
SHELL = "shell"


def layer_state(layer: DecoderLayer) -> dict[str, Any]:
    """Every array of a decoder layer by module name; 0/1 masks as booleans (stored as bits)."""
    state: dict[str, Any] = {}
    for name, lin in layer.linears().items():
        entry = {"weight": np.asarray(lin.weight)}
        if lin.bias is not None:
            entry["bias"] = np.asarray(lin.bias)
        if lin.mask is not None:
            mask = np.asarray(lin.mask)
            entry["mask"] = mask.astype(bool) if _is_binary(mask) else mask
        state[name] = entry
    for norm in ("input_layernorm", "post_attention_layernorm"):
        state[norm] = {"weight": np.asarray(getattr(layer, norm).weight)}
    return state


def layer_from_state(config: LlamaConfig, state: dict[str, Any]) -> DecoderLayer:
    """The decoder layer of :func:`layer_state` (0/1 masks as booleans, relaxed ones in their
    weight's dtype, as ``set_linears`` keeps them)."""
    from nlprune.convert import hf
    from nlprune.modeling.masks import set_linears

    named = {}
    for name, entry in state.items():
        sub = "" if name.endswith("layernorm") else ("self_attn." if name in PRUNABLE_LINEARS[:4] else "mlp.")
        named.update({f"model.layers.0.{sub}{name}.{k}": v for k, v in entry.items() if k != "mask"})
    layer = hf.layer_from_state(config, named, 0)
    lins = layer.linears()
    masks = {n: (lins[n].weight, jax.numpy.asarray(e["mask"])) for n, e in state.items() if "mask" in e}
    layer = set_linears(layer, masks) if masks else layer
    return cast_layer(layer, np.asarray(state["q_proj"]["weight"]).dtype)  # as it was held (--dtype)


def shell_from_files(config: LlamaConfig, folder: Path, shell: dict[str, Any]) -> LlamaForCausalLM:
    """The model without its layers, from the shell files :func:`save_layered_model` wrote."""
    import ml_dtypes

    from nlprune.convert import hf

    named = {}
    for part, hf_name in SHELL_NAMES.items():
        info = shell.get(part)
        if info is None:
            continue
        where = folder / f"{SHELL}-{part}.bin"
        stored = np.dtype(ml_dtypes.bfloat16) if info["dtype"] == "bfloat16" else np.dtype(info["dtype"])
        try:
            values = np.fromfile(where, dtype=stored)
        except OSError as e:
            raise CheckpointError(f"cannot read {where} ({e.strerror or e}); the checkpoint is incomplete.") from None
        if values.size != int(np.prod(info["shape"], dtype=np.int64)) or (
                hashlib.sha256(values.view(np.uint8)).hexdigest() != info["sha256"]):
            raise CheckpointError(f"{where} is not the array its sidecar recorded (size or sha256 differs); the "
                                  "checkpoint is damaged: rerun the prune.")
        named[hf_name] = values.reshape(info["shape"])
    return hf.shell_from_state(config, named)


SHELL_NAMES = {"embed_tokens": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def _write_shell_part(path: Path, tensor) -> dict[str, Any]:
    """Write one shell array from (dtype, shape, byte chunks); its sidecar entry."""
    dtype, shape, chunks = tensor
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
    return {"dtype": dtype, "shape": list(shape), "sha256": digest.hexdigest()}


def save_layered_model(path: str | Path, shell: dict[str, Any], layer_dirs: list[Path], config: LlamaConfig,
                       meta: dict[str, Any] | None = None) -> Path:
    """Atomically write a layered model from its shell and one state checkpoint per layer
    (hard-linked where the file system allows, else copied). ``shell`` maps each of
    :data:`SHELL_NAMES` to a callable giving ``(dtype, shape, byte chunks)`` of the array
    (``LayerReader.tensor_bytes``), or to None (a tied LM head): each is copied a chunk at a
    time into a raw file, its dtype, shape and sha256 in the sidecar."""
    path = Path(path)
    _check_replaceable(path)
    checksums = [read_meta(d)["checksum"] for d in layer_dirs]
    sidecar = {"format": FORMAT, "version": VERSION, "kind": LAYERED_KIND, "config": config.to_hf_dict(),
               "meta": meta or {}, "layers": checksums, "leaves": {}}
    _json_or_raise(sidecar, "checkpoint meta")

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    def write(tmp: Path) -> None:
        parts = {part: None if shell[part] is None else _write_shell_part(tmp / f"{SHELL}-{part}.bin", shell[part]())
                 for part in SHELL_NAMES}
        for i, d in enumerate(layer_dirs):
            shutil.copytree(d, tmp / f"layer-{i:03d}", copy_function=link_or_copy)
        full = {**sidecar, "shell": parts}
        (tmp / SIDECAR).write_text(_json_or_raise({**full, "checksum": _sidecar_checksum(full)}, "checkpoint meta"))

    return write_atomically(path, write)


def load_any_model(path: str | Path, expect_config: LlamaConfig | None = None) -> tuple[LlamaForCausalLM, dict[str, Any]]:
    """``(model, meta)`` of a run's model folder: a layered model (a streamed run's) assembled
    whole, else :func:`nlprune.checkpoint.load_model`."""
    from nlprune.checkpoint import load_model

    if is_layered(path):
        model = open_layered(path, expect_config)
        return model.whole(), model.meta
    return load_model(path, expect_config)


def is_layered(path: str | Path) -> bool:
    try:
        return read_meta(path).get("kind") == LAYERED_KIND
    except CheckpointError:
        return False


@dataclasses.dataclass
class LayeredModel:
    """A layered model on disk, read one decoder layer at a time."""

    path: Path
    config: LlamaConfig
    meta: dict[str, Any]
    checksums: list[str]
    shell_files: dict[str, Any]  # part -> {dtype, shape, sha256} (None: a tied head)

    def layer(self, i: int) -> DecoderLayer:
        where = self.path / f"layer-{i:03d}"
        if read_meta(where).get("checksum") != self.checksums[i]:
            raise CheckpointError(f"{where} is not the layer its model recorded (checksum differs); the "
                                  "checkpoint is damaged: rerun the prune.")
        state, _ = load_state(where)
        return layer_from_state(self.config, {k: v for k, v in state.items()})

    def shell(self) -> LlamaForCausalLM:
        """Embeddings and head in the run's precision (``--dtype``; a bfloat16 source's shell files
        are bfloat16 even when the run held float32)."""
        dtype = (self.meta.get("args") or {}).get("dtype", "float32")
        return cast_model(shell_from_files(self.config, self.path, self.shell_files), storage_dtype(dtype))

    def whole(self) -> LlamaForCausalLM:
        shell = self.shell()
        layers = [self.layer(i) for i in range(self.config.num_hidden_layers)]
        return with_layers(shell, layers)


def open_layered(path: str | Path, expect_config: LlamaConfig | None = None) -> LayeredModel:
    path, sidecar = _open(path, LAYERED_KIND)
    try:
        config = LlamaConfig.from_hf_dict(sidecar["config"])
        checksums = [str(c) for c in sidecar["layers"]]
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path / SIDECAR}: unreadable layered model ({e}).") from None
    if len(checksums) != config.num_hidden_layers:
        raise CheckpointError(f"{path} names {len(checksums)} layers, its config {config.num_hidden_layers}; "
                              "the checkpoint is damaged.")
    if expect_config is not None and config != expect_config:
        raise CheckpointError(f"checkpoint {path} is for another model configuration: "
                              f"{'; '.join(config_differences(config, expect_config))}.")
    shell = sidecar.get("shell")
    if not isinstance(shell, dict) or set(shell) != set(SHELL_NAMES):
        raise CheckpointError(f"{path / SIDECAR}: no complete shell entry; the checkpoint is damaged: rerun the prune.")
    return LayeredModel(path, config, sidecar.get("meta", {}), checksums, shell)
