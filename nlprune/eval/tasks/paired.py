"""Paired comparison of two zero-shot evaluations on the same examples.

Two pruned models scored on the same 250 examples differ by a point or two of accuracy, about
one standard error of each: the unpaired error bars cannot tell them apart. Most examples are
answered the same way by both, so the difference only rests on the examples where they
disagree. ``compare`` reads the per-example outcomes every task record keeps (``examples``:
the doc ids and a 0/1 string of lm-eval's per-example ``acc``) and reports per task the
discordant counts, the accuracy difference with its paired standard error, and McNemar's
exact test (two-sided binomial on the discordant pairs); over the tasks the mean difference
(unweighted, as ``mean_acc``) with a normal-approximation p-value. No correction for testing
several tasks is applied: the per-task p-values are each one test.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any


def encode_examples(doc_ids: list[int], correct: list[bool]) -> dict[str, Any]:
    """Per-example outcomes, compactly: doc ids as [start, stop) ranges, outcomes as '0'/'1'."""
    if len(doc_ids) != len(correct):
        raise ValueError("one outcome per doc id is needed.")
    ranges: list[list[int]] = []
    for d in doc_ids:
        if ranges and ranges[-1][1] == d:
            ranges[-1][1] = d + 1
        else:
            ranges.append([d, d + 1])
    return {"doc_id_ranges": ranges, "correct": "".join("1" if c else "0" for c in correct)}


def decode_examples(entry: dict[str, Any]) -> tuple[list[int], list[bool]]:
    ids = [d for start, stop in entry["doc_id_ranges"] for d in range(start, stop)]
    return ids, [c == "1" for c in entry["correct"]]


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b and c discordant pairs, binomial(b + c, 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def zero_shot_record(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The task part of a record: `nlprune eval --tasks --output` files, a run folder or its
    results.json (`prune --tasks`), or an already-loaded record."""
    import json

    if isinstance(source, dict):
        record, name = source, "the record"
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such record; give an `nlprune eval --tasks ... --output` "
                                    "file or a run folder pruned with --tasks.")
        try:
            record, name = json.loads(path.read_text()), str(path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a JSON record ({e}); give the file `nlprune eval --output` wrote.") from e
    record = record.get("zero_shot", record)
    if "tasks" not in record:
        raise ValueError(f"{name} holds no zero-shot task scores (score them with `nlprune eval --tasks ...`).")
    return record


def compare(a: str | Path | dict[str, Any], b: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Paired differences (a minus b) on every task both records scored."""
    ra, rb = zero_shot_record(a), zero_shot_record(b)
    common = [t for t in ra["tasks"] if t in rb["tasks"]]
    if not common:
        raise ValueError(f"the records share no task (a: {', '.join(ra['tasks'])}; b: {', '.join(rb['tasks'])}).")
    rows: dict[str, dict[str, Any]] = {}
    for task in common:
        ea, eb = ra["tasks"][task], rb["tasks"][task]
        for e, which in ((ea, "a"), (eb, "b")):
            if "examples_correct" not in e:
                raise ValueError(f"record {which} has no per-example outcomes for {task} (written before they "
                                 "were kept): score it again with `nlprune eval --tasks ...`.")
        if [f["sha256"] for f in ea.get("files", [])] != [f["sha256"] for f in eb.get("files", [])]:
            raise ValueError(f"{task}: the two records read different task files; pair only scores of the same data.")
        ids_a, ok_a = decode_examples(ea["examples_correct"])
        ids_b, ok_b = decode_examples(eb["examples_correct"])
        if ids_a != ids_b:
            raise ValueError(f"{task}: the records scored different examples ({len(ids_a)} vs {len(ids_b)}); "
                             "use the same --limit for both.")
        n = len(ids_a)
        only_a = sum(x and not y for x, y in zip(ok_a, ok_b))
        only_b = sum(y and not x for x, y in zip(ok_a, ok_b))
        diff = (only_a - only_b) / n
        # per-example d in {-1, 0, 1}: sample variance of d over n examples
        var = ((only_a + only_b) - n * diff * diff) / (n - 1) if n > 1 else float("nan")
        rows[task] = {
            "examples": n, "acc_a": sum(ok_a) / n, "acc_b": sum(ok_b) / n, "both": sum(x and y for x, y in zip(ok_a, ok_b)),
            "only_a": only_a, "only_b": only_b, "difference": diff,
            "difference_stderr": math.sqrt(max(var, 0.0) / n) if n > 1 else None,
            "mcnemar_p": mcnemar_exact_p(only_a, only_b),
        }
    diffs = [r["difference"] for r in rows.values()]
    ses = [r["difference_stderr"] for r in rows.values()]
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum(s * s for s in ses)) / len(ses) if all(s is not None for s in ses) else None
    p = math.erfc(abs(mean / se) / math.sqrt(2)) if se else None
    return {
        "tasks": rows, "mean_difference": mean, "mean_difference_stderr": se, "mean_p": p,
        "a": {"model": ra.get("model", {}).get("name"), "run": ra.get("run"), "mean_acc": ra.get("mean_acc")},
        "b": {"model": rb.get("model", {}).get("name"), "run": rb.get("run"), "mean_acc": rb.get("mean_acc")},
        "protocol": "difference = acc(a) - acc(b) on the same examples; stderr from the per-example paired "
        "differences; mcnemar_p: exact two-sided binomial on the discordant examples; mean over tasks unweighted, "
        "its stderr sqrt(sum of squared task stderrs) / tasks, p from the normal approximation; no multiplicity correction",
    }


def format_comparison(result: dict[str, Any]) -> str:
    lines = [f"{'task':<16}{'examples':>9}{'acc a':>9}{'acc b':>9}{'only a':>8}{'only b':>8}"
             f"{'a - b':>18}{'McNemar p':>11}"]
    for task, r in result["tasks"].items():
        se = r["difference_stderr"]
        diff = f"{r['difference']:+.4f}" + (f" ± {se:.4f}" if se is not None else "")
        lines.append(f"{task:<16}{r['examples']:>9}{r['acc_a']:>9.4f}{r['acc_b']:>9.4f}{r['only_a']:>8}"
                     f"{r['only_b']:>8}{diff:>18}{r['mcnemar_p']:>11.3g}")
    se, p = result["mean_difference_stderr"], result["mean_p"]
    mean = f"{result['mean_difference']:+.4f}" + (f" ± {se:.4f}" if se is not None else "")
    lines.append(f"{'mean':<16}{'':>9}{'':>9}{'':>9}{'':>8}{'':>8}{mean:>18}"
                 + (f"{p:>11.3g}" if p is not None else ""))
    return "\n".join(lines)
