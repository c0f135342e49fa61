"""Never lose a user's files, never resume into a wrong model (issue 16; issue 17's dense cache).

Each data-loss and silently-wrong case of the issue has a test here (tiny model, real C4).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from nlprune import api
from nlprune.eval import dense_cache
from nlprune.cli import main as cli_main
from nlprune.data import eval_windows
from nlprune.runs import RunDir, RunDirError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """nlprune in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = cli_main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def shown_lines(stderr: str) -> list[str]:
    """The lines a terminal keeps: progress bars redraw themselves after a carriage return."""
    return [kept for line in stderr.split("\n") if (kept := line.rsplit("\r", 1)[-1].strip())]


# A tqdm bar by its shape ("desc: 100%|####| 6/6 [..."), never by its rate: below one step a
# second tqdm writes "1.58s/layer" instead of "layer/s", and a busy machine gets there.
PROGRESS_BAR = re.compile(r"^(.*: )?\s*\d+%\|.*\| *[\d.]+[kMG]?/[\d.]+[kMG]? \[")


def message_lines(stderr: str) -> list[str]:
    """The lines a terminal keeps that are not progress bars: what the user is told."""
    return [line for line in shown_lines(stderr) if not PROGRESS_BAR.match(line)]


def test_message_lines_drop_bars_at_any_speed():
    bars = ["wanda unstructured: 100%|##########| 6/6 [00:01<00:00,  4.20layer/s, layer 5: checkpoint]",
            "wanda unstructured: 100%|##########| 6/6 [00:09<00:00,  1.58s/layer, layer 5: checkpoint]",
            "perplexity:  50%|#####     | 64/128 [10:09<10:09,  9.52s/win]",
            "tokenizing C4: 100%|##########| 1.20M/1.20M [00:03<00:00, 389kchar/s]"]
    error = "nlprune prune: error: No space left on device (masks.safetensors); free some space and rerun"
    assert message_lines("\r".join(bars[:2]) + "\n" + "\n".join(bars[2:]) + "\n" + error + "\n") == [error]
    assert message_lines("nlprune prune: error: 50%| is not a ratio\n") == ["nlprune prune: error: 50%| is not a ratio"]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: (kind, sha256 of a file's bytes, permission bits)."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                tree[rel] = ("link", os.readlink(p), None)
            elif p.is_dir():
                tree[rel] = ("dir", None, p.stat().st_mode & 0o777)
            else:
                tree[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode & 0o777)
    return tree


def prune_argv(model_dir: Path, data_dir: Path, out, *extra: str) -> list[str]:
    return ["prune", "--model", model_dir, "--prune-method", "wanda", "--sparsity-ratio", "0.5",
            "--nsamples", "2", "--seqlen", "64", "--data-dir", data_dir, "--output", out, *extra]


def assert_same_model(a, b) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def interrupt_after(monkeypatch, layer: int) -> None:
    """The next prune stops (Ctrl-C) right after layer ``layer`` is saved."""
    original = RunDir.save_layer

    def save_then_stop(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == layer:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save_layer", save_then_stop)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, shared_data_dir, tmp_path_factory) -> Path:
    """A finished wanda 0.5 run of the tiny model (read-only for the tests: copy it)."""
    out = tmp_path_factory.mktemp("runs") / "R"
    assert cli_main([str(a) for a in prune_argv(tiny_model_dir, shared_data_dir, out)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# --------------------------------------------------------------------------- 1. --overwrite


@pytest.mark.parametrize("output, overwrite", [("", True), (".", False)], ids=["empty-overwrite", "dot"])
@pytest.mark.parametrize("contents", ["git-venv-env", "git-only"])
def test_current_folder_is_never_taken_for_a_run(
    output, overwrite, contents, tiny_model_dir, shared_data_dir, tmp_path, monkeypatch, capsys
):
    project = tmp_path / "p"
    (project / ".git" / "objects").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    if contents == "git-venv-env":
        (project / ".venv" / "bin").mkdir(parents=True)
        (project / ".env").write_text("K=1\n")
    else:
        (project / ".gitignore").write_text("*.pyc\n")
    before = snapshot(project)
    monkeypatch.chdir(project)
    rc, _, err = run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, output,
                                             *(["--overwrite"] if overwrite else [])))
    assert rc == 2 and "not an nlprune run" in err and len(shown_lines(err)) == 1
    assert snapshot(project) == before


def test_overwrite_refuses_a_foreign_folder_without_deleting(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / ".git").mkdir(parents=True)
    (folder / ".env").write_text("K=1\n")
    (folder / "results.json").write_text('{"my": "own results"}\n')
    before = snapshot(tmp_path)
    rc, _, err = run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, folder, "--overwrite"))
    assert rc == 2 and "not an nlprune run" in err
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_run_holding_foreign_files(run_copy, tiny_model_dir, shared_data_dir, capsys):
    (run_copy / "notes.txt").write_text("my notes on this run\n")
    before = snapshot(run_copy.parent)
    rc, _, err = run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, run_copy, "--overwrite"))
    assert rc == 2 and "notes.txt" in err and "did not write" in err
    assert snapshot(run_copy.parent) == before


# --------------------------------------------------------------------------- 2. export-hf --overwrite


def test_export_overwrite_never_deletes_a_folder_it_did_not_write(finished_run, tmp_path, capsys):
    proj = tmp_path / "proj"
    (proj / ".git").mkdir(parents=True)
    (proj / "config.json").write_text("{}\n")
    (proj / "notes.txt").write_text("x\n")
    before = snapshot(tmp_path)
    rc, _, err = run_cli(capsys, "export-hf", "--run", finished_run, "--output", proj, "--overwrite")
    assert rc == 2 and "not a model folder written by nlprune" in err
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- 3. eval --output


def test_eval_never_replaces_a_runs_record(run_copy, capsys):
    before = snapshot(run_copy)
    rc, _, err = run_cli(capsys, "eval", "--run", run_copy, "--output", run_copy / "results.json",
                         "--nsamples", "1", "--seqlen", "64")
    assert rc == 2 and "belongs to the nlprune run" in err
    rc, _, err = run_cli(capsys, "eval", "--run", run_copy, "--output", run_copy / "results.json",
                         "--nsamples", "1", "--seqlen", "64", "--overwrite")
    assert rc == 2 and "belongs to the nlprune run" in err
    assert snapshot(run_copy) == before


def test_a_run_whose_record_was_replaced_is_refused(run_copy, tmp_path, capsys):
    (run_copy / "results.json").write_text(json.dumps({"perplexity": 12.0, "windows": 1, "run": str(run_copy)}))
    with pytest.raises(RunDirError, match="not the record of a pruning run"):
        api.load_run(run_copy)
    rc, _, err = run_cli(capsys, "export-hf", "--run", run_copy, "--output", tmp_path / "hf")
    assert rc == 2 and "not the record of a pruning run" in err and not (tmp_path / "hf").exists()


def test_eval_output_file_needs_overwrite(finished_run, tmp_path, capsys):
    target = tmp_path / "eval.json"
    target.write_text("keep\n")
    rc, _, err = run_cli(capsys, "eval", "--run", finished_run, "--output", target, "--nsamples", "1", "--seqlen", "64")
    assert rc == 2 and "--overwrite" in err and target.read_text() == "keep\n"
    rc, _, err = run_cli(capsys, "eval", "--run", finished_run, "--output", target, "--nsamples", "1",
                         "--seqlen", "64", "--overwrite")
    assert rc == 0, err
    assert json.loads(target.read_text())["windows"] == 1


# --------------------------------------------------------------------------- 4. failed --overwrite


def test_failed_overwrite_keeps_the_old_run_and_resumes(run_copy, tiny_model_dir, shared_data_dir, monkeypatch, capsys):
    from nlprune import packed_masks

    before = snapshot(run_copy)
    old_model, old_record = api.load_run(run_copy)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "masks.safetensors")

    monkeypatch.setattr(packed_masks, "save_packed_masks", disk_full)  # fails after every layer
    argv = prune_argv(tiny_model_dir, shared_data_dir, run_copy, "--overwrite", "--sparsity-ratio", "0.6")
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 1 and "Traceback" not in err
    assert message_lines(err) == [  # (after the pruning's bar) one line
        "nlprune prune: error: No space left on device (masks.safetensors); free some space and rerun "
        "(the prune resumes where it stopped)"]
    assert snapshot(run_copy) == before  # the old run, untouched
    assert_same_model(api.load_run(run_copy)[0], old_model)

    monkeypatch.undo()
    rc, _, _ = run_cli(capsys, *argv)  # the rerun resumes the staged run: no layer is redone
    assert rc == 0
    record = json.loads((run_copy / "results.json").read_text())
    assert record["args"]["sparsity_ratio"] == 0.6 and record["resumed_from_layer"] == 6
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["run"]  # no staging left


# --------------------------------------------------------------------------- 5. one writer


HANGING_RUN = textwrap.dedent(
    """
    import sys, time
    from nlprune.cli import main
    from nlprune.runs import RunDir

    original = RunDir.save_layer

    def save_then_hang(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 1:
            print("HANG", flush=True)
            time.sleep(600)

    RunDir.save_layer = save_then_hang
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(
    finished_run, tiny_model_dir, shared_data_dir, tmp_path, capsys
):
    out = tmp_path / "shared-output"
    argv = prune_argv(tiny_model_dir, shared_data_dir, out)
    holder = subprocess.Popen([sys.executable, "-c", HANGING_RUN, *map(str, argv)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "HANG"
        for extra in ([], ["--sparsity-ratio", "0.7", "--overwrite"]):  # resume it, or replace it
            before = snapshot(out)
            rc, _, err = run_cli(capsys, *argv, *extra)
            assert rc == 2 and f"in use by pid {holder.pid}" in err and len(shown_lines(err)) == 1
            assert snapshot(out) == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, the lock file still names it
        holder.communicate(timeout=60)
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0 and f"from pid {holder.pid}" in err
    record = json.loads((out / "results.json").read_text())
    assert record["resumed_from_layer"] == 2 and record["args"]["sparsity_ratio"] == 0.5
    assert_same_model(api.load_run(out)[0], api.load_run(finished_run)[0])


SWAP_KILLED = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from nlprune.cli import main

    out = Path(sys.argv[1]).absolute()
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if Path(src).absolute() == out:  # the old run is set aside, the new one not yet in place
            print("HANG", flush=True)
            time.sleep(600)

    os.rename = rename
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.slow
def test_kill_during_the_overwrite_swap_keeps_the_old_run(run_copy, tiny_model_dir, shared_data_dir):
    old_model, old_record = api.load_run(run_copy)
    argv = prune_argv(tiny_model_dir, shared_data_dir, run_copy, "--overwrite", "--sparsity-ratio", "0.6")
    child = subprocess.Popen([sys.executable, "-c", SWAP_KILLED, str(run_copy), *map(str, argv)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = child.stdout.readline()
    finally:
        child.kill()
        _, err = child.communicate(timeout=60)
    assert line.strip() == "HANG", err[-2000:]
    assert not run_copy.exists()  # killed between the two renames
    model, record = api.load_run(run_copy)  # puts the old run back
    assert record == old_record
    assert_same_model(model, old_model)


# --------------------------------------------------------------------------- 6. resume state


@pytest.mark.parametrize("damage", ["random-bytes", "other-settings"])
def test_damaged_resume_state_is_recomputed_not_loaded(
    damage, finished_run, tiny_model_dir, shared_data_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    interrupt_after(monkeypatch, 3)
    assert run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, out))[0] == 130
    layer = out / "progress" / "layer-001"
    if damage == "random-bytes":
        biggest = max((p for p in layer.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        with open(biggest, "r+b") as f:
            f.write(np.random.default_rng(0).bytes(4096))
    else:  # the same layer from a run with other settings
        other = tmp_path / "other"
        assert run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, other, "--sparsity-ratio", "0.7"))[0] == 130
        shutil.rmtree(layer)
        shutil.copytree(other / "progress" / "layer-001", layer)
    monkeypatch.undo()
    rc, _, err = run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, out))
    assert rc == 0 and "cannot be used" in err and "recomputing the run from layer 0" in err
    assert json.loads((out / "results.json").read_text())["resumed_from_layer"] == 0
    assert_same_model(api.load_run(out)[0], api.load_run(finished_run)[0])


@pytest.mark.slow
def test_resumed_run_times_every_segment(tiny_model_dir, shared_data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupt_after(monkeypatch, 2)
    assert run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, out))[0] == 130
    monkeypatch.undo()
    assert run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, out))[0] == 0
    record = json.loads((out / "results.json").read_text())
    assert record["resumed_from_layer"] == 3
    assert len(record["layer_seconds"]) == 6 and all(s > 0 for s in record["layer_seconds"])
    assert record["prune_seconds"] >= sum(record["layer_seconds"][:3]) > 0

    # Killed after the last layer, before the outputs: the resumed run prunes nothing, and
    # still reports the time the pruning took.
    out2 = tmp_path / "run2"
    interrupt_after(monkeypatch, 5)
    assert run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, out2))[0] == 130
    monkeypatch.undo()
    assert run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, out2))[0] == 0
    record = json.loads((out2 / "results.json").read_text())
    assert record["resumed_from_layer"] == 6 and len(record["layer_seconds"]) == 6
    assert record["prune_seconds"] >= sum(record["layer_seconds"]) > 0


# --------------------------------------------------------------------------- 7. dense perplexity cache


@pytest.fixture(scope="module")
def tiny_and_windows(tiny_model_dir, shared_data_dir):
    loaded = api.load(str(tiny_model_dir))
    windows, _ = eval_windows(loaded.tokenizer, "c4", 2, 32, data_dir=shared_data_dir, progress=False)
    return loaded, windows


@pytest.fixture
def counted_dense(tiny_and_windows, tmp_path, monkeypatch):
    """(loaded tiny model, two eval windows, a counter of dense forwards); cache in tmp."""
    monkeypatch.setenv("NLPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    loaded, windows = tiny_and_windows
    calls = []
    real = api.perplexity

    def counting(model, w, **kwargs):
        calls.append(np.asarray(w).shape)
        return real(model, w, **kwargs)

    monkeypatch.setattr(dense_cache, "perplexity", counting)
    return loaded, windows, calls


def test_dense_cache_is_keyed_by_model_windows_and_code(counted_dense, monkeypatch):
    import dataclasses

    loaded, windows, calls = counted_dense
    first = api.dense_perplexity(loaded, windows, progress=False)
    again = api.dense_perplexity(loaded, windows, progress=False)
    assert not first.cached and again.cached and again.perplexity == first.perplexity and len(calls) == 1
    assert again.computed == first.computed and again.path == first.path

    api.dense_perplexity(loaded, windows[:1], progress=False)  # other windows
    assert len(calls) == 2
    other_source = dataclasses.replace(loaded.source, _sha256="0" * 64)  # another model
    api.dense_perplexity(dataclasses.replace(loaded, source=other_source), windows, progress=False)
    assert len(calls) == 3
    with monkeypatch.context() as m:  # other code
        m.setattr(dense_cache, "forward_code_version", lambda: "other-code")
        assert not api.dense_perplexity(loaded, windows, progress=False).cached and len(calls) == 4
    assert api.dense_perplexity(loaded, windows, progress=False).cached and len(calls) == 4
    assert not api.dense_perplexity(loaded, windows, progress=False, use_cache=False).cached  # --no-cache
    assert len(calls) == 5


@pytest.mark.parametrize("damage", ["edited-to-1", "truncated", "other-code"])
def test_bad_dense_cache_entry_is_recomputed_never_trusted(damage, counted_dense, caplog):
    loaded, windows, calls = counted_dense
    first = api.dense_perplexity(loaded, windows, progress=False)
    entry = Path(first.path)
    data = json.loads(entry.read_text())
    if damage == "edited-to-1":
        data["perplexity"] = 1.0
        entry.write_text(json.dumps(data))
    elif damage == "truncated":
        entry.write_text(entry.read_text()[:9])
    else:  # an entry computed by other code, its checksum made consistent
        data["key"]["code_version"] = "from-other-code"
        body = {k: v for k, v in data.items() if k != "sha256"}
        data["sha256"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        entry.write_text(json.dumps(data))
    again = api.dense_perplexity(loaded, windows, progress=False)
    assert not again.cached and again.perplexity == first.perplexity and len(calls) == 2
    assert str(entry) in caplog.text and "recomputing" in caplog.text
    assert api.dense_perplexity(loaded, windows, progress=False).cached  # rewritten, good again


def test_code_version_follows_the_forward_sources(tmp_path):
    root = tmp_path / "nlprune"
    shutil.copytree(REPO / "nlprune", root, ignore=shutil.ignore_patterns("__pycache__"))
    before = api.forward_code_version(root)
    assert before == api.forward_code_version(REPO / "nlprune")
    (root / "prune" / "wanda.py").write_text("# not on the dense forward's path\n")
    assert api.forward_code_version(root) == before
    perplexity_py = root / "eval" / "perplexity.py"
    perplexity_py.write_text(perplexity_py.read_text() + "\n# changed\n")
    assert api.forward_code_version(root) != before


@pytest.mark.parametrize("damage", ["flipped-byte", "edited-ids"])
def test_bad_token_cache_entry_is_rebuilt_with_a_warning(damage, tiny_and_windows, tmp_path):
    import gzip

    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(data / "c4-validation.00000-of-00001.json.gz", "wt") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"Document {i} talks about topic {i * 7}."}) + "\n")
    tokenizer, cache = tiny_and_windows[0].tokenizer, tmp_path / "tokens"

    def windows(**kwargs):
        return eval_windows(tokenizer, "c4", 4, 16, data_dir=data, cache_dir=cache, progress=False, **kwargs)

    first, prov = windows()
    entry = Path(prov["cache"]["path"])
    if damage == "flipped-byte":
        raw = bytearray(entry.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        entry.write_bytes(bytes(raw))
    else:  # a well-formed file whose ids no longer match its checksum
        with np.load(entry) as old:
            ids, meta = old["ids"].copy(), old["meta"].copy()
        ids[5] += 1
        with open(entry, "wb") as f:
            np.savez(f, ids=ids, meta=meta)
    with pytest.warns(UserWarning, match=f"ignoring the token cache {entry}.*tokenizing again"):
        again, prov = windows()
    assert not prov["cache"]["hit"] and np.array_equal(again, first)
    assert windows()[1]["cache"]["hit"]  # rewritten, good again
    assert not windows(use_cache=False)[1]["cache"]["hit"]  # --no-cache


@pytest.mark.slow
def test_prune_says_when_the_dense_perplexity_was_cached(
    tiny_model_dir, shared_data_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("NLPRUNE_CACHE_DIR", str(tmp_path / "cache"))

    def prune_eval(out: str, *extra: str) -> str:
        rc, printed, _ = run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, tmp_path / out, "--eval",
                                                     "--eval-nsamples", "1", "--eval-seqlen", "64", *extra))
        assert rc == 0
        return printed

    assert "(computed now)" in prune_eval("a")
    assert "(cached, computed " in prune_eval("b")
    assert "(computed now)" in prune_eval("c", "--no-cache")
    record = json.loads((tmp_path / "b" / "results.json").read_text())
    assert record["dense_perplexity_cache"]["cached"] is True


# --------------------------------------------------------------------------- 8. checks before the first layer


@pytest.mark.parametrize("problem", ["eval-nsamples", "no-validation-shard"])
def test_evaluation_data_is_checked_before_the_first_layer(
    problem, tiny_model_dir, shared_data_dir, tmp_path, monkeypatch, capsys
):
    saved = []
    monkeypatch.setattr(RunDir, "save_layer", lambda self, i, *a, **k: saved.append(i))
    data = shared_data_dir
    extra = ["--eval", "--eval-nsamples", "100000"]
    if problem == "no-validation-shard":
        data = tmp_path / "train-only"
        data.mkdir()
        for shard in (shared_data_dir / "c4").glob("c4-train.*"):
            (data / shard.name).symlink_to(shard)
        extra = []
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, *prune_argv(tiny_model_dir, data, out, *extra))
    assert rc == 2 and saved == [] and not out.exists()
    assert ("100000 were asked for" in err) if problem == "eval-nsamples" else ("validation" in err)


# --------------------------------------------------------------------------- 9. signals


SIGNAL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from nlprune import atomic
    from nlprune.cli import main

    sig, calls, real = getattr(signal, sys.argv[1]), [], atomic.fsync_tree
    # a shell's background job starts with SIGINT ignored, and nlprune rightly keeps it so
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def fsync_then_signal(root):
        calls.append(root)
        if len(calls) == 3:  # inside layer 1's save: the signal must wait for the save
            os.kill(os.getpid(), sig)
        real(root)

    atomic.fsync_tree = fsync_then_signal
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("sig, rc, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_signal_during_a_save_ends_in_one_line_and_resumes(
    sig, rc, word, tiny_model_dir, shared_data_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = [str(a) for a in prune_argv(tiny_model_dir, shared_data_dir, out)]
    proc = subprocess.run([sys.executable, "-c", SIGNAL_DURING_SAVE, sig, *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=900)
    assert proc.returncode == rc, proc.stderr[-3000:]
    assert message_lines(proc.stderr) == [f"nlprune prune: {word}"]
    assert (out / "progress" / "layer-001").is_dir()  # the save the signal arrived in was completed
    assert not list((out / "progress").glob(".*"))  # and left no temporary directory
    if sig == "SIGINT":  # (the same state either way: resume once)
        handler = signal.getsignal(signal.SIGTERM)
        assert run_cli(capsys, *argv)[0] == 0
        assert json.loads((out / "results.json").read_text())["resumed_from_layer"] == 1
        assert signal.getsignal(signal.SIGTERM) is handler  # main() put the caller's handler back


# --------------------------------------------------------------------------- 12. minor


def test_outputs_have_the_usual_permissions(finished_run):
    """Files the run writes through temporary files (mkstemp makes them 0600) get the mode a plain
    open() would give them under the user's umask, as every other program's output does."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in finished_run.iterdir() if p.is_file() and p.name[0] != "."}
    assert modes and set(modes.values()) == {0o666 & ~current_umask()}, {k: oct(v) for k, v in modes.items()}


def test_progress_left_by_a_kill_after_finishing_is_removed(run_copy, tiny_model_dir, shared_data_dir, tmp_path,
                                                            monkeypatch, capsys):
    # what a kill between results.json and the removal of progress/ leaves
    interrupt_after(monkeypatch, 1)
    assert run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, tmp_path / "killed"))[0] == 130
    shutil.copytree(tmp_path / "killed" / "progress", run_copy / "progress")
    api.load_run(run_copy)
    assert not (run_copy / "progress").exists()


def test_small_refusals(tiny_model_dir, shared_data_dir, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "plan", "--model", tiny_model_dir, "--seqlen", "1000000000")
    assert rc == 2 and "context of 131072" in err
    rc, _, err = run_cli(capsys, *prune_argv(tiny_model_dir, shared_data_dir, tmp_path / "r", "--seed", "-1"))
    assert rc == 2 and "--seed" in err and not (tmp_path / "r").exists()
    (tmp_path / "dir.gguf").mkdir()
    rc, _, err = run_cli(capsys, "eval", "--model", tmp_path / "dir.gguf")
    assert rc == 2 and "is a folder, not a GGUF file" in err
    rc, out, _ = run_cli(capsys, "prune", "--help")
    assert rc == 0 and "keep N of every M" in " ".join(out.split()) and "1:4 is 75%" in " ".join(out.split())
