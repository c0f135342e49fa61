"""The three splits kept apart (nlprune.data.heldout): calibration (C4 train draws), test (the
first windows of the joined C4 validation documents) and validation (the C4 validation
documents after those the test windows read), and the out-of-distribution sets."""

from __future__ import annotations

import numpy as np
import pytest

from nlprune import cards
from nlprune.data import calibration_windows, eval_windows, evaluation_windows, load_texts
from nlprune.data.heldout import documents_read_by_test, ood_documents, validation_documents


@pytest.fixture(scope="module")
def tokenizer():
    return cards.load_tokenizer(cards.resolve_model("smollm2-135m"))


def test_no_calibration_draw_and_no_validation_document_comes_from_the_test_split(tokenizer, shared_data_dir):
    test_docs_512, _ = documents_read_by_test(tokenizer, shared_data_dir, 128 * 512)
    test_docs, _ = documents_read_by_test(tokenizer, shared_data_dir)  # the paper protocol: 128 x 2048
    assert 0 < test_docs_512 <= test_docs
    docs, _ = load_texts("c4", "validation", shared_data_dir)
    val_docs, prov = validation_documents(tokenizer, shared_data_dir)
    assert prov["first_document"] == test_docs and val_docs == docs[test_docs:] and len(val_docs) > 100
    # the test windows of both protocols end inside the documents before the validation split
    for seqlen in (512, 2048):
        test, _ = eval_windows(tokenizer, "c4", 128, seqlen, shared_data_dir, progress=False)
        text = tokenizer.decode(test.reshape(-1))
        assert not any(d[:200] in text for d in val_docs), seqlen
        assert docs[test_docs - 1][-200:] not in text or seqlen == 2048  # 512 stops earlier
    assert docs[test_docs - 1][:100] in tokenizer.decode(
        eval_windows(tokenizer, "c4", 128, 2048, shared_data_dir, progress=False)[0].reshape(-1))
    # calibration draws come from C4 train: none of the drawn documents is a validation document
    _, cal = calibration_windows(tokenizer, 8, 512, 0, data_dir=shared_data_dir)
    train, _ = load_texts("c4", "train", shared_data_dir)
    drawn = {train[i] for i in cal["doc_indices"]}
    assert drawn and not drawn & set(docs)
    # validation windows are cut from the validation documents only
    windows, vprov = evaluation_windows(tokenizer, "c4-validation", 8, 512, shared_data_dir, progress=False)
    assert windows.shape == (8, 512) and vprov["first_document"] == test_docs
    assert tokenizer.decode(windows[0][:64]).strip()[:40] in val_docs[0]


def test_out_of_distribution_sets(tokenizer, shared_data_dir):
    import gzip
    import json

    wiki, prov = ood_documents("wikipedia", shared_data_dir)
    with gzip.open(prov["files"][0]["path"], "rt") as f:
        questions = [json.loads(line)["passage"] for line in f if line.strip()]
    # one document per distinct passage, in the order each first appears
    assert len(wiki) == len(set(wiki)) == prov["num_docs"] == len(set(questions)) < len(questions)
    assert wiki == sorted(set(questions), key=questions.index)
    lambada, _ = ood_documents("lambada", shared_data_dir)
    assert len(lambada) > 5000
    for name, docs in (("wikipedia", wiki), ("lambada", lambada)):
        w, p = evaluation_windows(tokenizer, name, 16, 256, shared_data_dir, progress=False)
        assert w.shape == (16, 256) and p["files"][0]["sha256"] and p["part"] == "first half"
        v, q = evaluation_windows(tokenizer, f"{name}-validation", 16, 256, shared_data_dir, progress=False)
        assert q["part"].startswith("second half") and 0 < q["num_docs"] <= len(docs) - p["num_docs"]
        # the test half is the first passages in file order (recorded test numbers stay valid)
        assert tokenizer.decode(w[0][:32]).strip()[:40] in docs[0]
        # no passage is read by both halves' windows, and both read some
        test_text, val_text = tokenizer.decode(w.reshape(-1)), tokenizer.decode(v.reshape(-1))
        heads = [d[:80] for d in docs if len(d) >= 80]
        in_test = {h for h in heads if h in test_text}
        in_val = {h for h in heads if h in val_text}
        assert in_test and in_val and not in_test & in_val, name


def test_wikipedia_halves_share_no_article(shared_data_dir):
    """BoolQ asks several questions of one article, so a split by passage would put one
    article's text on both sides: the validation half drops every passage whose article
    ("Title -- ..." in SuperGLUE's passages) the test half holds."""
    from nlprune.data.heldout import ood_halves

    wiki, _ = ood_documents("wikipedia", shared_data_dir)
    test, validation = ood_halves("wikipedia", wiki)
    titles = [d.split(" -- ")[0] for d in wiki]
    assert all(" -- " in d for d in wiki)
    # by position alone the halves would share articles: the split has something to do
    half = len(wiki) // 2
    assert set(titles[:half]) & set(titles[half:])
    test_titles = {d.split(" -- ")[0] for d in test}
    val_titles = {d.split(" -- ")[0] for d in validation}
    assert test == wiki[:half] and validation and not test_titles & val_titles
    assert not set(test) & set(validation)
    # nothing else is dropped: every later passage of an article the test half lacks is kept
    assert validation == [d for d, t in zip(wiki[half:], titles[half:]) if t not in test_titles]
    with pytest.raises(ValueError, match="unknown evaluation set 'wiki'"):
        evaluation_windows(None, "wiki", 4, 256, shared_data_dir)


def test_attention_error_reads_validation_windows(tiny_model_dir, shared_data_dir, monkeypatch):
    from nlprune import api
    from nlprune.eval import attention_error as module
    from nlprune.eval.attention_error import attention_error
    from nlprune.plan import ATTN_ERROR_BATCH

    windows_per_call = []
    original = module.layer_attention_error

    def spy(dense, pruned, h, cos, sin):
        windows_per_call.append(h.shape[0])
        return original(dense, pruned, h, cos, sin)

    monkeypatch.setattr(module, "layer_attention_error", spy)
    loaded = api.load(str(tiny_model_dir))
    pruned, record = api.prune(loaded, "wanda", 0.5, nsamples=2, seqlen=32, data_dir=shared_data_dir,
                               attention_windows=2, progress=False)
    assert record["attention_error"]["split"] == "c4-validation" and record["args"]["attention_windows"] == 2
    # the n x n matrices of as many windows at once as nlprune plan counts (its memory)
    assert windows_per_call and max(windows_per_call) == ATTN_ERROR_BATCH
    val, _ = evaluation_windows(loaded.tokenizer, "c4-validation", 2, 32, shared_data_dir, progress=False)
    test, _ = eval_windows(loaded.tokenizer, "c4", 2, 32, shared_data_dir, progress=False)
    np.testing.assert_allclose(record["attention_error"]["per_layer"], attention_error(loaded.model, pruned, val),
                               rtol=1e-6)
    assert not np.allclose(attention_error(loaded.model, pruned, test), record["attention_error"]["per_layer"])


def test_attention_windows_flag_sets_the_metric_and_its_config(prune_cli, tmp_path, capsys):
    """--attention-windows (a PruneRequest field and its flag, nothing else): 0 skips the
    metric, N measures it on N validation windows, and the config records it for a rerun."""
    import json

    assert prune_cli(tmp_path / "none", "--prune-method", "wanda", "--sparsity-ratio", "0.5",
                     "--attention-windows", "0") == 0
    rec = json.loads((tmp_path / "none" / "results.json").read_text())
    assert "attention_error" not in rec and rec["config"]["attention_windows"] == 0
    assert prune_cli(tmp_path / "two", "--prune-method", "wanda", "--sparsity-ratio", "0.5",
                     "--attention-windows", "2") == 0
    rec = json.loads((tmp_path / "two" / "results.json").read_text())
    assert rec["attention_error"]["windows"] == 2 and rec["args"]["attention_windows"] == 2
    capsys.readouterr()
    assert prune_cli(tmp_path / "bad", "--prune-method", "wanda", "--attention-windows", "-1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--attention-windows must be an integer >= 0" in err[0], err
    assert not (tmp_path / "bad").exists()
