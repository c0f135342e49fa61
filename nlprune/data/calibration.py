"""Calibration text from any source: C4 (the default), WikiText-2, or a local file.

``--calib-dataset`` names a dataset or a file: ``.jsonl`` / ``.jsonl.gz`` / ``.json.gz`` (JSON
lines, one object with a string ``text`` a line) or ``.txt`` (the whole file one document).
The windows are drawn from the documents by the same seeded protocol as C4's
(:func:`nlprune.data.windows.calibration_windows`); the file's sha256 is recorded.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sources import C4, DATASETS, DataError, Texts, get_spec, load_texts, sha256_file

CALIBRATION_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".txt")


@dataclass(frozen=True)
class CalibrationSource:
    """Where calibration windows are drawn from: a dataset by name (``c4``, ``wikitext2``)
    or a local file (``path``)."""

    name: str  # "c4", "wikitext2" or "file"
    path: Path | None = None

    @property
    def title(self) -> str:
        return str(self.path) if self.path is not None else {"c4": "C4 train", "wikitext2": "WikiText-2 train"}[self.name]


def calibration_source(value: str | os.PathLike[str] | None) -> CalibrationSource:
    """``--calib-dataset``: ``c4`` (default), ``wikitext2``, or a ``.jsonl`` / ``.json.gz`` /
    ``.jsonl.gz`` file (JSON lines with a ``text`` field) or a ``.txt`` file (one document).
    A file that is absent or of another kind is refused here, before anything is loaded."""
    if value is None or str(value).strip().lower() in ("", "c4"):
        return CalibrationSource("c4")
    try:
        return CalibrationSource(get_spec(str(value)).name)
    except DataError:
        pass  # not a dataset's name: a file
    path = Path(value).expanduser()
    if not path.name.endswith(CALIBRATION_FILE_SUFFIXES):
        raise DataError(
            f"--calib-dataset {str(value)!r} is neither a dataset ({', '.join(sorted(DATASETS))}) nor a file "
            f"ending in {', '.join(CALIBRATION_FILE_SUFFIXES)}."
        )
    if not path.is_file():
        raise FileNotFoundError(f"--calib-dataset file {path} does not exist (or is not a file).")
    return CalibrationSource("file", path.resolve())


def load_text_file(path: Path) -> tuple[Texts, dict[str, Any]]:
    """The documents of a calibration file and its provenance (path, sha256): JSON lines (one
    object with a string ``text`` per line; ``.gz`` gzipped) or plain UTF-8 text (the whole
    file one document)."""
    path = Path(path)
    try:
        if path.name.endswith(".txt"):
            docs = [path.read_text(encoding="utf-8")]
            kind = "txt"
        else:
            docs, kind = _read_json_lines(path), "jsonl"
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e}).") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}.") from None
    if not any(d.strip() for d in docs):
        raise DataError(f"{path} holds no text; give a file with documents to calibrate on.")
    prov = {
        "dataset": "file", "split": None, "source": "local", "format": kind, "data_dir": None,
        "files": [{"path": str(path), "sha256": sha256_file(path)}], "num_docs": len(docs),
    }
    return Texts(docs), prov


def _read_json_lines(path: Path) -> list[str]:
    docs = []
    opened = gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")
    with opened as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {number} is not JSON ({e}); expected one object with a 'text' field a line.") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path} line {number} has no string 'text' field; expected one object with a 'text' field a line.")
            docs.append(record["text"])
    return docs


def load_calibration_texts(source: CalibrationSource, data_dir: str | os.PathLike[str] | None = None, *,
                           revision: str | None = None) -> tuple[Texts, dict[str, Any]]:
    """The documents calibration windows are drawn from: C4 train, WikiText-2 train (its rows
    joined by one space into one document, as SparseGPT joins them), or a file's documents."""
    if source.name == "file":
        return load_text_file(source.path)
    if source.name == "c4":
        return load_texts(C4.name, "train", data_dir, revision=revision)
    rows, prov = load_texts(source.name, "train", data_dir, revision=revision)
    prov["join"] = " "
    return Texts([" ".join(rows)]), prov
