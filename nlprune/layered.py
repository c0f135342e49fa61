"""A streamed run's pruned model on disk: one decoder layer per state checkpoint.

A streamed run (``nlprune prune --stream``) never holds its model whole, so its pruned model is
stored one decoder layer per state checkpoint (the run's per-layer resume state, hard-linked,
not copied) beside the arrays outside the layers and a sidecar naming every layer's checksum:

    model/nlprune_checkpoint.json   kind "layered-model": config, meta, layer checksums
    model/shell-embed_tokens/ ...   states: embed_tokens, norm, lm_head (None when tied)
    model/layer-000/ ...            states: each linear's weight, mask (bits), bias; the norms

:func:`nlprune.checkpoint.load_model` reads it as a whole model; :func:`open_layered` reads it
a layer at a time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nlprune.atomic import write_atomically
from nlprune.checkpoint import (
    FORMAT, SIDECAR, VERSION, CheckpointError, _check_replaceable, _is_binary, _json_or_raise, _open,
    _sidecar_checksum, config_differences, load_state, read_meta, save_state,
)
from nlprune.modeling.llama import (
    PRUNABLE_LINEARS,
    SHELL_PARTS,
    DecoderLayer,
    LlamaConfig,
    LlamaForCausalLM,
    with_layers,
)

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
    """The decoder layer of :func:`layer_state` (masks in their weight's dtype, as
    ``set_linears`` keeps them)."""
    from nlprune.convert import hf
    from nlprune.modeling.masks import set_linears

    named = {}
    for name, entry in state.items():
        sub = "" if name.endswith("layernorm") else ("self_attn." if name in PRUNABLE_LINEARS[:4] else "mlp.")
        named.update({f"model.layers.0.{sub}{name}.{k}": v for k, v in entry.items() if k != "mask"})
    layer = hf.layer_from_state(config, named, 0)
    lins = layer.linears()
    masks = {n: (lins[n].weight, jax.numpy.asarray(e["mask"])) for n, e in state.items() if "mask" in e}
    return set_linears(layer, masks) if masks else layer


def shell_state(model: LlamaForCausalLM) -> dict[str, Any]:
    """The arrays outside the decoder layers, each behind a zero-argument callable (so that a
    large model's embeddings and head are read and written one at a time): the embeddings,
    the final norm and the LM head's weight (None when tied)."""
    head = model.lm_head
    return {"embed_tokens": lambda: np.asarray(model.model.embed_tokens.weight),
            "norm": lambda: np.asarray(model.model.norm.weight),
            "lm_head": lambda: None if head is None else np.asarray(head.weight)}


def shell_from_state(config: LlamaConfig, state: dict[str, Any]) -> LlamaForCausalLM:
    from nlprune.convert import hf

    named = {"model.embed_tokens.weight": state["embed_tokens"], "model.norm.weight": state["norm"]}
    if state["lm_head"] is not None:
        named["lm_head.weight"] = state["lm_head"]
    return hf.shell_from_state(config, named)


def save_layered_model(path: str | Path, shell: dict[str, Any], layer_dirs: list[Path], config: LlamaConfig,
                       meta: dict[str, Any] | None = None) -> Path:
    """Atomically write a layered model from a shell (:func:`shell_state`: each part behind a
    callable) and one state checkpoint per layer (hard-linked where the file system allows,
    else copied)."""
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
        for part in SHELL_PARTS:  # one at a time: an 8B model's embeddings alone are 2 GB
            save_state(tmp / f"{SHELL}-{part}", {"value": shell[part]()})
        for i, d in enumerate(layer_dirs):
            shutil.copytree(d, tmp / f"layer-{i:03d}", copy_function=link_or_copy)
        (tmp / SIDECAR).write_text(_json_or_raise({**sidecar, "checksum": _sidecar_checksum(sidecar)},
                                                  "checkpoint meta"))

    return write_atomically(path, write)


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

    def layer(self, i: int) -> DecoderLayer:
        where = self.path / f"layer-{i:03d}"
        if read_meta(where).get("checksum") != self.checksums[i]:
            raise CheckpointError(f"{where} is not the layer its model recorded (checksum differs); the "
                                  "checkpoint is damaged: rerun the prune.")
        state, _ = load_state(where)
        return layer_from_state(self.config, {k: v for k, v in state.items()})

    def shell(self) -> LlamaForCausalLM:
        state = {part: load_state(self.path / f"{SHELL}-{part}")[0]["value"] for part in SHELL_PARTS}
        return shell_from_state(self.config, state)

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
    return LayeredModel(path, config, sidecar.get("meta", {}), checksums)
