"""Readers that turn nlprune's local task files into the rows lm-eval's tasks expect.

The local copies (see the shared data README) come in other formats than the hub's
datasets; each reader returns rows with the hub's field names and values, so the task
configs beside this file keep lm-eval's own prompts, targets and metrics. What each reader
converts, and where the local copy cannot reproduce lm-eval's prompt exactly, is said in its
docstring.

Every file may be stored plain or compressed (``NAME``, ``NAME.gz`` or ``NAME.bz2``). A file
that is missing or malformed raises ``TaskDataError`` naming the file (and the line).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import os
import re
from pathlib import Path
from typing import Any

Row = dict[str, Any]

COMPRESSED_SUFFIXES = ("", ".gz", ".bz2")


class TaskDataError(ValueError):
    """A task file is missing or not in the format its reader expects."""


def find_file(folder: Path, name: str) -> Path:
    """``folder/name``, plain or compressed; a clear error naming what was looked for."""
    for suffix in COMPRESSED_SUFFIXES:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    raise TaskDataError(
        f"task file {folder / name} not found (looked for {name}, {name}.gz and {name}.bz2 in {folder})."
    )


def read_text(path: Path) -> str:
    opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
    try:
        with opener(path, "rb") as f:
            return io.TextIOWrapper(f, encoding="utf-8").read()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TaskDataError(f"cannot read task file {path}: {e}") from None


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{path} line {number}: not JSON ({e.msg}).") from None
        if not isinstance(row, dict):
            raise TaskDataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}.")
        rows.append(row)
    if not rows:
        raise TaskDataError(f"{path} holds no examples.")
    return rows


def field(row: Row, key: str, path: Path, number: int, kind: type = str) -> Any:
    """``row[key]``, checked to exist and to be of ``kind``."""
    if key not in row:
        raise TaskDataError(f"{path} example {number}: missing field {key!r} (has {sorted(row)}).")
    value = row[key]
    if not isinstance(value, kind):
        raise TaskDataError(f"{path} example {number}: field {key!r} is {type(value).__name__}, expected {kind.__name__}.")
    return value


def read_label_lines(path: Path, allowed: tuple[str, ...], count: int) -> list[str]:
    """One label a line (PIQA's and WinoGrande's answer lists), ``count`` of them."""
    labels = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if len(labels) != count:
        raise TaskDataError(f"{path} has {len(labels)} labels but its examples file has {count} examples.")
    for number, label in enumerate(labels, start=1):
        if label not in allowed:
            raise TaskDataError(f"{path} line {number}: label {label!r} is not one of {', '.join(allowed)}.")
    return labels


# --------------------------------------------------------------------------- readers
# Each reader takes the task's folder and returns (rows, files read).


def read_boolq(folder: Path) -> tuple[list[Row], list[Path]]:
    """SuperGLUE BoolQ validation jsonl. The hub's ``label`` is 0 (False) / 1 (True), the
    index into lm-eval's choices ["no", "yes"]; the local file spells it "true"/"false"."""
    path = find_file(folder, "val.jsonl")
    values = {"false": 0, "true": 1, False: 0, True: 1}  # 0 == False and 1 == True as keys
    rows = []
    for number, row in enumerate(read_jsonl(path), start=1):
        label = row.get("label")
        if label not in values or isinstance(label, float):
            raise TaskDataError(f"{path} example {number}: label {label!r} is not true/false.")
        rows.append({
            "question": field(row, "question", path, number),
            "passage": field(row, "passage", path, number),
            "idx": row.get("idx", number - 1),
            "label": values[label],
        })
    return rows, [path]


def read_rte(folder: Path) -> tuple[list[Row], list[Path]]:
    """RTE validation (SuperGLUE's copy: the same 277 pairs as GLUE's). lm-eval's ``rte`` is
    GLUE's: ``sentence1``/``sentence2`` for premise/hypothesis, label 0 = entailment (choice
    "True"), 1 = not_entailment ("False")."""
    path = find_file(folder, "val.jsonl")
    values = {"entailment": 0, "not_entailment": 1, 0: 0, 1: 1}
    rows = []
    for number, row in enumerate(read_jsonl(path), start=1):
        label = row.get("label")
        if label not in values or isinstance(label, (bool, float)):
            raise TaskDataError(f"{path} example {number}: label {label!r} is not entailment/not_entailment.")
        rows.append({
            "sentence1": field(row, "premise", path, number),
            "sentence2": field(row, "hypothesis", path, number),
            "label": values[label],
            "idx": row.get("idx", number - 1),
        })
    return rows, [path]


# The last fragment of a context, after its last sentence end: the start of the sentence
# the endings complete (HellaSwag's ctx_b) when it starts with a lower-case letter.
SECOND_PART = re.compile(r"^(?P<a>.*[.!?][\"')\]]*) (?P<b>[a-z][^.!?]*)$", re.DOTALL)


def split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) of a converted HellaSwag context ``ctx_a + " " + ctx_b``.

    ActivityNet items end their context with the first words of the sentence to complete
    ("... on a roof. he"), stored lower-case; WikiHow items end with a whole sentence and an
    empty ctx_b. The split is inferred: the fragment after the last sentence end, if it starts
    with a lower-case letter."""
    m = SECOND_PART.match(ctx)
    return (m["a"], m["b"]) if m else (ctx, "")


def read_hellaswag(folder: Path) -> tuple[list[Row], list[Path]]:
    """HellaSwag validation, converted to text: 6 lines per item (``activity_label: ctx``,
    gold index, four endings), with WikiHow's bracketed tags removed.

    Rows get the hub's fields (activity_label, ctx_a, ctx_b, endings, label as a string), and
    the config runs lm-eval's own ``process_docs`` on them, which builds the query
    ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``. The converted
    file keeps ctx_a and ctx_b joined, so ctx_b is inferred (``split_hellaswag_context``);
    where the real ctx_b started with something other than a lower-case letter (a digit, a
    quote) the whole context stays in ctx_a, which changes the query only if that ctx_b had
    an upper-case letter after its first character (``capitalize`` lowers the rest). The
    converter removed [header]/[step]/[substeps]/[title] tags itself; lm-eval's
    ``preprocess`` then removes any bracketed text left, as it does on the hub's rows."""
    path = find_file(folder, "hellaswag_val_full.txt")
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or len(lines) % 6:
        raise TaskDataError(
            f"{path}: {len(lines)} lines, not a positive multiple of 6 (context, gold index, four endings per item)."
        )
    rows = []
    for item in range(len(lines) // 6):
        first = 6 * item + 1  # 1-based line number of the item's context
        context, gold, *endings = lines[6 * item : 6 * item + 6]
        label, sep, ctx = context.partition(": ")
        if not sep:
            raise TaskDataError(f"{path} line {first}: context has no 'activity label: ' prefix: {context[:60]!r}.")
        if gold not in ("0", "1", "2", "3"):
            raise TaskDataError(f"{path} line {first + 1}: gold index {gold!r} is not 0-3.")
        if not all(e.strip() for e in endings):
            raise TaskDataError(f"{path} lines {first + 2}-{first + 5}: an ending is empty.")
        ctx_a, ctx_b = split_hellaswag_context(ctx)
        rows.append({
            "ind": item, "activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
            "ctx": ctx, "endings": endings, "label": gold,
        })
    return rows, [path]


def read_winogrande(folder: Path) -> tuple[list[Row], list[Path]]:
    """WinoGrande (winogrande_xl) dev in the partial-evaluation form: ``context_options`` (the
    sentence up to the blank, with each option filled in), ``continuation`` (the rest) and
    ``gold``. lm-eval's functions (the config uses them) read the hub's ``sentence``,
    ``option1``/``option2`` and ``answer`` ("1"/"2"), and score ``sentence[:blank] + option``
    followed by ``sentence[blank + 1:].strip()``. Rows are rebuilt so that those functions
    give exactly the local context_options and continuation: ``sentence`` is the options'
    shared start (up to a word boundary) + "_ " + continuation, each option the rest of its
    context. ``dev-labels.lst`` (the original 1/2 answers), when present, must agree."""
    path = find_file(folder, "winogrande.mosaic.jsonl")
    rows, files = [], [path]
    for number, row in enumerate(read_jsonl(path), start=1):
        options = field(row, "context_options", path, number, list)
        continuation = field(row, "continuation", path, number).strip()
        gold = row.get("gold")
        if len(options) != 2 or not all(isinstance(o, str) for o in options):
            raise TaskDataError(f"{path} example {number}: context_options must be two strings.")
        if gold not in (0, 1) or isinstance(gold, bool):
            raise TaskDataError(f"{path} example {number}: gold {gold!r} is not 0 or 1.")
        shared = os.path.commonprefix(options)
        shared = shared[: shared.rfind(" ") + 1]
        if "_" in shared:
            raise TaskDataError(f"{path} example {number}: the context has an '_', which lm-eval reads as the blank.")
        rows.append({
            "sentence": f"{shared}_ {continuation}",
            "option1": options[0][len(shared):],
            "option2": options[1][len(shared):],
            "answer": str(gold + 1),
        })
    try:
        labels_path = find_file(folder, "dev-labels.lst")
    except TaskDataError:
        return rows, files
    labels = read_label_lines(labels_path, ("1", "2"), len(rows))
    for number, (row, label) in enumerate(zip(rows, labels), start=1):
        if row["answer"] != label:
            raise TaskDataError(f"{labels_path} line {number}: answer {label} disagrees with {path.name}'s gold.")
    return rows, files + [labels_path]


def read_arc(folder: Path, name: str) -> tuple[list[Row], list[Path]]:
    """AI2 ARC jsonl (``question: {stem, choices: [{text, label}]}``, ``answerKey``) to the
    hub's flat rows (``question``, ``choices: {text, label}``, ``answerKey``). Some questions
    label their choices 1-4 instead of A-D; the hub keeps those labels as they are, and so do
    we (lm-eval's target is ``choices.label.index(answerKey)``)."""
    path = find_file(folder, name)
    rows = []
    for number, row in enumerate(read_jsonl(path), start=1):
        question = field(row, "question", path, number, dict)
        choices = field(question, "choices", path, number, list)
        try:
            texts = [c["text"] for c in choices]
            labels = [c["label"] for c in choices]
        except (TypeError, KeyError):
            raise TaskDataError(f"{path} example {number}: each choice needs a text and a label.") from None
        answer = field(row, "answerKey", path, number)
        if answer not in labels:
            raise TaskDataError(f"{path} example {number}: answerKey {answer!r} is not one of the labels {labels}.")
        rows.append({
            "id": row.get("id", str(number)),
            "question": field(question, "stem", path, number),
            "choices": {"text": texts, "label": labels},
            "answerKey": answer,
        })
    return rows, [path]


def read_arc_easy(folder: Path) -> tuple[list[Row], list[Path]]:
    return read_arc(folder, "ARC-Easy-Test.jsonl")


def read_arc_challenge(folder: Path) -> tuple[list[Row], list[Path]]:
    return read_arc(folder, "ARC-Challenge-Test.jsonl")


OPENBOOKQA_COLUMNS = ["ID", "Question Stem", "Choices", "Complete Question", "Answer Key"]
OPENBOOKQA_CHOICE = re.compile(r"\(([A-D])\) ")


def read_openbookqa(folder: Path) -> tuple[list[Row], list[Path]]:
    """OpenBookQA Main test, the official TSV (``ID, Question Stem, Choices, Complete
    Question, Answer Key``, choices as one string ``(A) .. (B) .. (C) .. (D) ..``) to the
    hub's rows (``question_stem``, ``choices: {text, label}``, ``answerKey``). Choice texts
    are the pieces between the ``(X) `` markers, stripped of surrounding spaces."""
    path = find_file(folder, "test.tsv")
    lines = read_text(path).splitlines()
    header = lines[0].split("\t") if lines else []
    if header != OPENBOOKQA_COLUMNS:
        raise TaskDataError(f"{path} line 1: expected the columns {OPENBOOKQA_COLUMNS}, got {header}.")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != 5:
            raise TaskDataError(f"{path} line {number}: {len(cells)} tab-separated fields, expected 5.")
        pieces = OPENBOOKQA_CHOICE.split(cells[2])
        labels, texts = pieces[1::2], [t.strip() for t in pieces[2::2]]
        if pieces[0].strip() or labels != ["A", "B", "C", "D"] or not all(texts):
            raise TaskDataError(f"{path} line {number}: choices are not '(A) .. (B) .. (C) .. (D) ..': {cells[2][:80]!r}.")
        answer = cells[4].strip()
        if answer not in labels:
            raise TaskDataError(f"{path} line {number}: answer key {answer!r} is not A-D.")
        rows.append({
            "id": cells[0], "question_stem": cells[1],
            "choices": {"text": texts, "label": labels}, "answerKey": answer,
        })
    if not rows:
        raise TaskDataError(f"{path} holds no examples.")
    return rows, [path]


def read_piqa(folder: Path) -> tuple[list[Row], list[Path]]:
    """PIQA validation: ``valid.jsonl`` (goal, sol1, sol2) with its answers in
    ``valid-labels.lst`` (0/1 one a line), joined into the hub's rows with an int ``label``."""
    path = find_file(folder, "valid.jsonl")
    examples = read_jsonl(path)
    labels_path = find_file(folder, "valid-labels.lst")
    labels = read_label_lines(labels_path, ("0", "1"), len(examples))
    rows = [
        {
            "goal": field(row, "goal", path, number),
            "sol1": field(row, "sol1", path, number),
            "sol2": field(row, "sol2", path, number),
            "label": int(label),
        }
        for number, (row, label) in enumerate(zip(examples, labels), start=1)
    ]
    return rows, [path, labels_path]


def read_lambada_openai(folder: Path) -> tuple[list[Row], list[Path]]:
    """LAMBADA, OpenAI's detokenised test set: rows ``{text}``, as on the hub."""
    path = find_file(folder, "lambada_test.jsonl")
    rows = []
    for number, row in enumerate(read_jsonl(path), start=1):
        text = field(row, "text", path, number)
        if " " not in text.strip():
            raise TaskDataError(f"{path} example {number}: text has no space to split the last word off.")
        rows.append({"text": text})
    return rows, [path]
