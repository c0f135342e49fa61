"""Masks as bits in one safetensors file (``masks.safetensors``), keyed by HF weight name.

Each tensor is ``np.packbits(mask != 0, axis=-1)``; the metadata gives the unpacked shapes.
The file is a by-product for people and other tools (nlprune itself never reads it back):
its header is written with sorted keys, so the same masks give the same bytes and a file
hash compares runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from nlprune.atomic import os_error_in, write_file_with
from nlprune.checkpoint import CheckpointError, _is_binary
from nlprune.modeling.llama import PRUNABLE_LINEARS, DecoderLayer, LlamaConfig, LlamaForCausalLM
from nlprune.modeling.masks import linear_paths, prunable_linears

PACKED_MASKS_FORMAT = "nlprune-packed-masks"


def save_packed_masks(path: str | Path, model: LlamaForCausalLM) -> Path:
    """Write every mask as bits into one safetensors file, keyed by the HF weight name.

    Each tensor is ``np.packbits(mask != 0, axis=-1)`` (uint8, shape (out, ceil(in/8)),
    big-endian bit order); the metadata ``shapes`` gives the unpacked shapes. Linears without
    a mask are absent (dense). Apply with :func:`load_packed_masks` or, without nlprune,
    ``np.unpackbits(t, axis=-1, count=in_features).astype(bool)``.
    """
    return _write_packed_masks(path, zip(linear_paths(model.config), (lin.mask for lin in prunable_linears(model))))


def layer_mask_paths(config: LlamaConfig, index: int) -> list[str]:
    """HF names of decoder layer ``index``'s prunable linears."""
    per = len(PRUNABLE_LINEARS)
    return linear_paths(config)[index * per : (index + 1) * per]


def save_packed_layer_masks(path: str | Path, config: LlamaConfig, index: int, layer: DecoderLayer) -> Path:
    """:func:`save_packed_masks` of one decoder layer (a streamed run writes one per layer and
    joins them with :func:`join_packed_masks`, never holding the model)."""
    masks = (lin.mask for lin in layer.linears().values())
    return _write_packed_masks(path, zip(layer_mask_paths(config, index), masks))


def join_packed_masks(path: str | Path, parts: list[Path]) -> Path:
    """One packed masks file from per-layer ones, in order (bits copied, not unpacked)."""
    from safetensors import safe_open

    tensors, shapes = {}, {}
    for part in parts:
        with safe_open(str(part), framework="numpy") as f:
            shapes.update(json.loads((f.metadata() or {})["shapes"]))
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return _write_packed(path, tensors, shapes)


def _write_packed_masks(path: str | Path, masks) -> Path:
    tensors, shapes = {}, {}
    for lin_path, mask in masks:
        if mask is None:
            continue
        mask = np.asarray(mask)
        if not _is_binary(mask):
            raise ValueError(f"{lin_path}.mask holds values other than 0 and 1; it cannot be bit-packed.")
        key = f"{lin_path}.weight"
        tensors[key] = np.ascontiguousarray(np.packbits(mask != 0, axis=-1))
        shapes[key] = list(mask.shape)
    if not tensors:
        raise ValueError("the model has no masks (nlprune.modeling.llama.with_masks adds them).")
    return _write_packed(path, tensors, shapes)


def _write_packed(path: str | Path, tensors: dict[str, np.ndarray], shapes: dict[str, list[int]]) -> Path:
    from safetensors.numpy import save

    metadata = {
        "format": PACKED_MASKS_FORMAT,
        "version": "1",
        "packing": "numpy.packbits(mask != 0, axis=-1), bitorder big",
        "shapes": json.dumps(shapes),
    }
    try:  # a file rename is atomic: readers see the old or the new file
        return write_file_with(path, lambda tmp: Path(tmp).write_bytes(canonical_safetensors(save(tensors, metadata))))
    except Exception as e:  # safetensors reports a full disk as SafetensorError
        raise (os_error_in(e, path) or e) from None


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: safetensors writes them in
    a per-process hash order, so two writes of the same masks would differ byte for byte and a
    file hash could not compare runs. The header keeps its length (padded with spaces, as the
    format pads it); the tensor data does not move."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > n:  # cannot happen for the same content; keep the library's bytes if it does
        return blob
    return blob[:8] + header + b" " * (n - len(header)) + blob[8 + n :]


def load_packed_masks(path: str | Path) -> dict[str, np.ndarray]:
    """Boolean masks (True = kept) by HF weight name, from :func:`save_packed_masks`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no packed masks file at {path}.")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != PACKED_MASKS_FORMAT:
                raise CheckpointError(f"{path} is not an nlprune packed masks file.")
            shapes = json.loads(metadata["shapes"])
            return {
                k: np.unpackbits(f.get_tensor(k), axis=-1, count=shapes[k][-1]).astype(bool)
                for k in f.keys()
            }
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read packed masks {path} ({e}); the file is corrupt.") from None


def set_masks(model: LlamaForCausalLM, masks: dict[str, np.ndarray]) -> LlamaForCausalLM:
    """Put masks keyed by HF weight name (as from :func:`load_packed_masks`) onto ``model``,
    in each weight's dtype; linears not named keep their current mask."""
    paths = linear_paths(model.config)
    unknown = sorted(set(masks) - {f"{p}.weight" for p in paths})
    if unknown:
        raise ValueError(f"masks for unknown weights {unknown[:4]}: they are for another model.")
    chosen = [(i, masks[f"{p}.weight"]) for i, p in enumerate(paths) if f"{p}.weight" in masks]
    lins = prunable_linears(model)
    for i, m in chosen:
        if tuple(m.shape) != tuple(lins[i].weight.shape):
            raise ValueError(
                f"mask for {paths[i]}.weight has shape {tuple(m.shape)}, the weight "
                f"{tuple(lins[i].weight.shape)}."
            )
    return eqx.tree_at(
        lambda mdl: [prunable_linears(mdl)[i].mask for i, _ in chosen],
        model,
        [jax.numpy.asarray(m, dtype=lins[i].weight.dtype) for i, m in chosen],
        is_leaf=lambda x: x is None,
    )
