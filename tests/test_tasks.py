"""Zero-shot tasks through lm-evaluation-harness: the adapter against transformers and
lm-eval's own hf model, the local task readers, bad input through the CLI, end to end."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nlprune.eval.harness import GenerationNotSupported, NlpruneLM
from nlprune.eval.tasks import DEFAULT_TASKS, LOCAL_TASKS, load_task_docs, task_manager
from nlprune.eval.tasks.readers import TaskDataError, split_hellaswag_context

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
