"""Where calibration and evaluation text comes from: the Hugging Face Hub, or a local folder.

By default text is loaded through ``datasets`` from the Hub, with the files the pruning
literature (Wanda, SparseGPT) uses. A local folder replaces the Hub when one is given
(``data_dir=...``, the CLI's ``--data-dir``) or when ``NLPRUNE_DATA_DIR`` is set; the
explicit argument wins. The folder mirrors the Hub's file names, so the same documents come
out either way:

* C4: ``c4-train.*.json.gz`` / ``c4-validation.*.json.gz`` in DIR or DIR/c4 (several
  shards are sorted by name and all used), read with ``datasets.load_dataset("json")``.
* WikiText-2 (raw): ``wiki.test.raw`` (``wiki.valid.raw``, ``wiki.train.raw``) in DIR or
  DIR/wikitext-2-raw, split into rows exactly as the Hub's ``wikitext-2-raw-v1`` rows were
  made from that file.

Every load returns the texts and a provenance dict naming the files used (local: path and
sha256; Hub: repo id, data files and the resolved commit).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, overload

import pyarrow as pa
import pyarrow.compute as pc

DATA_DIR_ENV = "NLPRUNE_DATA_DIR"
HUB_PROBE_TIMEOUT_S = 3.0


class DataError(ValueError):
    """Text for calibration or evaluation cannot be found, read or cut as asked."""


@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset is found on the Hub and in a local folder."""

    name: str
    title: str
    hub_repo: str
    hub_config: str | None
    hub_data_files: dict[str, str]  # split -> file in the Hub repo (empty: the config's own)
    local_subdir: str
    local_files: dict[str, tuple[str, ...]]  # split -> glob patterns, in order of preference
    join: str  # separator between documents/rows when evaluation joins them
    eval_split: str
    eval_max_docs: int | None  # documents joined for evaluation by the literature's protocol


C4 = DatasetSpec(
    name="c4",
    title="C4 (en)",
    hub_repo="allenai/c4",
    hub_config=None,
    hub_data_files={
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    },
    local_subdir="c4",
    local_files={
        "train": ("c4-train.*.json.gz", "c4-train.*.json"),
        "validation": ("c4-validation.*.json.gz", "c4-validation.*.json"),
    },
    join=" ",
    eval_split="validation",
    # Wanda and SparseGPT join the first 1100 validation documents: ~500k Llama-3 tokens,
    # enough for 128 x 2048, and it avoids tokenizing the whole 45k-document shard.
    eval_max_docs=1100,
)

WIKITEXT2 = DatasetSpec(
    name="wikitext2",
    title="WikiText-2 (raw)",
    # "wikitext" on the Hub redirects here; the canonical id survives the redirect's removal.
    hub_repo="Salesforce/wikitext",
    hub_config="wikitext-2-raw-v1",
    hub_data_files={},
    local_subdir="wikitext-2-raw",
    local_files={
        "test": ("wiki.test.raw",),
        "validation": ("wiki.valid.raw",),
        "train": ("wiki.train.raw",),
    },
    join="\n\n",
    eval_split="test",
    eval_max_docs=None,
)

DATASETS: dict[str, DatasetSpec] = {"c4": C4, "wikitext2": WIKITEXT2}
_ALIASES = {
    "c4": "c4",
    "wikitext2": "wikitext2",
    "wikitext-2": "wikitext2",
    "wikitext": "wikitext2",
    "wikitext-2-raw-v1": "wikitext2",
}


def get_spec(dataset: str) -> DatasetSpec:
    """The spec for a dataset name (``c4``, ``wikitext2`` and a few spellings of it)."""
    key = _ALIASES.get(dataset.strip().lower())
    if key is None:
        raise DataError(
            f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}."
        )
    return DATASETS[key]


class Texts(Sequence[str]):
    """Documents as a read-only sequence backed by an Arrow column.

    The Hub's C4 train shard holds ~356k documents (~800 MB of text): keeping them in the
    memory-mapped Arrow table and decoding only the documents drawn avoids copying it all
    into Python strings.
    """

    def __init__(self, column: pa.ChunkedArray | pa.Array | Sequence[str]):
        if isinstance(column, pa.Array):
            column = pa.chunked_array([column])
        elif not isinstance(column, pa.ChunkedArray):
            column = pa.chunked_array([pa.array(list(column), type=pa.string())])
        self._column = column

    def __len__(self) -> int:
        return len(self._column)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[k] for k in range(start, stop, step)]
            return [t or "" for t in self._column.slice(start, stop - start).to_pylist()]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        return self._column[i].as_py() or ""

    def __iter__(self) -> Iterator[str]:
        for chunk in self._column.iterchunks():
            for t in chunk.to_pylist():
                yield t or ""

    def max_utf8_bytes(self) -> int:
        """Length in bytes of the longest document (vectorised; no Python strings made)."""
        if len(self) == 0:
            return 0
        m = pc.max(pc.binary_length(self._column)).as_py()
        return int(m or 0)


# --------------------------------------------------------------------------------------
# Locating the data


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The local data folder to use: the argument, else ``$NLPRUNE_DATA_DIR``, else None (Hub).

    Raises DataError if the chosen folder does not exist.
    """
    origin = "data_dir argument"
    if data_dir is None or str(data_dir) == "":
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        if not env:
            return None
        data_dir, origin = env, f"${DATA_DIR_ENV}"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise DataError(
            f"data folder {str(path)!r} (from the {origin}) {what}. Pass --data-dir / set "
            f"{DATA_DIR_ENV} to a folder holding the data files, or unset it to use the Hub."
        )
    return path.resolve()


def find_local_files(spec: DatasetSpec, split: str, data_dir: Path) -> list[Path]:
    """The files of ``split`` in DIR or DIR/<subdir> (first folder with a match), sorted."""
    patterns = _local_patterns(spec, split)
    folders = [data_dir, data_dir / spec.local_subdir]
    for folder in folders:
        if not folder.is_dir():
            continue
        for pattern in patterns:
            found = sorted(p for p in folder.glob(pattern) if p.is_file())
            if found:
                return found
    raise DataError(
        f"no {spec.title} {split} files in the data folder: looked for "
        f"{' or '.join(repr(p) for p in patterns)} in {', '.join(repr(str(f)) for f in folders)}. "
        f"Put the files there (named as the Hub names them), or point --data-dir / "
        f"{DATA_DIR_ENV} at the folder that holds them."
    )


def _local_patterns(spec: DatasetSpec, split: str) -> tuple[str, ...]:
    try:
        return spec.local_files[split]
    except KeyError:
        raise DataError(
            f"{spec.title} has no split {split!r}; it has {sorted(spec.local_files)}."
        ) from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Loading


def load_texts(
    dataset: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
) -> tuple[Texts, dict[str, Any]]:
    """Documents (C4) or rows (WikiText-2) of one split, and where they came from.

    ``data_dir`` (else ``$NLPRUNE_DATA_DIR``) selects a local folder; without either, the
    Hub is used (``revision`` pins a Hub commit/branch; ignored for local folders).
    """
    spec = get_spec(dataset)
    _local_patterns(spec, split)  # reject unknown splits before touching disk or network
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        files = find_local_files(spec, split, folder)
        if spec is WIKITEXT2:
            texts = Texts(_read_wikitext_rows(files[0]))
        else:
            texts = _load_json_shards(files)
        prov: dict[str, Any] = {
            "dataset": spec.name,
            "split": split,
            "source": "local",
            "data_dir": str(folder),
            "files": [{"path": str(p), "sha256": sha256_file(p)} for p in files],
        }
    else:
        texts, prov = _load_hub(spec, split, revision)
    prov["num_docs"] = len(texts)
    return texts, prov


def wikitext_rows(lines: Sequence[str]) -> list[str]:
    """Rows as the Hub made them from a raw WikiText file's lines.

    Each row is one line with its newline kept; a line holding only whitespace becomes "".
    """
    return [line if line.strip() else "" for line in lines]


def _read_wikitext_rows(path: Path) -> list[str]:
    # Text mode with universal newlines, as the Hub's builder read the file.
    try:
        with open(path, encoding="utf-8") as f:
            rows = wikitext_rows(list(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}); is it the raw WikiText file?") from e
    if not rows:
        raise DataError(f"{path} is empty; replace it with the WikiText-2 raw file.")
    return rows


def _open_shard(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _check_json_shard(path: Path) -> None:
    """Fail early, naming the file, on an empty or non-JSON-lines shard."""
    try:
        with _open_shard(path) as f:
            first = next((line for line in f if line.strip()), None)
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read shard {path}: {e}. Replace it with a valid shard.") from e
    if first is None:
        raise DataError(f"shard {path} is empty (no documents). Replace or remove it.")
    try:
        record = json.loads(first)
    except json.JSONDecodeError as e:
        raise DataError(
            f"shard {path} is not JSON lines ({e}); expected one JSON object per line with a "
            "'text' field, as C4 ships them."
        ) from e
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(
            f"shard {path} has no 'text' field in its first record; expected C4's JSON lines "
            "(text, timestamp, url)."
        )


def _load_json_shards(files: list[Path]) -> Texts:
    import datasets  # heavy import: only when data is actually loaded

    for path in files:
        _check_json_shard(path)
    try:
        ds = datasets.load_dataset(
            "json", data_files={"data": [str(p) for p in files]}, split="data"
        )
    except Exception as e:  # datasets wraps parse errors in several exception types
        names = ", ".join(str(p) for p in files)
        raise DataError(f"datasets could not read the JSON shards {names}: {e}") from e
    return _text_column(ds, what=", ".join(str(p) for p in files))


def _text_column(ds: Any, what: str) -> Texts:
    if "text" not in ds.column_names:
        raise DataError(f"{what} has no 'text' column (columns: {ds.column_names}).")
    return Texts(ds.data.column("text"))


# --------------------------------------------------------------------------------------
# The Hub


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub opens quickly.

    ``datasets`` retries an unreachable Hub for ~25 s before failing; this probe lets an
    offline user get the "pass --data-dir" message at once. Behind a proxy the probe would
    say nothing useful, so it reports reachable and lets ``datasets`` try.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(_hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_hint(spec: DatasetSpec, split: str, offline: bool) -> str:
    patterns = " or ".join(spec.local_files.get(split, ()))
    hint = (
        f"Pass --data-dir DIR or set {DATA_DIR_ENV}=DIR, where DIR (or DIR/{spec.local_subdir}) "
        f"holds {patterns}"
    )
    if offline:
        return hint + " (HF_HUB_OFFLINE is set, so only the datasets cache was tried)."
    return hint + "; or, if the Hub copy is already in the datasets cache, set HF_HUB_OFFLINE=1."


def _load_hub(spec: DatasetSpec, split: str, revision: str | None) -> tuple[Texts, dict]:
    import datasets

    data_files = (
        {split: spec.hub_data_files[split]} if spec.hub_data_files.get(split) else None
    )
    where = f"{spec.hub_repo}" + (f" ({spec.hub_config})" if spec.hub_config else "")
    offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    if not offline and not hub_reachable():
        raise DataError(
            f"cannot reach the Hugging Face Hub ({_hub_endpoint()}) to load {spec.title} "
            f"{split} from {where}, and no local data folder was given. "
            + _offline_hint(spec, split, offline)
        )
    try:
        # load_dataset, split in two so the resolved commit can be recorded.
        builder = datasets.load_dataset_builder(
            spec.hub_repo, name=spec.hub_config, data_files=data_files, revision=revision
        )
        builder.download_and_prepare()
        ds = builder.as_dataset(split=split)
    except Exception as e:  # network, auth, missing repo or file: all end the same way
        raise DataError(
            f"could not load {spec.title} {split} from the Hub ({where}): "
            f"{type(e).__name__}: {e}. " + _offline_hint(spec, split, offline)
        ) from e
    resolved: list[str] = []
    try:
        resolved = [str(f) for f in builder.config.data_files[split]]
    except Exception:  # provenance is best-effort; the data itself loaded fine
        pass
    prov = {
        "dataset": spec.name,
        "split": split,
        "source": "hub",
        "hub": {
            "repo_id": spec.hub_repo,
            "config": spec.hub_config,
            "data_files": data_files,
            "revision": revision,
            "commit": getattr(builder, "hash", None),
        },
        # Hub files are identified by their resolved URL (it carries the commit).
        "files": [{"path": p, "sha256": None} for p in resolved],
    }
    return _text_column(ds, what=where), prov

