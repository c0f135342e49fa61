"""The dense model's perplexity, cached on disk and verified before it is trusted.

Every pruning run with --eval reports the unpruned model's perplexity on the same windows;
computing it once per protocol is enough. An entry is keyed by the weights, the windows and
the code the dense forward runs (:func:`forward_code_version`), and carries its own checksum.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nlprune import cards
from nlprune.eval.perplexity import perplexity, perplexity_streamed
from nlprune.runs import note, write_json


DENSE_CACHE_SCHEMA = "nlprune-dense-perplexity"
# What the dense forward's result depends on besides weights and windows (under nlprune/).
FORWARD_SOURCES = ("modeling", "convert", "eval/perplexity.py", "cards.py")


def forward_code_version(root: str | Path | None = None) -> str:
    """Hash of the nlprune sources the dense forward depends on, and of the jax version."""
    if root is None:
        return _installed_code_version()
    root = Path(root)
    h = hashlib.sha256(f"jax {jax.__version__}\0".encode())
    for rel in FORWARD_SOURCES:
        where = root / rel
        for f in sorted(where.rglob("*.py")) if where.is_dir() else [where]:
            h.update(f"{f.relative_to(root)}\0".encode() + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _installed_code_version() -> str:
    return forward_code_version(Path(__file__).parents[1])


@dataclasses.dataclass
class DensePerplexity:
    perplexity: float
    cached: bool  # read from the cache rather than computed now
    computed: str  # when it was computed (ISO date)
    path: str  # the cache entry


def _entry_checksum(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_dense_entry(path: Path, key: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(verified entry, None), or (None, why it cannot be trusted); (None, None) if absent."""
    if not path.is_file():
        return None, None
    try:
        entry = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"unreadable ({e})"
    if not isinstance(entry, dict) or entry.get("schema") != DENSE_CACHE_SCHEMA or entry.get("version") != 1:
        return None, "not a dense perplexity entry of this nlprune"
    if entry.get("sha256") != _entry_checksum(entry):
        return None, "its checksum does not match (edited or damaged)"
    if entry.get("key") != key:
        return None, "computed for another model, other windows or by other code"
    value = entry.get("perplexity")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1.0:
        return None, f"impossible perplexity {value!r}"
    return entry, None


def dense_perplexity(
    loaded: Any, windows: np.ndarray, batch_size: int = 8, progress: bool = True, use_cache: bool = True
) -> DensePerplexity:
    """The unpruned model's perplexity on ``windows``, cached on disk (every pruning run with
    --eval reports it; computing it once per protocol is enough).

    The entry is keyed by the weights, the windows and :func:`forward_code_version`, and holds
    its own checksum; one that is damaged, edited or from other code is named and
    recomputed. ``use_cache=False`` recomputes (and rewrites) it."""
    windows = np.ascontiguousarray(windows, np.int32)
    key = {
        "weights_sha256": loaded.source.weights_sha256(),
        "windows_sha256": hashlib.sha256(windows.tobytes()).hexdigest(),
        "windows_shape": list(windows.shape),
        "code_version": forward_code_version(),
    }
    if getattr(loaded, "dtype", "float32") != "float32":  # weights held in bfloat16 (--dtype)
        key["dtype"] = loaded.dtype
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cards.cache_dir() / "dense_perplexity" / f"{name}.json"
    if use_cache:
        entry, problem = _read_dense_entry(path, key)
        if entry is not None:
            return DensePerplexity(float(entry["perplexity"]), True, str(entry.get("computed")), str(path))
        if problem:
            note(f"ignoring the dense perplexity cache {path}: {problem}; recomputing it.")
    if loaded.model is None:  # a streamed run: the dense layers are read from disk one at a time
        reader = loaded.reader
        result = perplexity_streamed(reader.shell(), reader.layer, windows, batch_size=batch_size, progress=progress,
                                     desc="dense perplexity")
    else:
        result = perplexity(loaded.model, windows, batch_size=batch_size, progress=progress, desc="dense perplexity")
    entry = {
        "schema": DENSE_CACHE_SCHEMA, "version": 1, "key": key, "perplexity": result.perplexity,
        "tokens": result.tokens, "windows": result.windows, "seconds": result.seconds,
        "computed": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    entry["sha256"] = _entry_checksum(entry)
    try:
        write_json(path, entry)
    except OSError as e:  # a read-only cache must not fail the run
        note(f"could not write the dense perplexity cache {path}: {e.strerror or e}")
    return DensePerplexity(result.perplexity, False, entry["computed"], str(path))
