"""Paired comparison of two zero-shot records (nlprune/eval/tasks/paired.py, `nlprune compare-tasks`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from nlprune.eval.tasks.paired import compare, decode_examples, encode_examples, mcnemar_exact_p


def record(outcomes: dict[str, list[bool]], sha: str = "x", start: int = 0) -> dict:
    """A task record as run_tasks writes it, with only what compare reads."""
    tasks = {}
    for name, ok in outcomes.items():
        tasks[name] = {"acc": float(np.mean(ok)), "files": [{"path": f"{name}.jsonl", "sha256": sha}],
                       "examples_correct": encode_examples(list(range(start, start + len(ok))), ok)}
    return {"tasks": tasks, "mean_acc": float(np.mean([t["acc"] for t in tasks.values()])), "model": {"name": "m"}}


def test_outcomes_round_trip_with_gaps_in_the_doc_ids():
    ids, ok = [0, 1, 2, 7, 8, 20], [True, False, False, True, True, False]
    enc = encode_examples(ids, ok)
    assert enc == {"doc_id_ranges": [[0, 3], [7, 9], [20, 21]], "correct": "100110"}
    assert decode_examples(enc) == (ids, ok)
    with pytest.raises(ValueError):
        encode_examples([0, 1], [True])


@pytest.mark.parametrize("b, c", [(0, 0), (0, 6), (3, 9), (12, 12), (40, 61), (150, 190)])
def test_mcnemar_p_is_scipys_exact_binomial_test(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact_p(b, c) == pytest.approx(expected, rel=1e-9)
    assert mcnemar_exact_p(b, c) == mcnemar_exact_p(c, b)


def test_counts_difference_and_paired_stderr():
    rng = np.random.default_rng(0)
    a = {t: list(rng.random(n) < p) for t, n, p in (("rte", 250, 0.55), ("piqa", 180, 0.6))}
    # b agrees with a except on a few examples, so the paired error is far below the unpaired one
    b = {t: [x if rng.random() > 0.1 else not x for x in ok] for t, ok in a.items()}
    result = compare(record(a), record(b))
    for t in a:
        x, y = np.array(a[t], float), np.array(b[t], float)
        d, row = x - y, result["tasks"][t]
        assert row["only_a"] == int(((x == 1) & (y == 0)).sum()) and row["only_b"] == int(((x == 0) & (y == 1)).sum())
        assert row["difference"] == pytest.approx(x.mean() - y.mean())
        assert row["difference_stderr"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
        unpaired = np.hypot(x.std(ddof=1), y.std(ddof=1)) / np.sqrt(len(d))
        assert row["difference_stderr"] < 0.6 * unpaired
        assert row["mcnemar_p"] == pytest.approx(stats.binomtest(min(row["only_a"], row["only_b"]),
                                                                 row["only_a"] + row["only_b"]).pvalue)
    rows = result["tasks"].values()
    assert result["mean_difference"] == pytest.approx(np.mean([r["difference"] for r in rows]))
    se = np.sqrt(sum(r["difference_stderr"] ** 2 for r in rows)) / 2
    assert result["mean_difference_stderr"] == pytest.approx(se)
    assert result["mean_p"] == pytest.approx(2 * stats.norm.sf(abs(result["mean_difference"]) / se))


def test_a_clear_difference_is_significant_and_identical_records_are_not():
    a = {"boolq": [True] * 60 + [False] * 40}
    b = {"boolq": [False] * 30 + [True] * 30 + [False] * 40}  # a wins 30 discordant pairs to 0
    assert compare(record(a), record(b))["tasks"]["boolq"]["mcnemar_p"] < 1e-8
    same = compare(record(a), record(a))
    assert same["tasks"]["boolq"]["mcnemar_p"] == 1.0 and same["mean_difference"] == 0.0


def test_records_that_cannot_be_paired_are_refused(tmp_path):
    a = record({"rte": [True, False, True]})
    with pytest.raises(ValueError, match="different examples"):
        compare(a, record({"rte": [True, False, True]}, start=5))
    with pytest.raises(ValueError, match="different examples"):
        compare(a, record({"rte": [True, False]}))
    with pytest.raises(ValueError, match="different task files"):
        compare(a, record({"rte": [True, False, True]}, sha="y"))
    with pytest.raises(ValueError, match="share no task"):
        compare(a, record({"piqa": [True]}))
    old = record({"rte": [True, False, True]})
    del old["tasks"]["rte"]["examples_correct"]
    with pytest.raises(ValueError, match="no per-example outcomes for rte"):
        compare(a, old)
    with pytest.raises(ValueError, match="no zero-shot task scores"):
        compare(a, {"perplexity": 12.0})
    with pytest.raises(FileNotFoundError, match="no such record"):
        compare(a, tmp_path / "missing.json")


def test_cli_compares_two_files_and_a_run_folder(tmp_path, capsys):
    from nlprune.cli import main

    a = {"rte": [True] * 20 + [False] * 10, "piqa": [True, False] * 10}
    b = {"rte": [False] * 10 + [True] * 10 + [False] * 10, "piqa": [True, False] * 10}
    (tmp_path / "a.json").write_text(json.dumps(record(a)))
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"perplexity": 30.0, "zero_shot": record(b)}))
    out = tmp_path / "cmp.json"
    assert main(["compare-tasks", str(tmp_path / "a.json"), str(run), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rte" in text and "piqa" in text and "McNemar" in text
    saved = json.loads(out.read_text())
    assert saved["tasks"]["rte"]["only_a"] == 10 and saved["tasks"]["rte"]["only_b"] == 0
    assert saved["tasks"]["piqa"]["difference"] == 0.0
    # an existing output is kept unless --overwrite; a corrupt record is one line of error
    before = out.read_text()
    assert main(["compare-tasks", str(tmp_path / "a.json"), str(run), "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == before
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["compare-tasks", str(tmp_path / "a.json"), str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nlprune compare-tasks: error:") and "bad.json is not a JSON record" in err and "\n" not in err
