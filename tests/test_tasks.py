"""Zero-shot tasks through lm-evaluation-harness: the adapter against transformers and
lm-eval's own hf model, the local task readers, bad input through the CLI, end to end."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nlprune.eval.harness import GenerationNotSupported, NlpruneLM
from nlprune.eval.tasks import DEFAULT_TASKS, LOCAL_TASKS, load_task_docs, task_manager
from nlprune.eval.tasks.readers import split_hellaswag_context

# (context, continuation) pairs: several length buckets, multi-token continuations, answers
# sharing a context (one row), an empty context, trailing spaces moved to the continuation.
PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " London"),
    ("The capital of France is ", "Paris, a city on the Seine."),
    ("", "Hello world, this is a sentence with no context."),
    ("Question: what do bees make?\nAnswer:", " honey"),
    ("Question: what do bees make?\nAnswer:", " milk and cheese, mostly"),
    ("A man is sitting on a roof. He", " starts pulling up roofing on a roof."),
    (" ".join(["Once upon a time there was a long story about many things."] * 9), " The end."),
    ("Numbers: 1 2 3 4", " 5 6 7"),
    ("Ünïcode — quotes “like this”", " and émojis 🙂 too"),
]
ROLLING_TEXTS = [
    "A short text.",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 12),
]


def requests_of(args_list):
    return [SimpleNamespace(args=args) for args in args_list]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoTokenizer

    from nlprune.convert.hf import load_hf_folder

    return load_hf_folder(tiny_model_dir), AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def tiny_torch(tiny_model_dir):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_hflm(tiny_model_dir):
    """lm-eval's own hf model on the same folder."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_model_dir), dtype="float32", device="cpu", batch_size=3)


def direct_loglikelihood(hf_model, context_tokens, continuation_tokens):
    """log p(continuation | context) and greedy-ness, straight from transformers' logits."""
    import torch

    ids = list(context_tokens) + list(continuation_tokens)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)[-len(continuation_tokens):]
    target = torch.tensor(continuation_tokens)
    picked = logp.gather(1, target[:, None])[:, 0]
    return float(picked.sum()), bool((logp.argmax(-1) == target).all())


def test_loglikelihood_matches_transformers(tiny, tiny_torch):
    model, tokenizer = tiny
    lm = NlpruneLM(model, tokenizer, batch_size=4, progress=False)
    got = lm.loglikelihood(requests_of(PAIRS))
    assert lm.stats["forwards"] >= 3  # several batches and buckets were exercised
    for (context, continuation), (logp, greedy) in zip(PAIRS, got):
        want_logp, want_greedy = direct_loglikelihood(tiny_torch, *lm.encode_pair(context, continuation))
        assert logp == pytest.approx(want_logp, abs=1e-4, rel=1e-5), (context, continuation)
        assert greedy == want_greedy


def test_greedy_flag_is_true_for_the_argmax_continuation(tiny, tiny_torch):
    """is_greedy must also be seen True: extend a context by its own argmax tokens."""
    import torch

    model, tokenizer = tiny
    lm = NlpruneLM(model, tokenizer, progress=False)
    context = lm.tok_encode("The capital of France is")
    ids = list(context)
    for _ in range(3):
        with torch.no_grad():
            ids.append(int(tiny_torch(torch.tensor([ids])).logits[0, -1].argmax()))
    (logp, greedy), = lm.score_tokens([(context, ids[len(context):])], disable_tqdm=True)
    assert greedy
    assert logp == pytest.approx(direct_loglikelihood(tiny_torch, context, ids[len(context):])[0], abs=1e-4)


def test_tokenisation_matches_lm_eval_hf(tiny, tiny_hflm):
    """Context/continuation split and BOS as lm-eval's hf model makes them (same tokenizer)."""
    model, tokenizer = tiny
    lm = NlpruneLM(model, tokenizer, progress=False)
    assert lm.prefix_token_id == tiny_hflm.prefix_token_id
    for context, continuation in PAIRS:
        if context:
            want = tiny_hflm._encode_pair(context, continuation)
        else:  # lm-eval's loglikelihood handles the empty context before _encode_pair
            tokens = tiny_hflm.tok_encode(continuation, add_special_tokens=False)
            want = ([tiny_hflm.prefix_token_id], tokens)
        assert lm.encode_pair(context, continuation) == (list(want[0]), list(want[1])), (context, continuation)
    bos_text = tokenizer.decode([lm.prefix_token_id]) + "already has a BOS"
    assert lm.tok_encode(bos_text) == tiny_hflm.tok_encode(bos_text)


@pytest.mark.parametrize("max_length", [None, 24])
def test_loglikelihood_matches_lm_eval_hf(tiny, tiny_hflm, max_length):
    """Also with inputs longer than max_length, which both truncate from the left."""
    model, tokenizer = tiny
    lm = NlpruneLM(model, tokenizer, batch_size=8, max_length=max_length, progress=False)
    got = lm.loglikelihood(requests_of(PAIRS))
    tiny_hflm._max_length = max_length
    try:
        want = tiny_hflm.loglikelihood(requests_of(PAIRS), disable_tqdm=True)
    finally:
        tiny_hflm._max_length = None
    for (logp, greedy), (want_logp, want_greedy) in zip(got, want):
        assert logp == pytest.approx(want_logp, abs=1e-4, rel=1e-5)
        assert greedy == want_greedy


def test_loglikelihood_rolling_is_the_summed_token_nll(tiny, tiny_torch):
    import torch

    model, tokenizer = tiny
    lm = NlpruneLM(model, tokenizer, progress=False)
    got = lm.loglikelihood_rolling(requests_of([(t,) for t in ROLLING_TEXTS]))
    for text, total in zip(ROLLING_TEXTS, got):
        ids = [lm.prefix_token_id] + lm.tok_encode(text)
        with torch.no_grad():
            logp = torch.log_softmax(tiny_torch(torch.tensor([ids[:-1]])).logits[0].double(), -1)
        want = float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        assert total == pytest.approx(want, abs=1e-4, rel=1e-5)


def test_rolling_windows_match_lm_eval_hf(tiny, tiny_hflm):
    """Texts longer than max_length are scored in lm-eval's disjoint rolling windows."""
    model, tokenizer = tiny
    lm = NlpruneLM(model, tokenizer, max_length=16, progress=False)
    tiny_hflm._max_length = 16
    try:
        want = tiny_hflm.loglikelihood_rolling(requests_of([(t,) for t in ROLLING_TEXTS]), disable_tqdm=True)
    finally:
        tiny_hflm._max_length = None
    got = lm.loglikelihood_rolling(requests_of([(t,) for t in ROLLING_TEXTS]))
    assert lm.stats["requests"] > len(ROLLING_TEXTS)  # the long text took several windows
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_generate_until_is_refused(tiny):
    lm = NlpruneLM(*tiny, progress=False)
    with pytest.raises(GenerationNotSupported, match="not supported by nlprune's evaluator"):
        lm.generate_until(requests_of([("Say hi", {"until": ["\n"]})]))


# --------------------------------------------------------------------------- local task files

# Examples per task in the shared data README.
EXPECTED_COUNTS = {
    "boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267,
    "arc_easy": 2376, "openbookqa": 500, "piqa": 1838, "lambada_openai": 5153,
}


@pytest.fixture(scope="session")
def task_dir(shared_data_dir) -> Path:
    path = shared_data_dir / "tasks"
    if not path.is_dir():
        pytest.fail(f"{path} missing: the shared data folder has no zero-shot task files")
    return path


@pytest.fixture(scope="module")
def lm_eval_tasks(task_dir):
    """lm-eval's task objects for the eight tasks, built from nlprune's configs."""
    from nlprune.eval.tasks.runner import quiet_lm_eval

    with quiet_lm_eval():
        return task_manager(task_dir).load(list(DEFAULT_TASKS))["tasks"]


@pytest.mark.parametrize("name", DEFAULT_TASKS)
def test_reader_reads_every_example_with_a_valid_label(task_dir, name):
    docs = load_task_docs(name, task_dir)
    assert len(docs.rows) == EXPECTED_COUNTS[name]
    assert docs.split == LOCAL_TASKS[name].split and all(p.is_file() for p in docs.files)
    rows = docs.rows
    if name in ("boolq", "rte"):
        labels = {r["label"] for r in rows}
        assert labels == {0, 1}
    elif name == "hellaswag":
        assert {r["label"] for r in rows} == {"0", "1", "2", "3"} and all(len(r["endings"]) == 4 for r in rows)
    elif name == "winogrande":
        assert {r["answer"] for r in rows} == {"1", "2"}
    elif name in ("arc_easy", "openbookqa"):
        assert all(r["answerKey"] in r["choices"]["label"] for r in rows)
        assert all(len(r["choices"]["text"]) == len(r["choices"]["label"]) >= 3 for r in rows)
    elif name == "piqa":
        assert {r["label"] for r in rows} == {0, 1} and all(r["sol1"] and r["sol2"] for r in rows)
    else:
        assert all(" " in r["text"].strip() for r in rows)


def test_lm_eval_builds_every_task_with_targets_among_choices(lm_eval_tasks):
    for name, task in lm_eval_tasks.items():
        docs = task.eval_docs
        assert len(docs) == EXPECTED_COUNTS[name], name
        for doc in list(docs)[:200]:
            # winogrande (partial evaluation): the gold is doc_to_text's, the target the shared ending
            target = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice":
                assert 0 <= int(target) < len(task.doc_to_choice(doc)), name
            else:
                assert isinstance(target, str) and target.startswith(" ")


def test_prompts_are_lm_evals(lm_eval_tasks):
    """First examples rendered by lm-eval from nlprune's rows (the prompts of lm-eval's tasks)."""
    first = {name: task.eval_docs[0] for name, task in lm_eval_tasks.items()}
    t = lm_eval_tasks
    assert t["boolq"].doc_to_text(first["boolq"]).endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert t["boolq"].doc_to_choice(first["boolq"]) == ["no", "yes"] and t["boolq"].doc_to_target(first["boolq"]) == 0
    assert t["rte"].doc_to_text(first["rte"]).endswith("\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:")
    assert t["rte"].doc_to_target(first["rte"]) == 1  # not_entailment -> "False"
    assert t["hellaswag"].doc_to_text(first["hellaswag"]) == "Roof shingle removal: A man is sitting on a roof. He"
    assert t["hellaswag"].doc_to_target(first["hellaswag"]) == 3
    assert t["arc_easy"].doc_to_text(first["arc_easy"]).startswith("Question: Which statement best explains why")
    assert t["arc_easy"].doc_to_text(first["arc_easy"]).endswith("?\nAnswer:")
    assert t["openbookqa"].doc_to_choice(first["openbookqa"]) == [
        "make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends"]
    assert t["openbookqa"].doc_to_target(first["openbookqa"]) == 1
    assert t["piqa"].doc_to_text(first["piqa"]) == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert t["lambada_openai"].doc_to_target(first["lambada_openai"]) == " signs"
    assert t["winogrande"].doc_to_text(first["winogrande"]) == 1


def test_winogrande_rows_give_back_the_local_partial_evaluation(task_dir, lm_eval_tasks):
    """lm-eval's own winogrande functions, on the rebuilt rows, give exactly the file's
    context options, continuation and gold, for every example."""
    import gzip as gz

    raw = [json.loads(line) for line in gz.open(task_dir / "winogrande" / "winogrande.mosaic.jsonl.gz", "rt")]
    task = lm_eval_tasks["winogrande"]
    docs = list(task.eval_docs)
    assert len(docs) == len(raw)
    for doc, row in zip(docs, raw):
        assert task.doc_to_choice(doc) == row["context_options"]
        assert task.doc_to_target(doc) == row["continuation"]
        assert task.doc_to_text(doc) == row["gold"]


def test_hellaswag_capitalises_the_second_context_part(task_dir, lm_eval_tasks):
    """lm-eval capitalises ctx_b; the converted file does not. Every query is the file's
    context with its ActivityNet ctx_b capitalised; lm-eval's preprocessing also drops the
    bracketed text the converter left (as it does on the hub's rows)."""
    import bz2

    lines = bz2.open(task_dir / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8").read().split("\n")
    contexts = lines[0:-1:6]
    queries = [doc["query"] for doc in lm_eval_tasks["hellaswag"].eval_docs]
    capitalised = bracketed = 0
    for context, query in zip(contexts, queries):
        _, ctx_b = split_hellaswag_context(context.partition(": ")[2])
        expected = context[: len(context) - len(ctx_b)] + ctx_b.capitalize()
        capitalised += bool(ctx_b)
        if "[" in context and "]" in context:
            bracketed += 1
            assert query == re.sub(r"\[.*?\]", "", expected).replace("  ", " ")
        else:
            assert query == expected
    assert capitalised == 3236  # the ActivityNet items whose ctx_b starts with a letter
    assert bracketed == 2
    assert split_hellaswag_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split_hellaswag_context("Rinse well. Dry your hair.") == ("Rinse well. Dry your hair.", "")


# --------------------------------------------------------------------------- scoring a task

ARC_QUESTIONS = [
    ("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], ["A", "B", "C", "D"], "B"),
    ("What is frozen water?", ["steam", "ice", "sand"], ["A", "B", "C"], "B"),
    ("How many legs has a spider?", ["six", "eight", "ten", "four"], ["1", "2", "3", "4"], "2"),
    ("Which is a planet?", ["Moon", "Sun", "Mars", "Comet", "Star"], ["A", "B", "C", "D", "E"], "C"),
]


def write_arc(folder: Path, compressed: bool) -> None:
    folder.mkdir(parents=True)
    lines = [
        json.dumps({"id": f"q{i}", "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(texts, labels)]},
                    "answerKey": key})
        for i, (stem, texts, labels, key) in enumerate(ARC_QUESTIONS)
    ]
    text = "\n".join(lines) + "\n"
    if compressed:
        (folder / "ARC-Challenge-Test.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    else:
        (folder / "ARC-Challenge-Test.jsonl").write_text(text)


@pytest.mark.parametrize("compressed", [True, False])
def test_arc_challenge_file_is_read_and_scored(tmp_path, tiny, compressed):
    from nlprune.eval.tasks.runner import run_tasks

    write_arc(tmp_path / "arc_challenge", compressed)
    model, tokenizer = tiny
    record = run_tasks(model, tokenizer, "arc_challenge", tmp_path, progress=False, keep_predictions=True)
    entry = record["tasks"]["arc_challenge"]
    assert entry["examples"] == entry["total_examples"] == 4 and not entry["subset"] and not record["subset"]
    assert entry["split"] == "test" and "acc_norm" in entry and entry["files"][0]["path"].endswith("ARC-Challenge-Test.jsonl" + ".gz" * compressed)
    lm = NlpruneLM(model, tokenizer, progress=False)
    correct = []
    for (stem, texts, labels, key), pred in zip(ARC_QUESTIONS, record["predictions"]["arc_challenge"]):
        # lm-eval's arc prompt, the choice after a space, scored by the adapter directly
        direct = [lp for lp, _ in lm.loglikelihood(requests_of([(f"Question: {stem}\nAnswer:", f" {t}") for t in texts]))]
        np.testing.assert_allclose(pred["loglikelihoods"], direct, atol=1e-5)
        assert pred["choice"] == int(np.argmax(direct))
        correct.append(pred["choice"] == labels.index(key))
    assert entry["acc"] == pytest.approx(np.mean(correct))
    assert record["mean_acc"] == pytest.approx(entry["acc"])


def test_limit_scores_a_subset(task_dir, tiny):
    from nlprune.eval.tasks.runner import format_table, run_tasks

    record = run_tasks(*tiny, ["rte", "winogrande"], task_dir, limit=3, progress=False)
    for name in ("rte", "winogrande"):
        entry = record["tasks"][name]
        assert entry["examples"] == 3 and entry["subset"] and entry["total_examples"] == EXPECTED_COUNTS[name]
        assert 0 <= entry["acc"] <= 1 and entry["acc_stderr"] >= 0
    assert record["subset"] and record["limit"] == 3
    for name in ("rte", "winogrande"):  # each example's outcome, as lm-eval scored it
        from nlprune.eval.tasks.paired import decode_examples

        ids, ok = decode_examples(record["tasks"][name]["examples_correct"])
        assert ids == [0, 1, 2] and np.mean(ok) == pytest.approx(record["tasks"][name]["acc"])
    assert record["mean_acc"] == pytest.approx((record["tasks"]["rte"]["acc"] + record["tasks"]["winogrande"]["acc"]) / 2)
    se = [record["tasks"][n]["acc_stderr"] for n in ("rte", "winogrande")]
    assert record["mean_acc_stderr"] == pytest.approx(np.hypot(*se) / 2)
    one = run_tasks(*tiny, ["rte"], task_dir, limit=1, progress=False)  # lm-eval has no stderr for one example
    assert one["tasks"]["rte"]["examples"] == 1 and one["tasks"]["rte"]["acc_stderr"] == "N/A"
    assert one["mean_acc_stderr"] is None and "rte" in format_table(one)


def test_api_scores_the_weights_it_is_given(tiny_model_dir, task_dir, tiny):
    """api.evaluate_tasks(model, weights=...) scores those weights with the model's tokenizer
    (as `prune --eval --tasks` will): a zeroed final norm makes every next token equally
    likely, so LAMBADA's perplexity is the vocabulary size."""
    import equinox as eqx
    import jax.numpy as jnp

    from nlprune import api

    model, _ = tiny
    flat = eqx.tree_at(lambda m: m.model.norm.weight, model, jnp.zeros_like(model.model.norm.weight))
    record = api.evaluate_tasks(str(tiny_model_dir), "lambada_openai", weights=flat, task_data_dir=task_dir,
                                limit=2, progress=False)
    entry = record["tasks"]["lambada_openai"]
    assert entry["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-4)
    assert entry["acc"] == 0.0 and entry["examples"] == 2
    assert record["model"]["name"] == "tiny-llama32" and record["run"] is None
    own = api.evaluate_tasks(str(tiny_model_dir), "lambada_openai", task_data_dir=task_dir, limit=2, progress=False)
    assert own["tasks"]["lambada_openai"]["perplexity"] != pytest.approx(model.config.vocab_size, rel=1e-3)


@pytest.mark.slow
def test_a_runs_pruned_model_is_scored_without_export(tiny_model_dir, shared_data_dir, task_dir, tmp_path, capsys):
    """`nlprune eval --run RUN --tasks ...` scores the run's pruned weights (with the run's
    model's tokenizer), not the dense ones."""
    from nlprune import api
    from nlprune.cli import main as cli_main

    run = tmp_path / "magnitude-50"
    assert cli_main(["prune", "--model", str(tiny_model_dir), "--prune-method", "magnitude", "--sparsity-ratio", "0.5",
                     "--nsamples", "1", "--seqlen", "16", "--data-dir", str(shared_data_dir), "--output", str(run)]) == 0
    out = tmp_path / "tasks.json"
    assert cli_main(["eval", "--run", str(run), "--tasks", "lambada_openai", "--task-data-dir", str(task_dir),
                     "--limit", "2", "--output", str(out)]) == 0
    assert f"(run {run})" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["run"] == str(run) and record["run_method"] == "magnitude" and "perplexity" not in record
    pruned, _ = api.load_run(run)
    direct = api.evaluate_tasks(str(tiny_model_dir), "lambada_openai", weights=pruned, task_data_dir=task_dir, limit=2,
                                progress=False)
    dense = api.evaluate_tasks(str(tiny_model_dir), "lambada_openai", task_data_dir=task_dir, limit=2, progress=False)
    ppl = record["tasks"]["lambada_openai"]["perplexity"]
    assert ppl == pytest.approx(direct["tasks"]["lambada_openai"]["perplexity"], rel=1e-6)
    assert ppl != pytest.approx(dense["tasks"]["lambada_openai"]["perplexity"], rel=1e-3)


# --------------------------------------------------------------------------- bad input, through the CLI


def run_eval(capsys, *args):
    from nlprune.cli import main

    rc = main(["eval", *args])
    captured = capsys.readouterr()
    return rc, captured.err.strip()


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert err.startswith("nlprune eval: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_unknown_task_names_the_folder_and_the_known_tasks(capsys, task_dir):
    rc, err = run_eval(capsys, "--tasks", "boolq,mmlu", "--task-data-dir", str(task_dir))
    assert_one_line_error(rc, err, "'mmlu'", str(task_dir), "boolq, rte, hellaswag", "arc_challenge", "never the hub")


def test_missing_task_folder_and_file_are_named(capsys, tmp_path):
    rc, err = run_eval(capsys, "--tasks", "arc_challenge", "--task-data-dir", str(tmp_path))
    assert_one_line_error(rc, err, str(tmp_path / "arc_challenge"), "not found")
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    rc, err = run_eval(capsys, "--tasks", "piqa", "--task-data-dir", str(tmp_path))
    assert_one_line_error(rc, err, str(tmp_path / "piqa" / "valid-labels.lst"), "not found")
    rc, err = run_eval(capsys, "--tasks", "boolq", "--task-data-dir", str(tmp_path / "nowhere"))
    assert_one_line_error(rc, err, str(tmp_path / "nowhere"), "does not exist")


@pytest.mark.parametrize(
    "task, name, content, needle",
    [
        ("boolq", "val.jsonl", '{"question": "q", "passage": "p", "label": "true"}\n{not json\n', "line 2: not JSON"),
        ("boolq", "val.jsonl.gz", b"this is not gzip", "cannot read task file"),
        ("rte", "val.jsonl", '{"premise": "p", "hypothesis": "h", "label": "maybe"}\n', "is not entailment/not_entailment"),
        ("hellaswag", "hellaswag_val_full.txt", "Label: context\n0\na\nb\nc\n", "not a positive multiple of 6"),
        ("hellaswag", "hellaswag_val_full.txt", "Label: context\n7\na\nb\nc\nd\n", "line 2: gold index '7'"),
        ("winogrande", "winogrande.mosaic.jsonl", '{"context_options": ["a"], "continuation": "c", "gold": 0}\n', "two strings"),
        ("arc_easy", "ARC-Easy-Test.jsonl", json.dumps({"question": {"stem": "s", "choices": [{"text": "t", "label": "A"}]}, "answerKey": "B"}) + "\n", "answerKey 'B'"),
        ("openbookqa", "test.tsv", "ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n1\tq\t(A) x (B) y\tq\tA\n", "line 2: choices are not"),
        ("lambada_openai", "lambada_test.jsonl", '{"txt": "no text field"}\n', "missing field 'text'"),
    ],
)
def test_malformed_task_file_is_named(capsys, tmp_path, task, name, content, needle):
    (tmp_path / task).mkdir()
    path = tmp_path / task / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc, err = run_eval(capsys, "--tasks", task, "--task-data-dir", str(tmp_path))
    assert_one_line_error(rc, err, str(path), needle)


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_limit_must_be_positive(capsys, task_dir, limit):
    rc, err = run_eval(capsys, "--tasks", "boolq", "--task-data-dir", str(task_dir), "--limit", limit)
    assert_one_line_error(rc, err, "--limit", ">= 1", limit)


def test_task_options_need_tasks_and_a_folder(capsys, monkeypatch):
    rc, err = run_eval(capsys, "--limit", "5")
    assert_one_line_error(rc, err, "apply only with --tasks")
    monkeypatch.delenv("NLPRUNE_DATA_DIR", raising=False)
    rc, err = run_eval(capsys, "--tasks", "boolq")
    assert_one_line_error(rc, err, "--task-data-dir", "NLPRUNE_DATA_DIR")


def test_bad_task_input_is_one_line_from_the_installed_command(tmp_path):
    """The real entry point (a fresh process): rc 2, one line, nothing written."""
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "nlprune.cli", "eval", "--tasks", "nosuchtask", "--task-data-dir", str(tmp_path),
         "--output", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.strip().startswith("nlprune eval: error: nlprune has no local data for task 'nosuchtask'")
    assert not out.exists()


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_eval_tasks_end_to_end_writes_the_record(tmp_path, tiny_model_dir, task_dir):
    """`nlprune eval --tasks <the eight> --limit 5` with perplexity too, on the tiny model."""
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, "-m", "nlprune.cli", "eval", "--model", str(tiny_model_dir), "--tasks", ",".join(DEFAULT_TASKS),
         "--task-data-dir", str(task_dir), "--limit", "5", "--dataset", "c4", "--nsamples", "2", "--seqlen", "64",
         "--output", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "first 5 examples of each task" in proc.stdout and "subset" in proc.stdout
    record = json.loads(out.read_text())
    assert record["perplexity"] > 1 and record["windows"] == 2  # perplexity as before, plus the tasks
    zero_shot = record["zero_shot"]
    assert list(zero_shot["tasks"]) == list(DEFAULT_TASKS) and zero_shot["subset"] and zero_shot["limit"] == 5
    for name, entry in zero_shot["tasks"].items():
        assert entry["examples"] == 5 and entry["subset"] and entry["total_examples"] == EXPECTED_COUNTS[name]
        assert 0 <= entry["acc"] <= 1 and entry["acc_stderr"] >= 0 and entry["seconds"] > 0
        assert ("acc_norm" in entry) == (name in ("hellaswag", "arc_easy", "openbookqa", "piqa")), name
        assert all(len(f["sha256"]) == 64 for f in entry["files"])
        assert f"{name} " in proc.stdout
    assert zero_shot["tasks"]["lambada_openai"]["perplexity"] > 1
    assert zero_shot["mean_acc"] == pytest.approx(np.mean([e["acc"] for e in zero_shot["tasks"].values()]))
    assert zero_shot["model"]["name"] and zero_shot["forward"]["forwards"] > 0


@pytest.mark.slow
def test_parity_with_lm_eval_hf_model_on_smollm2(smollm2, task_dir, tmp_path):
    """The acceptance check: nlprune's adapter and lm-eval's own hf model (transformers,
    float32, the same weights exported) make the same per-example choices on >= 99% of the
    items, with the same local task configs (benchmarks/tasks/task_parity.py: --limit 250)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "tasks"))
    from task_parity import compare

    record = compare(smollm2, list(DEFAULT_TASKS), task_dir, limit=5, workdir=tmp_path, progress=False)
    assert record["items"] == 5 * len(DEFAULT_TASKS)
    assert record["agreement"] >= 0.99, {n: t["differ"] for n, t in record["tasks"].items()}
    for name, entry in record["tasks"].items():
        assert entry["compared"] == (["greedy"] if name == "lambada_openai" else
                                     ["choice", "choice_norm"] if "acc_norm_hf" in entry else ["choice"])
        assert entry["acc_nlprune"] == pytest.approx(entry["acc_hf"], abs=1 / 5 + 1e-9)
    lambada = record["tasks"]["lambada_openai"]
    assert lambada["perplexity_nlprune"] == pytest.approx(lambada["perplexity_hf"], rel=1e-3)
