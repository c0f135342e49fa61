"""``--stream``: one decoder layer in memory at a time, read from disk, kept only in the run
directory. Everything a streamed run reports and writes must equal the in-memory run's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from nlprune import api
from nlprune.cli import main as cli_main
from nlprune.methods import available_methods

QUICK = {"nonlinear": ["--steps", "2"]}
EVAL = ["--eval", "--eval-nsamples", "4", "--eval-seqlen", "64", "--attention-windows", "2"]


def record(out):
    return json.loads((out / "results.json").read_text())


def same_leaves(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Streaming changes where layers live, not what a pattern does: every method once, the two
# patterns taking turns (both patterns for every method cost 2.5 minutes of a 2-core CI run).
STREAMED = [(m, ("unstructured", "2:4")[i % 2]) for i, m in enumerate(sorted(available_methods()))]


@pytest.mark.parametrize("method, sparsity", STREAMED)
def test_a_streamed_run_is_the_in_memory_run(method, sparsity, prune_cli, tmp_path):
    ratio = ["--sparsity-ratio", "0.5"] if sparsity == "unstructured" else []
    flags = ["--prune-method", method, *QUICK.get(method, []), "--sparsity-type", sparsity, *ratio, *EVAL]
    assert prune_cli(tmp_path / "memory", *flags) == 0
    assert prune_cli(tmp_path / "stream", *flags, "--stream", "--no-cache") == 0  # the dense pass streamed too
    memory, stream = record(tmp_path / "memory"), record(tmp_path / "stream")
    assert stream["stream"] is True and memory["stream"] is False
    # the masks bit for bit (the packed file's bytes), the numbers to the last bit
    assert (tmp_path / "stream" / "masks.safetensors").read_bytes() == (
        tmp_path / "memory" / "masks.safetensors").read_bytes()
    assert stream["perplexity"] == memory["perplexity"] and stream["dense_perplexity"] == memory["dense_perplexity"]
    assert stream["dense_perplexity_cache"]["computed"] and not stream["dense_perplexity_cache"]["cached"]
    assert stream["attention_error"]["per_layer"] == memory["attention_error"]["per_layer"]
    assert stream["sparsity"]["per_linear"] == memory["sparsity"]["per_linear"]
    same_leaves(api.load_run(tmp_path / "stream")[0], api.load_run(tmp_path / "memory")[0])


def test_a_streamed_run_exports_and_its_model_is_layered(prune_cli, tmp_path):
    from nlprune.layered import is_layered, open_layered

    assert prune_cli(tmp_path / "run", "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--stream") == 0
    assert is_layered(tmp_path / "run" / "model")
    layered = open_layered(tmp_path / "run" / "model")
    assert layered.config.num_hidden_layers == 6 and not (tmp_path / "run" / "progress").exists()
    assert cli_main(["export-hf", "--run", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    exported = api.load(str(tmp_path / "hf")).model
    pruned, _ = api.load_run(tmp_path / "run")
    for a, b in zip(exported.model.layers, pruned.model.layers, strict=True):
        for name, lin in a.linears().items():
            np.testing.assert_array_equal(np.asarray(lin.weight), np.asarray(b.linears()[name].effective_weight))


def test_a_damaged_layer_of_a_streamed_model_is_named(prune_cli, tmp_path):
    from nlprune.checkpoint import CheckpointError

    assert prune_cli(tmp_path / "run", "--prune-method", "magnitude", "--sparsity-ratio", "0.5", "--stream") == 0
    sidecar = tmp_path / "run" / "model" / "layer-003" / "nlprune_checkpoint.json"
    meta = json.loads(sidecar.read_text())
    meta["meta"]["layer"] = 4  # its checksum no longer matches
    sidecar.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="layer-003"):
        api.load_run(tmp_path / "run")


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from nlprune import api
    from nlprune.runs import RunDir

    model, data, out = sys.argv[1:4]
    original = RunDir.save_layer

    def save_then_die(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    RunDir.save_layer = save_then_die
    api.prune(model, "sparsegpt", 0.5, nsamples=4, seqlen=64, data_dir=data, output=out, progress=False, stream=True)
    """
)


def test_a_killed_streamed_run_resumes_identically(tiny_model_dir, shared_data_dir, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tiny_model_dir), str(shared_data_dir), str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -9, proc.stderr[-2000:]
    common = dict(nsamples=4, seqlen=64, data_dir=shared_data_dir, progress=False)
    _, resumed = api.prune(str(tiny_model_dir), "sparsegpt", 0.5, output=out, stream=True, **common)
    assert resumed["resumed_from_layer"] == 3
    straight, rec = api.prune(str(tiny_model_dir), "sparsegpt", 0.5, output=tmp_path / "straight", **common)
    same_leaves(api.load_run(out)[0], straight)
    assert resumed["sparsity"]["per_linear"] == rec["sparsity"]["per_linear"]


@pytest.mark.parametrize("flags, message", [
    (["--sparsity-profile", "owl"], "--stream does not compute OWL"),
    (["--tasks", "boolq"], "--stream does not score zero-shot tasks"),
])
def test_what_a_streamed_run_cannot_do_is_one_line_before_loading(flags, message, prune_cli, tmp_path, capsys):
    assert prune_cli(tmp_path / "run", "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--stream", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_streamed_random_weights_are_written_once_and_pruned(tiny_model_dir, shared_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NLPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    common = dict(nsamples=4, seqlen=64, data_dir=shared_data_dir, progress=False, random_weights=3, stream=True)
    _, first = api.prune(str(tiny_model_dir), "wanda", 0.5, output=tmp_path / "a", **common)
    written = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(written) == 6 + 1  # one file per decoder layer, one for the embeddings and head
    stamps = [f.stat().st_mtime_ns for f in written]
    _, second = api.prune(str(tiny_model_dir), "wanda", 0.5, output=tmp_path / "b", dtype="float32",
                          **{k: v for k, v in common.items()})
    assert [f.stat().st_mtime_ns for f in written] == stamps  # reused, not rewritten
    assert first["model"]["weights_sha256"] == second["model"]["weights_sha256"]
    assert (tmp_path / "a" / "masks.safetensors").read_bytes() == (tmp_path / "b" / "masks.safetensors").read_bytes()


def test_a_truncated_shard_is_one_line_before_the_first_layer(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rc = cli_main(["prune", "--model", str(folder), "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--stream",
                   "--nsamples", "4", "--seqlen", "64", "--data-dir", str(shared_data_dir), "--output",
                   str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and shard.name in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "progress").exists()


def test_a_bfloat16_model_keeps_its_embeddings_exact_in_the_run(tiny_model_dir, shared_data_dir, tmp_path, monkeypatch):
    from nlprune import cards
    
    monkeypatch.setenv("NLPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    api.prune(str(tiny_model_dir), "wanda", 0.5, output=tmp_path / "run", nsamples=4, seqlen=64,
              data_dir=shared_data_dir, progress=False, random_weights=1, stream=True, dtype="bfloat16")
    pruned, _ = api.load_run(tmp_path / "run")
    reader = cards.open_reader(cards.resolve_model(str(tiny_model_dir), random_weights=1), dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(pruned.model.embed_tokens.weight, np.float32),
                                  reader.tensor("model.embed_tokens.weight"))
    assert str(pruned.model.embed_tokens.weight.dtype) == "bfloat16"  # held as --dtype says
    config = reader.config
    stored = tmp_path / "run" / "model" / "shell-embed_tokens.bin"
    assert stored.stat().st_size == config.vocab_size * config.hidden_size * 2  # kept in bfloat16


def test_a_damaged_shell_array_is_named(prune_cli, tmp_path):
    from nlprune.checkpoint import CheckpointError

    assert prune_cli(tmp_path / "run", "--prune-method", "magnitude", "--sparsity-ratio", "0.5", "--stream") == 0
    stored = tmp_path / "run" / "model" / "shell-norm.bin"
    data = bytearray(stored.read_bytes())
    data[0] ^= 1
    stored.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shell-norm.bin"):
        api.load_run(tmp_path / "run")
