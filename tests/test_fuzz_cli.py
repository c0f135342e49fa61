"""Bad input thrown at every command: each ends with exit code != 0, at most 3 lines on stderr,
no traceback, and nothing in the sandbox (its outputs included) changed.

The commands run in-process (``nlprune.cli.main``); signals are tested in test_reliability.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from nlprune.cli import main as cli_main
from nlprune.runs import RunDir

from test_reliability import message_lines, prune_argv, run_cli, snapshot

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sandbox(tiny_model_dir, shared_data_dir, tmp_path_factory) -> Path:
    """A folder of things to get wrong: runs finished, unfinished and damaged, foreign
    folders, files where folders belong, broken model folders, a data folder without
    validation text."""
    box = tmp_path_factory.mktemp("fuzz") / "box"
    box.mkdir()
    assert cli_main([str(a) for a in prune_argv(tiny_model_dir, shared_data_dir, box / "R")]) == 0
    original = RunDir.save_layer

    def save_then_stop(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(RunDir, "save_layer", save_then_stop)
        assert cli_main([str(a) for a in prune_argv(tiny_model_dir, shared_data_dir, box / "U")]) == 130
    assert cli_main(["export-hf", "--run", str(box / "R"), "--output", str(box / "hf")]) == 0
    (box / "hf" / "notes.txt").write_text("mine\n")

    shutil.copytree(box / "R", box / "E")  # its record replaced by an evaluation's
    (box / "E" / "results.json").write_text(json.dumps({"perplexity": 3.0, "windows": 1}))
    shutil.copytree(box / "R", box / "C")  # a damaged model checkpoint
    data = max((p for p in (box / "C" / "model").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])

    (box / "afile").write_text("a file\n")
    (box / "eval.json").write_text('{"keep": true}\n')
    (box / "foreign" / ".git").mkdir(parents=True)
    (box / "foreign" / "notes.txt").write_text("keep\n")
    (box / "proj" / ".git").mkdir(parents=True)
    (box / "proj" / "config.json").write_text("{}\n")
    (box / "proj" / "notes.txt").write_text("x\n")
    (box / "dir.gguf").mkdir()
    (box / "empty").mkdir()
    (box / "readonly").mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    for name, text in {
        "missing-keys": json.dumps({k: v for k, v in config.items() if k != "num_attention_heads"}),
        "zero-heads": json.dumps({**config, "num_attention_heads": 0}),
        "not-json": "{",
        "a-list": "[1, 2]",
    }.items():
        (box / name).mkdir()
        (box / name / "config.json").write_text(text)
    (box / "train-only").mkdir()
    for shard in (shared_data_dir / "c4").glob("c4-train.*"):
        (box / "train-only" / shard.name).symlink_to(shard)
    return box


def cases(model: str, data: str, box: str) -> list[tuple[str, list[str], str]]:
    """(id, argv, a fragment the one-line error must hold)."""
    def prune(out: str, *extra: str) -> list[str]:
        return ["prune", "--model", model, "--prune-method", "wanda", "--sparsity-ratio", "0.5", "--nsamples", "2",
                "--seqlen", "64", "--data-dir", data, "--output", out, *extra]

    run, new = f"{box}/R", f"{box}/new-run"
    return [
        ("ratio>1", prune(new, "--sparsity-ratio", "1.5"), "outside [0, 1)"),
        ("ratio<0", prune(new, "--sparsity-ratio", "-0.1"), "outside [0, 1)"),
        ("type-banana", prune(new, "--sparsity-type", "banana"), "unknown sparsity type"),
        ("type-3:7", prune(new, "--sparsity-type", "3:7"), "3:7 removes 0.571429"),
        ("nsamples-0", prune(new, "--nsamples", "0"), "--nsamples must be"),
        ("nsamples-abc", prune(new, "--nsamples", "abc"), "invalid int value"),
        ("seqlen-1", prune(new, "--seqlen", "1"), "--seqlen must be"),
        ("seqlen-past-context", prune(new, "--seqlen", "1000000000"), "context of 131072"),
        ("batch-0", prune(new, "--batch-size", "0"), "--batch-size must be"),
        ("batch-negative", prune(new, "--batch-size", "-1"), "--batch-size must be"),
        ("seed-negative", prune(new, "--seed", "-1"), "--seed must be"),
        ("unknown-flag", prune(new, "--bogus"), "unrecognized arguments"),
        ("no-method", ["prune", "--model", model, "--output", new], "--prune-method"),
        ("output-empty", prune(""), "current folder"),
        ("output-under-file", prune(f"{box}/afile/sub"), "is a file"),
        ("output-is-file", prune(f"{box}/afile"), "not a directory"),
        ("output-foreign", prune(f"{box}/foreign"), "not an nlprune run"),
        ("output-foreign-overwrite", prune(f"{box}/foreign", "--overwrite"), "not an nlprune run"),
        ("output-finished", prune(run), "--overwrite"),
        ("output-unfinished-other-settings", prune(f"{box}/U", "--sparsity-ratio", "0.6"), "other settings"),
        ("output-run-with-notes-overwrite", prune(f"{box}/hf", "--overwrite"), "not an nlprune run"),
        ("output-readonly", prune(f"{box}/readonly/run"), "not writable"),
        ("model-missing", prune(new, "--model", f"{box}/nothing-here"), "unknown model"),
        ("model-gguf-folder", prune(new, "--model", f"{box}/dir.gguf"), "is a folder, not a GGUF file"),
        ("model-no-config", prune(new, "--model", f"{box}/empty"), "config.json"),
        ("config-missing-keys", prune(new, "--model", f"{box}/missing-keys"), "missing num_attention_heads"),
        ("config-zero-heads", prune(new, "--model", f"{box}/zero-heads"), "positive integers"),
        ("config-not-json", prune(new, "--model", f"{box}/not-json"), "config.json"),
        ("config-a-list", prune(new, "--model", f"{box}/a-list"), "JSON object"),
        ("data-dir-missing", prune(new, "--data-dir", f"{box}/nothing-here"), "does not exist"),
        ("no-validation-text", prune(new, "--data-dir", f"{box}/train-only"), "validation"),
        ("prune-eval-nsamples-huge", prune(new, "--eval", "--eval-nsamples", "100000"), "100000 were asked for"),
        ("eval-seqlen-1", prune(new, "--eval", "--eval-seqlen", "1"), "--eval-seqlen must be"),
        ("mesh-too-big", prune(new, "--mesh", "data=64"), "64"),
        ("mesh-garbage", prune(new, "--mesh", "data=x"), "--mesh"),
        ("plan-seqlen", ["plan", "--model", model, "--seqlen", "1000000000"], "context of 131072"),
        ("plan-devices-0", ["plan", "--model", model, "--devices", "0"], "--devices must be >= 1"),
        ("plan-mesh-and-devices", ["plan", "--model", model, "--mesh", "data=2", "--devices", "2"], "not both"),
        ("plan-model-missing", ["plan", "--model", "gpt-17"], "unknown model"),
        ("plan-nsamples-0", ["plan", "--model", model, "--nsamples", "0"], "nsamples must be"),
        ("plan-output-run-file", ["plan", "--model", model, "--output", f"{run}/results.json"], "belongs to the nlprune run"),
        ("plan-output-folder", ["plan", "--model", model, "--output", f"{box}/empty"], "is a folder"),
        ("eval-run-missing", ["eval", "--run", f"{box}/nothing-here"], "does not exist"),
        ("eval-run-foreign", ["eval", "--run", f"{box}/foreign"], "not an nlprune run"),
        ("eval-run-unfinished", ["eval", "--run", f"{box}/U"], "did not finish"),
        ("eval-run-replaced-record", ["eval", "--run", f"{box}/E"], "not the record of a pruning run"),
        ("eval-run-damaged", ["eval", "--run", f"{box}/C", "--nsamples", "1", "--seqlen", "64"], "corrupt"),
        ("eval-output-results", ["eval", "--run", run, "--output", f"{run}/results.json"], "belongs to the nlprune run"),
        ("eval-output-folder", ["eval", "--run", run, "--output", f"{box}/empty"], "is a folder"),
        ("eval-output-exists", ["eval", "--run", run, "--output", f"{box}/eval.json"], "--overwrite"),
        ("eval-output-under-file", ["eval", "--run", run, "--output", f"{box}/afile/x.json"], "is a file"),
        ("eval-batch-negative", ["eval", "--run", run, "--batch-size", "-1"], "--batch-size must be"),
        ("eval-nsamples-0", ["eval", "--run", run, "--nsamples", "0"], "--nsamples must be"),
        ("eval-nsamples-huge", ["eval", "--run", run, "--nsamples", "100000", "--seqlen", "64", "--data-dir", data],
         "100000 were asked for"),
        ("eval-no-wikitext", ["eval", "--run", run, "--dataset", "wikitext2", "--data-dir", data], "WikiText"),
        ("export-not-empty", ["export-hf", "--run", run, "--output", f"{box}/proj"], "--overwrite"),
        ("export-config-only", ["export-hf", "--run", run, "--output", f"{box}/proj", "--overwrite"],
         "not a model folder written by nlprune"),
        ("export-foreign-files", ["export-hf", "--run", run, "--output", f"{box}/hf", "--overwrite"], "notes.txt"),
        ("export-to-file", ["export-hf", "--run", run, "--output", f"{box}/afile"], "is a file"),
        ("export-under-file", ["export-hf", "--run", run, "--output", f"{box}/afile/hf"], "is a file"),
        ("export-empty-output", ["export-hf", "--run", run, "--output", ""], "current folder"),
        ("export-run-missing", ["export-hf", "--run", f"{box}/nothing-here", "--output", f"{box}/hf2"], "does not exist"),
        ("export-run-unfinished", ["export-hf", "--run", f"{box}/U", "--output", f"{box}/hf2"], "did not finish"),
    ]


CASE_IDS = [c[0] for c in cases("m", "d", "b")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-cache")


@pytest.mark.parametrize("case", CASE_IDS)
def test_bad_input_fails_cleanly_and_changes_nothing(
    case, sandbox, cache_dir, tiny_model_dir, shared_data_dir, monkeypatch, capsys
):
    monkeypatch.setenv("NLPRUNE_CACHE_DIR", str(cache_dir))  # caches live outside the sandbox
    monkeypatch.chdir(sandbox)
    argv, fragment = next((a, f) for i, a, f in cases(str(tiny_model_dir), str(shared_data_dir), str(sandbox))
                          if i == case)
    if case == "output-readonly":
        if os.geteuid() == 0:  # root writes anywhere: make the check see a read-only folder
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == sandbox / "readonly"
                                else real_access(p, mode, **kw))
        else:
            (sandbox / "readonly").chmod(0o555)
    before = snapshot(sandbox)
    try:
        rc, _, err = run_cli(capsys, *argv)
    finally:
        (sandbox / "readonly").chmod(0o755)
    lines = message_lines(err)
    assert rc not in (0, None), err
    assert "Traceback" not in err and 1 <= len(lines) <= 3, err
    assert fragment in err, err
    assert snapshot(sandbox) == before


def test_there_are_at_least_forty_cases():
    assert len(CASE_IDS) >= 40 and len(set(CASE_IDS)) == len(CASE_IDS)


def test_full_disk_during_export_is_one_line(sandbox, tmp_path, monkeypatch, capsys):
    import safetensors.numpy

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    before = snapshot(sandbox)
    rc, _, err = run_cli(capsys, "export-hf", "--run", sandbox / "R", "--output", sandbox / "hf-full")
    assert rc == 1 and message_lines(err) == [
        f"nlprune export-hf: error: No space left on device ({sandbox / 'hf-full' / 'model.safetensors'}); "
        "free some space and rerun"]
    assert snapshot(sandbox) == before


def test_full_disk_while_the_tokenizer_is_written_is_one_line(sandbox, monkeypatch, capsys):
    import transformers

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", full)
    before = snapshot(sandbox)
    rc, _, err = run_cli(capsys, "export-hf", "--run", sandbox / "R", "--output", sandbox / "hf-tok")
    assert rc == 1 and "Traceback" not in err and message_lines(err) == [
        f"nlprune export-hf: error: No space left on device ({sandbox / 'hf-tok' / 'tokenizer.json'}); "
        "free some space and rerun"], err
    assert snapshot(sandbox) == before


def test_export_says_the_sparsity_of_the_weights_not_of_an_edited_record(sandbox, tmp_path, capsys):
    run = tmp_path / "edited"
    shutil.copytree(sandbox / "R", run)
    record = json.loads((run / "results.json").read_text())
    record["sparsity"]["overall"] = 0.1  # hand-edited: the weights are half zeros
    (run / "results.json").write_text(json.dumps(record))
    rc, _, err = run_cli(capsys, "export-hf", "--run", run, "--output", tmp_path / "hf")
    assert rc == 0, err
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())["nlprune_sparsity"]
    assert exported["measured"] == pytest.approx(0.5, abs=1e-6) and exported["ratio"] == 0.5
