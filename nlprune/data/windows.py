"""Token windows for calibration (random windows of C4 train or any text) and evaluation (contiguous).

Both follow the protocol of Wanda's and SparseGPT's ``get_c4`` so numbers are comparable
with the literature:

* calibration: with Python's ``random`` seeded once, draw a random document until one
  tokenizes to more than ``seqlen`` tokens, then a random start inside it; repeat
  ``nsamples`` times.
* evaluation: join the documents (C4: one space; WikiText-2: a blank line between rows),
  tokenize the whole string once, cut non-overlapping ``seqlen`` windows from the start.

Tokenization is ``tokenizer(text).input_ids`` with the tokenizer's default special tokens
(Llama adds BOS to every call), exactly as those codebases call it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from .calibration import CalibrationSource, calibration_source, load_calibration_texts
from .sources import DataError, Texts, get_spec, load_texts

CACHE_DIR_ENV = "NLPRUNE_CACHE_DIR"
_CACHE_FORMAT = 2  # bump when the cached arrays' meaning changes
_CACHE_SCHEMA = "nlprune-token-cache"
# Any short text with a space, digits and punctuation: its ids capture the Python-side
# options (add_bos_token, ...) that change the ids without changing the backend's JSON.
_PROBE = "nlprune probe: Hello world, 2024!"


# --------------------------------------------------------------------------------------
# Argument checks


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{name} must be an integer, got {value!r}.")
    if value < minimum:
        raise DataError(f"{name} must be at least {minimum}, got {value}.")
    return int(value)


def check_seqlen(seqlen: Any, max_seqlen: int | None) -> int:
    # Two tokens is the least that gives one next-token prediction.
    seqlen = _check_int("seqlen", seqlen, 2)
    if max_seqlen is not None and seqlen > max_seqlen:
        raise DataError(
            f"seqlen {seqlen} is longer than the model's context of {max_seqlen} tokens; "
            f"use a seqlen of at most {max_seqlen}."
        )
    return seqlen


def _ids(tokenizer: Any, text: str, **kwargs: Any) -> list[int]:
    return list(tokenizer(text, **kwargs).input_ids)


# --------------------------------------------------------------------------------------
# Calibration


def calibration_windows(
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    dataset: str | os.PathLike[str] | CalibrationSource | None = None,
    max_seqlen: int | None = None,
    revision: str | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``nsamples`` random windows of ``seqlen`` tokens from documents longer than ``seqlen``.

    Wanda/SparseGPT's protocol, draw for draw: for the same documents, tokenizer, seed,
    nsamples and seqlen the windows are identical on every machine and in every process.
    ``dataset``: C4 train (default), ``wikitext2`` (its train rows as one document), or a
    local ``.jsonl`` / ``.json.gz`` / ``.txt`` file (:func:`~nlprune.data.sources.calibration_source`);
    a file or WikiText-2 must hold at least ``nsamples * seqlen`` tokens in documents longer
    than ``seqlen``. Returns an int32 array (nsamples, seqlen) and a provenance dict (which
    documents and start offsets were drawn, the files and their sha256, the seed).
    """
    nsamples = _check_int("nsamples", nsamples, 1)
    seqlen = check_seqlen(seqlen, max_seqlen)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"seed must be an integer, got {seed!r}.")
    if seed < 0:  # random.Random(-s) draws what random.Random(s) draws
        raise DataError(f"seed must be >= 0, got {seed} (a negative seed would repeat seed {-seed}'s windows).")
    seed = int(seed)
    source = dataset if isinstance(dataset, CalibrationSource) else calibration_source(dataset)
    docs, prov = load_calibration_texts(source, data_dir, revision=revision)
    if source.name == "c4":  # documents are tokenized as they are drawn
        _check_some_doc_can_be_long_enough(tokenizer, docs, seqlen)
        ids_of = lambda i: _ids(tokenizer, docs[i], verbose=False)  # noqa: E731
    else:  # tokenized up front: too little text is refused before any draw, saying how much there is
        all_ids = _tokenize_all(tokenizer, docs, source.title, progress)
        _check_enough_text(all_ids, nsamples, seqlen, source.title)
        ids_of = all_ids.__getitem__
    windows, drawn = _draw_windows(ids_of, len(docs), nsamples, seqlen, seed, source.title)
    prov.update(
        purpose="calibration",
        protocol="Wanda/SparseGPT get_c4: random doc with > seqlen tokens, random start",
        seed=seed,
        nsamples=nsamples,
        seqlen=seqlen,
        join=prov.get("join"),
        **drawn,
        tokenizer=tokenizer_fingerprint(tokenizer),
    )
    return windows, prov


def _draw_windows(
    ids_of: Callable[[int], list[int]], n_docs: int, nsamples: int, seqlen: int, seed: int, title: str,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The seeded draws: a random document until one has more than ``seqlen`` tokens, then a
    random start in it; ``nsamples`` times."""
    rng = random.Random(seed)  # same stream as random.seed(seed) + random.randint
    too_short: set[int] = set()  # memo: redrawing a known-short document skips tokenizing it
    longest = 0
    windows = np.empty((nsamples, seqlen), dtype=np.int32)
    doc_indices: list[int] = []
    starts: list[int] = []
    doc_tokens: list[int] = []
    draws = 0
    for k in range(nsamples):  # fast (a few docs tokenized per window): no progress bar
        while True:
            i = rng.randint(0, n_docs - 1)
            draws += 1
            if i in too_short:
                continue
            ids = ids_of(i)
            if len(ids) > seqlen:
                break
            too_short.add(i)
            longest = max(longest, len(ids))
            if len(too_short) == n_docs:
                raise DataError(
                    f"no {title} document is longer than seqlen={seqlen} tokens (all "
                    f"{n_docs} checked; the longest has {longest}). Use a smaller seqlen "
                    "or more/longer training documents."
                )
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows[k] = _as_int32(ids[start : start + seqlen])
        doc_indices.append(i)
        starts.append(start)
        doc_tokens.append(len(ids))
    drawn = dict(doc_indices=doc_indices, starts=starts, doc_tokens=doc_tokens,
                 total_tokens=int(sum(doc_tokens)),  # tokens in the drawn documents
                 draws=draws)
    return windows, drawn


def _tokenize_all(tokenizer: Any, docs: Texts, title: str, progress: bool, chunk: int = 256) -> list[list[int]]:
    out: list[list[int]] = []
    with tqdm(total=len(docs), unit="doc", disable=not progress, desc=f"tokenizing {title}", leave=False) as bar:
        for start in range(0, len(docs), chunk):
            texts = docs[start : start + chunk]
            out.extend(list(ids) for ids in tokenizer(texts, verbose=False).input_ids)
            bar.update(len(texts))
    return out


def _check_enough_text(all_ids: list[list[int]], nsamples: int, seqlen: int, title: str) -> None:
    """Refuse a source with fewer than nsamples x seqlen tokens in documents longer than seqlen."""
    long_enough = [len(ids) for ids in all_ids if len(ids) > seqlen]
    need = nsamples * seqlen
    if sum(long_enough) < need:
        total = sum(len(ids) for ids in all_ids)
        raise DataError(
            f"{title} holds {len(all_ids)} document(s), {total} tokens; {len(long_enough)} of them are longer "
            f"than seqlen={seqlen} tokens, {sum(long_enough)} tokens in all: fewer than --nsamples x --seqlen "
            f"= {nsamples} x {seqlen} = {need}. Give more text, or fewer or shorter windows."
        )


def _check_some_doc_can_be_long_enough(tokenizer: Any, docs: Texts, seqlen: int) -> None:
    """Refuse at once when no document can reach seqlen, instead of drawing forever.

    Byte-level BPE and SentencePiece byte-fallback tokens each cover at least one byte, so a
    document of B bytes gives at most ~B tokens plus the special ones; the margin of 4x keeps
    this check sound for normalizers that expand text. The draw loop itself stops once every
    document has been seen too short, so this is only the fast path.
    """
    if len(docs) == 0:
        raise DataError("the C4 train data holds no documents.")
    specials = len(_ids(tokenizer, ""))
    most_bytes = docs.max_utf8_bytes()
    if 4 * most_bytes + specials + 8 < seqlen:
        raise DataError(
            f"no C4 train document can be longer than seqlen={seqlen} tokens: the longest of "
            f"{len(docs)} documents has {most_bytes} bytes. Use a smaller seqlen."
        )


# --------------------------------------------------------------------------------------
# Evaluation


def eval_windows(
    tokenizer: Any,
    dataset: str,
    nsamples: int | None,
    seqlen: int,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    max_seqlen: int | None = None,
    max_docs: int | Literal["all"] | None = None,
    revision: str | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The first ``nsamples`` non-overlapping ``seqlen``-token windows of the joined eval text.

    ``dataset``: "c4" (validation documents joined by one space) or "wikitext2" (test rows
    joined by "\\n\\n"). ``nsamples=None`` takes every full window. ``max_docs``: how many
    documents/rows are joined; None follows the literature (C4: the first 1100, as Wanda and
    SparseGPT; WikiText-2: all), "all" takes every one, an int the first that many.
    Token ids are cached on disk (``cache_dir``, else ``$NLPRUNE_CACHE_DIR``, else
    ``~/.cache/nlprune/tokens``), keyed by the tokenizer and the exact joined text; an entry
    is verified (schema, key, checksum) before use, and a bad one is named and rebuilt.
    ``use_cache=False`` re-tokenizes (and rewrites the entry).
    Returns an int32 array (n, seqlen) and a provenance dict.
    """
    if nsamples is not None:
        nsamples = _check_int("nsamples", nsamples, 1)
    seqlen = check_seqlen(seqlen, max_seqlen)
    spec = get_spec(dataset)
    split = spec.eval_split
    if max_docs is None:
        limit = spec.eval_max_docs
    elif max_docs == "all":
        limit = None
    else:
        limit = _check_int("max_docs", max_docs, 1)

    docs, prov = load_texts(spec.name, split, data_dir, revision=revision)
    if len(docs) == 0:
        raise DataError(f"the {spec.title} {split} data holds no documents.")
    used = docs[: len(docs) if limit is None else min(limit, len(docs))]
    text = spec.join.join(used)
    ids, cache = cached_tokens(tokenizer, text, f"{spec.name}-{split}", spec.join, cache_dir=cache_dir,
                               use_cache=use_cache, progress=progress, desc=f"tokenizing {spec.title} {split}")
    windows, n, available = cut_windows(ids, nsamples, seqlen, f"{spec.title} {split}")
    prov.update(
        purpose="evaluation",
        protocol="Wanda/SparseGPT: join, tokenize once, non-overlapping windows from the start",
        nsamples=n,
        seqlen=seqlen,
        join=spec.join,
        docs_used=len(used),
        text_sha256=cache["text_sha256"],
        total_tokens=int(ids.shape[0]),
        windows_available=available,
        tokenizer=cache["tokenizer"],
        cache={"path": cache["path"], "hit": cache["hit"]},
    )
    return windows, prov


def cached_tokens(
    tokenizer: Any, text: str, name: str, join: str, *, cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True, progress: bool = True, desc: str = "tokenizing",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Token ids of ``text`` (int32), from the token cache when an intact entry exists.

    The entry is keyed by the tokenizer and the exact text (``name`` and ``join`` name it and
    record how it was joined); it is verified (schema, key, checksum) before use, and a bad
    one is named and rebuilt. ``use_cache=False`` re-tokenizes (and rewrites the entry).
    Returns the ids and {path, hit, text_sha256, tokenizer}."""
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    tok_id = tokenizer_fingerprint(tokenizer)
    key = _sha256_json({"format": _CACHE_FORMAT, "tokenizer": tok_id, "text_sha256": text_sha, "join": join,
                        "name": name})
    cache_path = resolve_cache_dir(cache_dir) / f"{name}-{key[:32]}.npz"
    ids = _load_cached(cache_path, key) if use_cache else None
    hit = ids is not None
    if ids is None:
        with tqdm(total=len(text), unit="char", unit_scale=True, disable=not progress, desc=desc, leave=False) as bar:
            # verbose=False: the "longer than the model's maximum" warning is expected here,
            # the text is cut into windows afterwards.
            ids = _as_int32(_ids(tokenizer, text, verbose=False))
            bar.update(len(text))
        _save_cached(cache_path, ids, key)
    return ids, {"path": str(cache_path), "hit": hit, "text_sha256": text_sha, "tokenizer": tok_id}


def cut_windows(ids: np.ndarray, nsamples: int | None, seqlen: int, what: str) -> tuple[np.ndarray, int, int]:
    """The first ``nsamples`` non-overlapping ``seqlen``-token windows of ``ids`` (None: every
    full window), the number taken and the number available; a clear error when too few."""
    total = int(ids.shape[0])
    available = total // seqlen
    if nsamples is None:
        if available == 0:
            raise DataError(
                f"{what} gives {total} tokens, fewer than one window of seqlen={seqlen}. Use a smaller "
                "seqlen or more documents."
            )
        n = available
    elif nsamples > available:
        raise DataError(
            f"{what} gives {total} tokens, i.e. {available} windows of {seqlen} tokens, but {nsamples} "
            "were asked for. Ask for at most that many windows, a shorter seqlen, or more documents."
        )
    else:
        n = nsamples
    return ids[: n * seqlen].reshape(n, seqlen), n, available


# --------------------------------------------------------------------------------------
# Tokenizer identity and the token cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 identifying what a tokenizer does, for cache keys and provenance.

    A fast tokenizer is identified by its full serialized pipeline (normalizer,
    pre-tokenizer, model, post-processor); a slow one by its name and vocabulary. Both add
    the ids of a probe string, which catch Python-side options outside the serialization.
    """
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    to_str = getattr(backend, "to_str", None)
    if callable(to_str):
        h.update(b"backend\0" + to_str().encode("utf-8"))
    else:
        name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
        h.update(b"slow\0" + name.encode("utf-8") + b"\0")
        get_vocab = getattr(tokenizer, "get_vocab", None)
        if callable(get_vocab):
            h.update(json.dumps(sorted(get_vocab().items())).encode("utf-8"))
    h.update(b"\0probe\0" + json.dumps([int(t) for t in _ids(tokenizer, _PROBE)]).encode())
    return h.hexdigest()


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The token cache folder: the argument, else ``$NLPRUNE_CACHE_DIR``, else ~/.cache/nlprune/tokens."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return Path(base).expanduser() / "nlprune" / "tokens"


def _load_cached(path: Path, key: str) -> np.ndarray | None:
    """The cached ids if the entry is ours, for this key, and intact; else None (a damaged
    entry is named in a warning and rebuilt by the caller)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as entry:
            meta = json.loads(entry["meta"].tobytes().decode("utf-8"))
            ids = entry["ids"]
    except (OSError, ValueError, KeyError, UnicodeDecodeError, EOFError, zipfile.BadZipFile) as e:
        problem = f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    else:
        if not isinstance(meta, dict) or meta.get("schema") != _CACHE_SCHEMA or meta.get("key") != key:
            problem = "not a token cache entry for this text and tokenizer"
        elif ids.ndim != 1 or ids.dtype != np.int32:
            problem = f"unexpected {ids.dtype} {ids.shape}"
        elif hashlib.sha256(ids.tobytes()).hexdigest() != meta.get("sha256"):
            problem = "its checksum does not match (damaged)"
        else:
            return ids
    warnings.warn(f"ignoring the token cache {path}: {problem}; tokenizing again.", stacklevel=3)
    return None


def _save_cached(path: Path, ids: np.ndarray, key: str) -> None:
    """Write atomically (temp file + rename) so a crash or a parallel run never leaves half a file."""
    meta = {"schema": _CACHE_SCHEMA, "key": key, "sha256": hashlib.sha256(ids.tobytes()).hexdigest()}
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            dir=path.parent, prefix=path.stem + ".", suffix=".tmp", delete=False
        ) as f:
            tmp_name = f.name
            np.savez(f, ids=ids, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8))
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as e:  # a read-only cache must not stop an evaluation
        warnings.warn(f"could not write token cache {path}: {e}", stacklevel=3)
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


def _as_int32(ids: list[int]) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= 2**31):
        raise DataError(f"token ids outside int32 range ({arr.min()}..{arr.max()}).")
    return arr.astype(np.int32)


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()
