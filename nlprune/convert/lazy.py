"""Weights read one decoder layer at a time, and random weights written the same way.

Streaming mode prunes a model larger than memory: each decoder layer is read from disk only
when its turn comes. :func:`open_reader` gives a :class:`LayerReader` for a
:class:`~nlprune.cards.ModelSource`:

* ``hf``: the folder's safetensors files are memory-mapped here (an 8-byte little-endian
  header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the data), so
  only the tensors asked for are read;
* ``gguf``: ``gguf``'s reader memory-maps the file; a layer's tensors are dequantized (and
  their q/k rows unpermuted, as :func:`nlprune.convert.gguf.read_gguf` does) when asked for;
* ``random``: the seeded random weights are first written, layer by layer, to an HF-layout
  folder in the cache (:func:`write_random_folder`), then read like ``hf``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nlprune import cards
from nlprune.atomic import (
    deferred_signals,
    fsync_dir,
    fsync_tree,
    new_token,
    recover_interrupted_swap,
    sibling_prefix,
)
from nlprune.convert import gguf as gguf_convert
from nlprune.convert.hf import (
    WeightsError,
    expected_shapes,
    layer_from_state,
    layer_state_dict,
    read_config,
    shell_from_state,
)
from nlprune.modeling.llama import (
    RANDOM_SCHEME,
    SHELL_PARTS,
    DecoderLayer,
    LlamaConfig,
    LlamaForCausalLM,
    init_layer,
    shell_part_blocks,
    layer_key,
    shell_key,
    with_layers,
)
from nlprune.modeling.precision import cast_layer, cast_model, storage_dtype

INDEX_FILE = "model.safetensors.index.json"
RANDOM_MARKER = "nlprune-random.json"
RANDOM_MARKER_FORMAT = "nlprune-random-weights"
EMBED = "model.embed_tokens.weight"

# safetensors dtype -> how its bytes are stored (bfloat16 as raw 16-bit patterns).
_STORED_AS = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
STORED_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
CHUNK_BYTES = 64 << 20  # what tensor_bytes reads at a time


# --------------------------------------------------------------------------- readers


class LayerReader:
    """A model's weights on disk, read a piece at a time, as float32.

    Subclasses give :meth:`check`, :meth:`tensor` (one HF-named tensor) and
    :meth:`embed_rows`; layers, the shell and the whole model are built from :meth:`tensor`
    exactly as :func:`nlprune.convert.hf.from_state_dict` builds them. ``storage`` (``--dtype``)
    is the precision :meth:`layer` and :meth:`shell` hand out their linears, embeddings and
    head in (see :mod:`nlprune.modeling.precision`); embedding rows are float32 (of the held values)."""

    config: LlamaConfig
    storage: str = "float32"

    def check(self) -> None:
        """Raise :class:`WeightsError` (one line: the file and the fix) unless every expected
        tensor is present, complete and of the config's shape."""
        raise NotImplementedError

    def tensor(self, name: str) -> np.ndarray:
        """A fresh float32 array of the HF-named tensor ``name``."""
        raise NotImplementedError

    def tensor_bytes(self, name: str) -> tuple[str, tuple[int, ...], Iterator[bytes]]:
        """(dtype name, shape, the raw little-endian bytes in chunks) of a tensor in the
        precision it is stored in where numpy has one (else float32): a streamed run copies
        its model's embeddings and head this way, without holding them."""
        values = self.tensor(name)
        view = memoryview(np.ascontiguousarray(values)).cast("B")
        return "float32", values.shape, (bytes(view[i : i + CHUNK_BYTES]) for i in range(0, len(view), CHUNK_BYTES))

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        """float32 embedding rows of integer ``ids`` (any shape): ``ids.shape + (hidden,)``;
        only those rows are read (rounded to bfloat16 first when ``storage`` is)."""
        raise NotImplementedError

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer ``i`` (float32 jax arrays, no masks)."""
        if not 0 <= i < self.config.num_hidden_layers:
            raise IndexError(f"layer {i} does not exist: the model has {self.config.num_hidden_layers} layers.")
        return cast_layer(layer_from_state(self.config, _OnDemand(self), i), storage_dtype(self.storage))

    def shell(self) -> LlamaForCausalLM:
        """The model without decoder layers: embedding, final norm, LM head (None when tied)."""
        return cast_model(shell_from_state(self.config, _OnDemand(self)), storage_dtype(self.storage))

    def stored_bytes(self, name: str) -> tuple[str, tuple[int, ...], Iterator[bytes]]:
        """:meth:`tensor_bytes` in the run's precision: rounded to bfloat16 a chunk at a time
        when ``storage`` is bfloat16 and the file holds more."""
        dtype, shape, chunks = self.tensor_bytes(name)
        if self.storage != "bfloat16" or dtype == "bfloat16":
            return dtype, shape, chunks
        import ml_dtypes

        wide = np.dtype(dtype)
        return "bfloat16", shape, (np.frombuffer(c, wide).astype(ml_dtypes.bfloat16).tobytes() for c in chunks)

    def dense_model(self) -> LlamaForCausalLM:
        """The whole model in memory (small models and tests)."""
        layers = [self.layer(i) for i in range(self.config.num_hidden_layers)]
        return with_layers(self.shell(), layers)

    def _as_held(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows as the held embeddings give them: rounded to bfloat16 first under it."""
        if self.storage != "bfloat16":
            return rows
        import ml_dtypes

        return rows.astype(ml_dtypes.bfloat16).astype(np.float32)

    def _flat_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, not {ids.dtype}.")
        flat = ids.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.config.vocab_size):
            bad = int(flat[(flat < 0) | (flat >= self.config.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1}).")
        return flat


class _OnDemand(Mapping):
    """An HF-named state dict whose tensors are read from the reader when looked up."""

    def __init__(self, reader: LayerReader):
        self.reader = reader

    def __getitem__(self, name: str) -> np.ndarray:
        return self.reader.tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(expected_shapes(self.reader.config))

    def __len__(self) -> int:
        return len(expected_shapes(self.reader.config))


@dataclass(frozen=True)
class _Stored:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    stop: int


class SafetensorsReader(LayerReader):
    """A Hugging Face folder: config.json and one or several ``*.safetensors`` files (with or
    without ``model.safetensors.index.json``), memory-mapped tensor by tensor."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.config = read_config(self.folder)
        self._stored: dict[str, _Stored] | None = None

    def weight_map(self) -> dict[str, str] | None:
        """The index's ``{tensor name: file name}``, or None without an index."""
        index = self.folder / INDEX_FILE
        if not index.is_file():
            return None
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            weight_map = None
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index} is not a valid safetensors index (no weight_map object); re-download or re-save the model.")
        return weight_map

    def files(self) -> list[Path]:
        """The index's files, else every ``*.safetensors`` of the folder."""
        weight_map = self.weight_map()
        if weight_map is not None:
            return [self.folder / name for name in sorted(set(weight_map.values()))]
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise WeightsError(
                f"{self.folder} has no *.safetensors files; save the model with safetensors "
                "(save_pretrained(..., safe_serialization=True))."
            )
        return files

    def stored(self) -> dict[str, _Stored]:
        """Every tensor of every file, from the headers (read once)."""
        if self._stored is None:
            listed_by = INDEX_FILE if self.weight_map() is not None else None
            stored: dict[str, _Stored] = {}
            for path in self.files():
                stored.update(read_safetensors_header(path, listed_by))
            self._stored = stored
        return self._stored

    def check(self) -> None:
        for name, shape in expected_shapes(self.config).items():
            entry = self._entry(name)
            if entry.shape != shape:
                raise WeightsError(
                    f"{entry.file}: tensor {name} has shape {entry.shape}, config.json implies {shape}; "
                    "check that config.json belongs to these weights."
                )

    def _missing(self, name: str):
        weight_map = self.weight_map() or {}
        if name in weight_map:
            where = f"{self.folder / weight_map[name]} lacks tensor {name}, which {INDEX_FILE} puts there"
        else:
            where = f"no safetensors file in {self.folder} holds tensor {name}"
        raise WeightsError(f"{where}; re-download the model or check that config.json belongs to these weights.")

    def _entry(self, name: str) -> _Stored:
        entry = self.stored().get(name) or self._missing(name)
        if entry.dtype not in _STORED_AS:
            raise WeightsError(
                f"{entry.file}: tensor {name} is {entry.dtype}; nlprune reads F32, F16 and BF16 "
                "safetensors: convert the model to one of them."
            )
        return entry

    def _mapped(self, entry: _Stored) -> np.memmap:
        return np.memmap(entry.file, dtype=_STORED_AS[entry.dtype], mode="r", offset=entry.start, shape=entry.shape)

    def tensor(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        mapped = self._mapped(entry)
        values = stored_to_float32(mapped, entry.dtype)
        # Always a copy: the mapping is dropped on return, so no file stays mapped.
        return values.copy() if np.may_share_memory(values, mapped) else values

    def tensor_bytes(self, name: str) -> tuple[str, tuple[int, ...], Iterator[bytes]]:
        """The stored bytes, read from the file in chunks (not mapped: mapped pages would count
        as the process's memory): a bfloat16 model's embeddings stay bfloat16, nothing lost."""
        entry = self._entry(name)
        size = int(np.prod(entry.shape, dtype=np.int64)) * _STORED_AS[entry.dtype].itemsize

        def chunks():
            with open(entry.file, "rb") as f:
                f.seek(entry.start)
                for done in range(0, size, CHUNK_BYTES):
                    yield f.read(min(CHUNK_BYTES, size - done))

        return STORED_DTYPE_NAMES[entry.dtype], tuple(entry.shape), chunks()

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        entry = self._entry(EMBED)
        rows = self._mapped(entry)[self._flat_ids(ids)]  # reads only these rows' pages
        return self._as_held(stored_to_float32(rows, entry.dtype).reshape(*np.shape(ids), self.config.hidden_size))


def stored_to_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of an array of a safetensors dtype's stored form (see ``_STORED_AS``)."""
    if dtype == "BF16":  # a bfloat16 is the upper half of a float32
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)


def read_safetensors_header(path: Path, listed_by: str | None = None) -> dict[str, _Stored]:
    """The tensors of one safetensors file, checked against the file's length."""
    if not path.is_file():
        named = f" ({listed_by} lists it)" if listed_by else ""
        raise WeightsError(f"{path} is missing{named}; re-download the model folder.")
    header, data_start = _header_json(path)
    tensors = ((name, info) for name, info in header.items() if name != "__metadata__")
    stored = {name: _stored_entry(path, name, info, data_start) for name, info in tensors}
    size = path.stat().st_size
    need = max((e.stop for e in stored.values()), default=data_start)
    if need > size:
        raise WeightsError(f"{path} is truncated ({size} bytes, its tensors need {need}); re-download or re-export it.")
    return stored


def _header_json(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the offset where its data starts."""
    size = path.stat().st_size
    broken = WeightsError(f"{path} is truncated or not a safetensors file ({size} bytes); re-download or re-export it.")
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise broken
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise broken
        try:
            header = json.loads(f.read(header_len))
        except ValueError:  # also bad UTF-8
            raise broken from None
    if not isinstance(header, dict):
        raise broken
    return header, 8 + header_len


def _stored_entry(path: Path, name: str, info: Any, data_start: int) -> _Stored:
    malformed = f"{path}: the header entry of {name} is malformed; re-download or re-export the file."
    try:
        begin, end = (int(x) for x in info["data_offsets"])
        shape = tuple(int(d) for d in info["shape"])
        entry = _Stored(path, str(info["dtype"]), shape, data_start + begin, data_start + end)
    except (KeyError, TypeError, ValueError):
        raise WeightsError(malformed) from None
    stored_as = _STORED_AS.get(entry.dtype)
    if stored_as is not None and entry.stop - entry.start != math.prod(shape) * stored_as.itemsize:
        raise WeightsError(malformed)
    return entry


class GGUFLayerReader(LayerReader):
    """A ``.gguf`` file; a tensor is dequantized only when asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._gguf = gguf_convert.open_gguf(self.path)
        self.config = LlamaConfig.from_hf_dict(gguf_convert.config_from_gguf(self._gguf))
        self._tensors = gguf_convert.hf_tensors(self._gguf)

    def check(self) -> None:
        for name, shape in expected_shapes(self.config).items():
            tensor = self._tensor(name)
            if gguf_convert.hf_shape(tensor) != shape:
                raise WeightsError(
                    f"{self.path}: tensor {tensor.name} ({name}) has shape {gguf_convert.hf_shape(tensor)}, "
                    f"its metadata implies {shape}; re-download or re-convert the file."
                )
            try:  # one row: an unsupported quantization fails here, not half-way through a run
                gguf_convert.dequantized_rows(tensor, np.array([0]))
            except NotImplementedError:
                raise WeightsError(
                    f"{self.path}: tensor {tensor.name} is {tensor.tensor_type.name}, which gguf cannot "
                    "dequantize; use a file of another quantization."
                ) from None

    def _tensor(self, name: str):
        tensor = self._tensors.get(name)
        if tensor is None:
            raise WeightsError(f"{self.path} lacks the tensor of {name}; re-download or re-convert the file.")
        return tensor

    def tensor(self, name: str) -> np.ndarray:
        return gguf_convert.to_hf_array(self.config, name, self._tensor(name))

    def embed_rows(self, ids: np.ndarray) -> np.ndarray:
        rows = gguf_convert.dequantized_rows(self._tensor(EMBED), self._flat_ids(ids))
        return self._as_held(rows.reshape(*np.shape(ids), self.config.hidden_size))


def random_folder(source: "cards.ModelSource", dtype: str = "float32") -> Path:
    """Where a ``random`` source's weights are written: ``<cache>/random/<name>-seed<seed>-<dtype>``."""
    return cards.cache_dir() / "random" / f"{source.name}-seed{source.random_weights['seed']}-{dtype}"


def open_reader(source: "cards.ModelSource", dtype: str = "float32", progress: bool = True) -> LayerReader:
    """A layer reader of the source's weights. ``random`` sources are written to
    :func:`random_folder` first (once; ``dtype`` is the written precision)."""
    if source.kind == "hf":
        return SafetensorsReader(source.weights_path)
    if source.kind == "gguf":
        return GGUFLayerReader(source.weights_path)
    if source.kind == "random":
        spec = source.random_weights
        folder = random_folder(source, dtype)
        return SafetensorsReader(write_random_folder(source.config, spec["seed"], folder, dtype, spec["std"], progress))
    raise ValueError(f"model source kind {source.kind!r} has no layer reader (hf, gguf or random).")


# --------------------------------------------------------------------------- writing


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
    std: float = cards.RANDOM_STD,
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
