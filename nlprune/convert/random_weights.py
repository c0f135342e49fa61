"""Seeded random weights of any size, written to disk a layer at a time.

``write_random_folder(config, seed, folder, dtype)`` writes the weights of
``init_llama(config, jax.random.key(seed))`` (each decoder layer from its own key, the
embeddings and head in row blocks) as a Hugging Face folder: one safetensors shard per
decoder layer, one for the embeddings, final norm and head, the index and config.json. The
whole model never exists in memory; the folder is filled as a temporary sibling and renamed
into place when complete, and reused afterwards (``nlprune prune --random-weights SEED
--stream`` reads it with :mod:`nlprune.convert.lazy`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nlprune.atomic import deferred_signals, fsync_dir, fsync_tree, new_token, recover_interrupted_swap, sibling_prefix
from nlprune.convert.hf import EMBED, INDEX_FILE, WeightsError, expected_shapes, layer_state_dict
from nlprune.modeling.init import RANDOM_SCHEME, RANDOM_STD, init_layer, layer_key, shell_key, shell_part_blocks
from nlprune.modeling.llama import SHELL_PARTS, LlamaConfig

RANDOM_MARKER = "nlprune-random.json"
RANDOM_MARKER_FORMAT = "nlprune-random-weights"


def _safetensors_dtypes() -> dict[str, tuple[str, np.dtype]]:
    import ml_dtypes

    return {
        "float32": ("F32", np.dtype(np.float32)),
        "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16)),
        "float16": ("F16", np.dtype(np.float16)),
    }


def write_safetensors(
    path: Path, shapes: Mapping[str, tuple[int, ...]], blocks_of: Callable[[str], Iterable[Any]], dtype: str
) -> int:
    """Write a safetensors file a piece at a time: the header first (the shapes are known),
    then each tensor from ``blocks_of(name)``, its row blocks in order, each cast to
    ``dtype`` and written before the next is asked for. Returns the bytes of tensor data."""
    code, np_dtype = _safetensors_dtypes()[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers wants the "pt" format
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * np_dtype.itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            rows = 0
            for block in blocks_of(name):
                block = np.ascontiguousarray(np.asarray(block).astype(np_dtype, copy=False))
                if block.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"{name}: a block of shape {block.shape} does not fit {tuple(shape)}")
                f.write(block.reshape(-1).view(np.uint8))
                rows += block.shape[0]
            if rows != shape[0]:
                raise ValueError(f"{name}: {rows} rows written, {shape[0]} declared")
    return offset


def shard_name(k: int, n: int) -> str:
    """``model-0000k-of-0000n.safetensors``, as ``save_pretrained`` names shards."""
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def random_record(config: LlamaConfig, seed: int, dtype: str, std: float) -> dict[str, Any]:
    """What a random-weights folder holds (its marker): a folder is reused only if it matches."""
    return {"format": RANDOM_MARKER_FORMAT, "init": RANDOM_SCHEME, "seed": seed, "std": std, "dtype": dtype,
            "config": config.to_hf_dict()}


def write_random_folder(
    config: LlamaConfig,
    seed: int,
    folder: str | Path,
    dtype: str = "float32",
    std: float = RANDOM_STD,
    progress: bool = True,
) -> Path:
    """Write ``init_llama(config, jax.random.key(seed), std)`` as a Hugging Face folder
    (config.json, one safetensors shard per decoder layer plus one for the embedding, final
    norm and LM head, and model.safetensors.index.json) one layer at a time, so the whole
    model never exists in memory. The folder is filled as a temporary sibling and renamed
    into place when complete; an existing complete folder of the same weights is reused."""
    folder = Path(folder)
    choices = _safetensors_dtypes()
    if dtype not in choices:
        raise ValueError(f"unknown dtype {dtype!r} for random weights; choose one of {', '.join(choices)}.")
    record = random_record(config, seed, dtype, std)
    if folder.exists():
        return _reuse(folder, record)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_swap(folder)  # deletes what killed writers left
    tmp = folder.parent / (sibling_prefix(folder, "tmp") + new_token())
    tmp.mkdir()
    try:
        _fill_random_folder(tmp, config, seed, dtype, std, progress)
        (tmp / RANDOM_MARKER).write_text(json.dumps(record, indent=1) + "\n")
        fsync_tree(tmp)
        with deferred_signals():
            _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once published
    return _reuse(folder, record)


def _reuse(folder: Path, record: dict[str, Any]) -> Path:
    try:
        found = json.loads((folder / RANDOM_MARKER).read_text())
    except (OSError, ValueError):
        found = None
    if found != json.loads(json.dumps(record)):  # compared as written (tuples become lists)
        what = "other random weights" if isinstance(found, dict) else "something else than random weights written by nlprune"
        raise WeightsError(f"{folder} holds {what}; delete it (rm -r {folder}) and rerun.")
    return folder


def _publish(tmp: Path, folder: Path) -> None:
    """Rename the complete ``tmp`` onto ``folder``, unless another writer got there first."""
    try:
        os.rename(tmp, folder)
    except OSError:
        if not folder.exists():
            raise
        return  # a concurrent writer published the same weights; theirs is kept
    fsync_dir(folder.parent)


def _fill_random_folder(tmp: Path, config: LlamaConfig, seed: int, dtype: str, std: float, progress: bool) -> None:
    import jax
    from tqdm import tqdm

    key = jax.random.key(seed)
    n = config.num_hidden_layers + 1
    weight_map: dict[str, str] = {}
    total = 0
    with tqdm(total=n, desc="writing random weights", unit="layer", disable=not progress) as bar:
        for k in range(1, n + 1):
            file = shard_name(k, n)
            if k == 1:
                shapes, size = _write_shell_shard(tmp / file, config, shell_key(config, key), std, dtype)
            else:
                i = k - 2
                shapes, size = _write_layer_shard(tmp / file, config, i, layer_key(key, i), std, dtype)
            weight_map.update(dict.fromkeys(shapes, file))
            total += size
            bar.update()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps({**config.to_hf_dict(), "torch_dtype": dtype}, indent=2) + "\n")


def _write_layer_shard(path: Path, config: LlamaConfig, i: int, key, std: float, dtype: str):
    """Decoder layer ``i`` (one layer in memory at a time: this frame's locals)."""
    tensors = layer_state_dict(init_layer(config, key, std), i)
    shapes = {name: tuple(a.shape) for name, a in tensors.items()}
    return shapes, write_safetensors(path, shapes, lambda name: [tensors[name]], dtype)


def _write_shell_shard(path: Path, config: LlamaConfig, key, std: float, dtype: str):
    """Embedding, final norm and LM head, generated a row block at a time as they are written."""
    hf_names = {"embed_tokens": EMBED, "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    all_shapes = expected_shapes(config)
    parts = {hf_names[p]: p for p in SHELL_PARTS if hf_names[p] in all_shapes}  # no lm_head when tied
    shapes = {name: all_shapes[name] for name in parts}
    return shapes, write_safetensors(path, shapes, lambda name: shell_part_blocks(config, key, parts[name], std), dtype)
