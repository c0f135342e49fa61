"""Perplexity: nlprune against transformers on the same windows, and the chunked loss."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nlprune.cli import main as cli_main
from nlprune.convert.hf import from_transformers
from nlprune.data import eval_windows
from nlprune.eval.perplexity import batch_nll, perplexity

from test_llama_parity import random_hf_model, tiny_hf_config


def test_batch_nll_equals_full_logits_nll():
    cfg = tiny_hf_config(vocab_size=301)
    model = from_transformers(random_hf_model(cfg))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 301, (3, 37)), jnp.int32)
    logits = jax.vmap(model)(ids)[:, :-1]
    full = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))
    np.testing.assert_allclose(float(batch_nll(model, ids)), float(full), rtol=1e-5)


def test_perplexity_matches_transformers_tiny():
    cfg = tiny_hf_config(tie_word_embeddings=True)
    hf = random_hf_model(cfg)
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], (5, 33)).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long(), labels=torch.from_numpy(ids).long())
    # transformers averages over all predicted tokens of the batch: exp(mean NLL)
    # batches of 2: the fifth window goes in a padded batch whose copies must not count
    got = perplexity(from_transformers(hf), ids, batch_size=2, progress=False)
    assert got.tokens == 5 * 32 and got.windows == 5
    assert got.perplexity == pytest.approx(math.exp(float(ref.loss)), rel=1e-5)


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(smollm2, shared_data_dir):
    from transformers import AutoModelForCausalLM

    windows, _ = eval_windows(smollm2.tokenizer, "c4", 3, 512, data_dir=shared_data_dir, progress=False)
    path = smollm2.source.weights_path
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(windows).long(), labels=torch.from_numpy(windows).long())
    ours = perplexity(smollm2.model, windows, batch_size=3, progress=False)
    assert abs(ours.perplexity - math.exp(float(ref.loss))) / math.exp(float(ref.loss)) < 1e-3


@pytest.mark.slow
def test_eval_cli_writes_record(tmp_path, shared_data_dir, capsys):
    out = tmp_path / "eval.json"
    rc = cli_main(["eval", "--nsamples", "2", "--seqlen", "64", "--data-dir", str(shared_data_dir), "--output", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["windows"] == 2 and rec["tokens"] == 2 * 63 and math.isfinite(rec["perplexity"]) and rec["perplexity"] > 1
    assert rec["dataset"]["files"][0]["sha256"] and rec["model"]["weights_sha256"]
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--seqlen", "0"], "seqlen"),
        (["--seqlen", "9000"], "8192"),
        (["--nsamples", "100000", "--seqlen", "512"], "windows"),
    ],
)
def test_eval_bad_protocol(args, message, shared_data_dir, capsys):
    rc = cli_main(["eval", "--data-dir", str(shared_data_dir), *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err


def test_eval_missing_data_folder(tmp_path, capsys):
    rc = cli_main(["eval", "--data-dir", str(tmp_path / "nowhere"), "--nsamples", "1"])
    assert rc == 2 and "nowhere" in capsys.readouterr().err
