"""Weights read one decoder layer at a time.

Streaming mode prunes a model larger than memory: each decoder layer is read from disk only
when its turn comes. :func:`nlprune.cards.open_reader` gives a :class:`LayerReader` for a
:class:`~nlprune.cards.ModelSource`:

* ``hf``: the folder's safetensors files are memory-mapped here (an 8-byte little-endian
  header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the data), so
  only the tensors asked for are read;
* ``gguf``: ``gguf``'s reader memory-maps the file; a layer's tensors are dequantized (and
  their q/k rows unpermuted, as :func:`nlprune.convert.gguf.read_gguf` does) when asked for;
* ``random``: the seeded random weights are first written, layer by layer, to an HF-layout
  folder in the cache (:func:`nlprune.convert.random_weights.write_random_folder`), then read
  like ``hf``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nlprune.convert import gguf as gguf_convert
from nlprune.convert.hf import EMBED, INDEX_FILE, WeightsError, expected_shapes, layer_from_state, read_config, shell_from_state
from nlprune.modeling.llama import DecoderLayer, LlamaConfig, LlamaForCausalLM, with_layers
from nlprune.modeling.precision import cast_layer, cast_model, storage_dtype


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
