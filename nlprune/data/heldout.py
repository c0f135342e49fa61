"""Text for choosing and for checking: the validation split of C4, and text unlike it.

The three splits of C4 that nlprune keeps apart (docs/METHOD.md section 5):

  calibration  seeded windows drawn from C4 train documents (:func:`calibration_windows`);
  test         the first windows of the joined C4 validation documents, the protocol of Wanda
               and SparseGPT (:func:`eval_windows` with ``"c4"``): report on it, never choose;
  validation   (``"c4-validation"``) the C4 validation documents *after* the last one that
               the paper protocol's test windows (128 x 2048 tokens) read, joined the same way:
               every choice (defaults, recipes, studies, the attention-error metric) uses it.
               Neither protocol's test windows touch it, and both stay exactly as they are.

Out of distribution (local files of the zero-shot tasks, ``DIR/tasks``; no hub):

  ``"wikipedia"``  the BoolQ validation passages (Wikipedia paragraphs), each once, in file
                   order, joined by a blank line: the first half of them (a test set);
  ``"lambada"``    the LAMBADA test passages (fiction from novels), in file order, joined by a
                   blank line: the first half of them (a test set);
  ``"wikipedia-validation"``, ``"lambada-validation"``  the second halves, for choosing:
                   text of the same kinds that the reported sets never show. Wikipedia's is
                   split by article: passages of an article the first half reads are dropped
                   from it (:func:`ood_halves`).

Every set is cut like the test set: joined, tokenized once, non-overlapping windows from the
start (:func:`evaluation_windows` takes any of them by name).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nlprune.data.sources import C4, DataError, load_texts, resolve_data_dir, sha256_file
from nlprune.data.windows import check_seqlen, cached_tokens, cut_windows, eval_windows

# The largest test protocol (the paper's, 128 x 2048): validation starts after its text.
TEST_TOKENS = 128 * 2048
HELDOUT = ("c4-validation", "wikipedia", "lambada", "wikipedia-validation", "lambada-validation")
VALIDATION_SETS = ("c4-validation", "wikipedia-validation", "lambada-validation")  # for every choice
EVALUATION_SETS = ("c4", "wikitext2", *HELDOUT)
_OOD_FILES = {"wikipedia": ("boolq", "val.jsonl"), "lambada": ("lambada_openai", "lambada_test.jsonl")}


def evaluation_windows(
    tokenizer: Any, dataset: str, nsamples: int | None, seqlen: int, data_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Windows of any evaluation set by name (:data:`EVALUATION_SETS`): the test sets ``c4`` and
    ``wikitext2`` (:func:`eval_windows`), the validation split ``c4-validation``, and the
    out-of-distribution ``wikipedia`` and ``lambada``. Keyword arguments as eval_windows'."""
    if dataset in HELDOUT:
        return heldout_windows(tokenizer, dataset, nsamples, seqlen, data_dir, **kwargs)
    if dataset not in EVALUATION_SETS:
        raise DataError(f"unknown evaluation set {dataset!r}; choose from {', '.join(EVALUATION_SETS)}.")
    return eval_windows(tokenizer, dataset, nsamples, seqlen, data_dir, **kwargs)


def heldout_windows(
    tokenizer: Any, dataset: str, nsamples: int | None, seqlen: int, data_dir: str | os.PathLike[str] | None = None,
    *, max_seqlen: int | None = None, progress: bool = True, use_cache: bool = True, cache_dir: Any = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The first ``nsamples`` non-overlapping ``seqlen``-token windows of a held-out set."""
    seqlen = check_seqlen(seqlen, max_seqlen)
    if dataset == "c4-validation":
        docs, prov = validation_documents(tokenizer, data_dir)
    elif dataset.removesuffix("-validation") in _OOD_FILES:
        kind = dataset.removesuffix("-validation")
        docs, prov = ood_documents(kind, data_dir)
        test, validation = ood_halves(kind, docs)
        docs = validation if dataset.endswith("-validation") else test
        prov.update(dataset=dataset, part=_PART[kind]["validation" if dataset.endswith("-validation") else "test"],
                    num_docs=len(docs))
    else:
        raise DataError(f"unknown held-out set {dataset!r}; choose from {', '.join(HELDOUT)}.")
    join = C4.join if dataset == "c4-validation" else "\n\n"
    ids, cache = cached_tokens(tokenizer, join.join(docs), dataset, join, cache_dir=cache_dir, use_cache=use_cache,
                               progress=progress, desc=f"tokenizing {dataset}")
    windows, n, available = cut_windows(ids, nsamples, seqlen, f"the {dataset} text")
    prov.update(purpose="held-out evaluation", nsamples=n, seqlen=seqlen, join=join, docs_used=len(docs),
                text_sha256=cache["text_sha256"], total_tokens=int(ids.shape[0]), windows_available=available,
                tokenizer=cache["tokenizer"], cache={"path": cache["path"], "hit": cache["hit"]})
    return windows, prov


_PART = {
    "wikipedia": {"test": "first half",
                  "validation": "second half, without the passages of articles the first half has"},
    "lambada": {"test": "first half", "validation": "second half"},
}


def article_title(passage: str) -> str:
    """The Wikipedia article a BoolQ passage comes from: SuperGLUE's passages start with
    ``"Title -- "``; a passage without that prefix is its own article."""
    title, sep, _ = passage.partition(" -- ")
    return title if sep else passage


def ood_halves(dataset: str, docs: list[str]) -> tuple[list[str], list[str]]:
    """Test and validation passages of an out-of-distribution set. The test half is the first
    half of the passages in file order (every recorded test number stays valid); the
    validation half is the rest, and for Wikipedia without the passages of any article the
    test half reads from, so no article is in both (BoolQ asks several questions of one
    article). LAMBADA's passages name no book, so its halves are split by position only."""
    half = len(docs) // 2
    test, rest = docs[:half], docs[half:]
    if dataset == "wikipedia":
        seen = {article_title(d) for d in test}
        rest = [d for d in rest if article_title(d) not in seen]
    return test, rest


def documents_read_by_test(tokenizer: Any, data_dir: str | os.PathLike[str] | None = None,
                        tokens: int = TEST_TOKENS) -> tuple[int, dict[str, Any]]:
    """How many C4 validation documents the test windows read: the documents joined by the
    test protocol up to and including the one holding its ``tokens``-th token (character
    offsets of that token in the joined text, mapped back to documents)."""
    docs, prov = load_texts("c4", C4.eval_split, data_dir)
    joined = docs[: min(C4.eval_max_docs or len(docs), len(docs))]
    text = C4.join.join(joined)
    enc = tokenizer(text, return_offsets_mapping=True, verbose=False)
    offsets = enc["offset_mapping"]
    if len(offsets) <= tokens:  # the test windows read every document joined
        return len(joined), prov
    last_char = max(end for _, end in offsets[:tokens])
    starts = np.cumsum([0] + [len(d) + len(C4.join) for d in joined[:-1]])
    return int(np.searchsorted(starts, last_char, side="right")), prov


def validation_documents(tokenizer: Any, data_dir: str | os.PathLike[str] | None = None
                         ) -> tuple[list[str], dict[str, Any]]:
    """The C4 validation documents after those the test windows read (see the module doc)."""
    first, prov = documents_read_by_test(tokenizer, data_dir)
    docs, _ = load_texts("c4", C4.eval_split, data_dir)
    rest = docs[first:]
    if not rest:
        raise DataError(
            f"the C4 validation data holds {len(docs)} documents and the test windows read all of them: "
            "no validation documents are left. Use a larger C4 validation shard."
        )
    prov.update(dataset="c4-validation", split="validation (after the test windows' documents)",
                first_document=first, num_docs=len(rest))
    return rest, prov


def ood_documents(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[list[str], dict[str, Any]]:
    """The passages of a task file as documents: BoolQ's deduplicated (``wikipedia``) or
    LAMBADA's (``lambada``), in file order."""
    folder = resolve_data_dir(data_dir)
    if folder is None:
        raise DataError(f"the {dataset} text is read from local task files: pass --data-dir / set "
                        "NLPRUNE_DATA_DIR to the folder holding tasks/.")
    sub, name = _OOD_FILES[dataset]
    where = [folder / "tasks" / sub, folder / sub]
    path = next((d / f for d in where for f in (name + ".gz", name) if (d / f).is_file()), None)
    if path is None:
        raise DataError(f"no {name}(.gz) for the {dataset} text in {', '.join(str(d) for d in where)}.")
    field = "passage" if dataset == "wikipedia" else "text"
    docs, seen = [], set()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                text = json.loads(line).get(field)
                if not isinstance(text, str):
                    raise DataError(f"{path} line {number} has no {field!r} text.")
                if text not in seen:
                    seen.add(text)
                    docs.append(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not docs:
        raise DataError(f"{path} holds no passages.")
    prov = {"dataset": dataset, "split": "test" if dataset == "lambada" else "validation", "source": "local",
            "files": [{"path": str(path), "sha256": sha256_file(Path(path))}], "num_docs": len(docs)}
    return docs, prov
