"""Two JAX processes (jax.distributed, gloo collectives on CPU) pruning one run directory.

Each process has 2 simulated CPU devices; together they form one 4-device mesh
(--mesh data=2,model=2: 'data' across the processes, 'model' within each). Process 1 runs in
its own empty folder with the same relative --output, so anything it wrote to "its" run
directory would show there: only process 0 may write. A one-process run on a 4-device mesh
is the reference for the masks.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from nlprune import checkpoint, packed_masks
from nlprune.cli import main as cli_main
from test_parallel import simulated_env

# `nlprune` with a test hook: NLPRUNE_TEST_KILL=PROCESS:LAYER kills that process (SIGKILL, no
# clean-up, like a lost machine) as it reaches layer LAYER's checkpoint; process 0 has saved
# layer LAYER-1 by then (layer LAYER's collectives needed it past that save).
WORKER = textwrap.dedent(
    """
    import os, signal, sys
    from nlprune import processes, runs, shared_run
    from nlprune.cli import main

    kill = os.environ.get("NLPRUNE_TEST_KILL")
    if kill:
        victim, layer = map(int, kill.split(":"))
        save_layer = shared_run.SharedRunDir.save_layer

        def save_or_die(self, index, *args, **kwargs):
            if index == layer and processes.index() == victim:
                os.kill(os.getpid(), signal.SIGKILL)
            return save_layer(self, index, *args, **kwargs)

        shared_run.SharedRunDir.save_layer = save_or_die
    sys.exit(main(sys.argv[1:]))
    """
)
PRUNE = ["--prune-method", "wanda", "--sparsity-type", "2:4", "--nsamples", "4", "--seqlen", "64",
         "--mesh", "data=2,model=2", "--output", "run"]
WAIT = 240  # s: a whole two-process run takes ~30 s on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """One `nlprune prune` process of the job; its output goes to files (no pipe fills up)."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str]):
        self.out, self.err = cwd.with_suffix(".out"), cwd.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        self.ended: float | None = None  # time.perf_counter() when seen exited

    @property
    def result(self) -> tuple[int, str, str]:
        return self.popen.returncode, self.out.read_text(), self.err.read_text()


def start_pair(tmp_path: Path, model_dir: Path, data_dir: Path, *flags: str, **env_extra: str) -> list[Process]:
    """`nlprune prune` (PRUNE and ``flags``) as processes 0 and 1 of one jax.distributed job,
    each in its own folder."""
    port = free_port()
    procs = []
    for i in range(2):
        cwd = tmp_path / f"process{i}"
        cwd.mkdir(exist_ok=True)
        env = {**simulated_env(2), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(i), **env_extra}
        cmd = [sys.executable, "-c", WORKER, "prune", "--model", str(model_dir), "--data-dir", str(data_dir), *PRUNE,
               *flags]
        procs.append(Process(cmd, cwd, env))
    return procs


def finish(procs: list[Process]) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each process, noting when each ended; none may outlive WAIT."""
    deadline = time.perf_counter() + WAIT
    while any(p.ended is None for p in procs):
        for p in procs:
            if p.ended is None and p.popen.poll() is not None:
                p.ended = time.perf_counter()
        if time.perf_counter() > deadline:
            for p in procs:
                p.popen.kill()
            tails = "\n".join(p.err.read_text()[-1500:] for p in procs)
            raise AssertionError(f"a process was still running after {WAIT} s: a hang\n{tails}")
        time.sleep(0.1)
    return [p.result for p in procs]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("nlprune prune: error:")]


def assert_clean(result, what: str) -> None:
    rc, _, stderr = result
    assert rc == 0, f"{what}: exit {rc}\n{stderr[-3000:]}"
    assert not errors(stderr) and "Traceback" not in stderr, f"{what}\n{stderr[-3000:]}"


def assert_only_process_0_wrote(tmp_path: Path) -> Path:
    run = tmp_path / "process0" / "run"
    assert (run / "results.json").is_file() and (run / "masks.safetensors").is_file() and (run / "model").is_dir()
    assert not (run / "progress").exists()
    assert sorted(p.name for p in (tmp_path / "process1").iterdir()) == [], "process 1 wrote its --output"
    return run


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, shared_data_dir, tmp_path_factory) -> Path:
    """The reference: one process, 4 devices, the same mesh and flags."""
    out = tmp_path_factory.mktemp("one") / "run"
    cmd = [sys.executable, "-m", "nlprune.cli", "prune", "--model", str(tiny_model_dir), "--data-dir",
           str(shared_data_dir), *PRUNE[:-1], str(out)]
    proc = subprocess.run(cmd, env=simulated_env(4), capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_run(run: Path, reference: Path) -> None:
    """Masks bit for bit, and every weight too: the 4-device mesh runs the same XLA programs in
    one process or two (the sums over 'data' add the same two halves)."""
    a, b = packed_masks.load_packed_masks(run / "masks.safetensors"), packed_masks.load_packed_masks(reference / "masks.safetensors")
    assert a.keys() == b.keys() and len(a) == 6 * 7
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    model, _ = checkpoint.load_model(run / "model")
    ref, _ = checkpoint.load_model(reference / "model")
    import jax

    for x, y in zip(jax.tree.leaves(model), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rec, ref_rec = json.loads((run / "results.json").read_text()), json.loads((reference / "results.json").read_text())
    assert rec["mesh"]["processes"] == 2 and ref_rec["mesh"]["processes"] == 1
    assert rec["mesh"]["axes"] == ref_rec["mesh"]["axes"] == {"data": 2, "model": 2}
    assert rec["sparsity"]["per_linear"] == ref_rec["sparsity"]["per_linear"]


@pytest.mark.slow
def test_two_processes_write_one_run(tiny_model_dir, shared_data_dir, one_process_run, tmp_path):
    started = time.perf_counter()
    procs = start_pair(tmp_path, tiny_model_dir, shared_data_dir)
    results = finish(procs)
    for i, result in enumerate(results):
        assert_clean(result, f"process {i}")
    run = assert_only_process_0_wrote(tmp_path)
    assert json.loads((run / ".nlprune-run.json").read_text())["pid"] == procs[0].popen.pid
    assert_same_run(run, one_process_run)
    (_, out0, err0), (_, out1, err1) = results
    assert "sparsity 0.5000" in out0 and "on mesh data=2,model=2" in out0 and "sparsity" not in out1  # reported once
    assert "wanda 2:4" in err0 and "layer/s" not in err1  # the progress bar too
    print(f"two-process run: {time.perf_counter() - started:.1f} s")


@pytest.mark.slow
def test_a_killed_process_ends_the_other_and_the_run_resumes(tiny_model_dir, shared_data_dir, one_process_run,
                                                            tmp_path):
    """Process 1 dies at layer 3's checkpoint: process 0 ends with one line naming it, soon.
    A rerun with another seed is refused by both; the same command resumes from layer 3 and
    finishes with the uninterrupted run's masks; the run exports."""
    procs = start_pair(tmp_path, tiny_model_dir, shared_data_dir, NLPRUNE_TEST_KILL="1:3")
    (rc0, _, err0), (rc1, _, _) = finish(procs)
    assert rc1 == -9
    assert rc0 == 1, err0[-3000:]
    lines = errors(err0)
    assert len(lines) == 1 and "process 1 of 2" in lines[0] and "Traceback" not in err0, err0[-3000:]
    assert "Check failure" not in err0 and "Terminating process" not in err0, err0[-3000:]
    seconds = procs[0].ended - procs[1].ended
    print(f"process 0 ended {seconds:.1f} s after process 1 was killed: {lines[0]}")
    assert seconds < 20
    progress = tmp_path / "process0" / "run" / "progress"
    assert (progress / "layer-002").is_dir() and not (progress / "layer-003").exists()

    # other settings: process 0 refuses to resume, process 1 says the same; nothing changes
    for rc, _, stderr in finish(start_pair(tmp_path, tiny_model_dir, shared_data_dir, "--seed", "1")):
        lines = errors(stderr)
        assert rc == 2 and len(lines) == 1 and "seed: saved 0, now 1" in lines[0], stderr[-3000:]
    assert (progress / "layer-002").is_dir()

    results = finish(start_pair(tmp_path, tiny_model_dir, shared_data_dir))
    for i, result in enumerate(results):
        assert_clean(result, f"resumed process {i}")
    run = assert_only_process_0_wrote(tmp_path)
    assert json.loads((run / "results.json").read_text())["resumed_from_layer"] == 3
    assert_same_run(run, one_process_run)
    assert cli_main(["export-hf", "--run", str(run), "--output", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_process_0_refusing_the_run_refuses_it_everywhere(tiny_model_dir, shared_data_dir, tmp_path):
    """A finished run without --overwrite: process 0 refuses it and process 1 says the same,
    one line each, at once (no process waits for the other)."""
    run = tmp_path / "process0" / "run"
    run.mkdir(parents=True)
    (run / "results.json").write_text("{}")
    (run / ".nlprune-run.json").write_text(json.dumps({"format": "nlprune-run"}))
    started = time.perf_counter()
    results = finish(start_pair(tmp_path, tiny_model_dir, shared_data_dir))
    for rc, _, stderr in results:
        assert rc == 2, stderr[-3000:]
        lines = errors(stderr)
        assert len(lines) == 1 and "already holds a finished run" in lines[0] and "Traceback" not in stderr, stderr
    assert time.perf_counter() - started < WAIT / 2
    assert sorted(p.name for p in (tmp_path / "process1").iterdir()) == []


# ------------------------------------------------------------------------------ the parts, in one process


def test_one_process_takes_the_plain_path(tmp_path):
    from nlprune import processes, runs, shared_run

    assert not processes.several() and processes.is_writer()
    assert processes.from_writer(lambda: {"start": 3}) == {"start": 3}
    assert type(shared_run.open_for_writing(tmp_path / "run")) is runs.RunDir


@pytest.mark.parametrize("array", [np.array([-0.0, 1.5, np.nan, -np.inf], np.float32), np.arange(7, dtype=np.int8),
                                   np.eye(3, 5, dtype=bool), np.array(2.0), np.zeros((2, 0), np.float32)])
def test_arrays_travel_as_their_bits(array):
    from nlprune import processes

    words = processes._words(array)
    assert words.dtype == np.uint32
    back = words.view(np.uint8)[: array.nbytes].view(array.dtype).reshape(array.shape)
    assert back.tobytes() == array.tobytes()  # -0.0 and NaN payloads included


def test_process_0s_errors_are_raised_alike_elsewhere():
    import errno

    from nlprune import processes

    full = processes._rebuild(processes._describe(OSError(errno.ENOSPC, "No space left on device", "/run/x")))
    assert isinstance(full, OSError) and (full.errno, full.strerror, full.filename) == (errno.ENOSPC, "No space left on device", "/run/x")
    refused = processes._rebuild(processes._describe(ValueError("/run already holds a finished run;\n pass --overwrite")))
    assert isinstance(refused, ValueError) and str(refused) == "/run already holds a finished run; pass --overwrite"
    other = processes._rebuild(processes._describe(KeyboardInterrupt()))
    assert isinstance(other, processes.ProcessFailed) and str(other) == "process 0 failed: KeyboardInterrupt"


def test_peer_timeout_and_jax_timeouts(monkeypatch):
    from nlprune import processes

    monkeypatch.setenv("NLPRUNE_PEER_TIMEOUT", "5")
    assert processes.jax_timeouts({"heartbeat_timeout_seconds"}) == {"heartbeat_timeout_seconds": 40}
    assert processes.jax_timeouts(set()) == {}  # a JAX without the arguments
    for bad, message in (("soon", "is not a number of seconds"), ("0", "must be positive")):
        monkeypatch.setenv("NLPRUNE_PEER_TIMEOUT", bad)
        with pytest.raises(ValueError, match=message):
            processes.peer_timeout()


def test_the_watchdog_names_failed_and_silent_processes(monkeypatch):
    """Process 0 of 3 looking at the store: process 1 beats, then falls silent; process 2 failed."""
    from nlprune import processes

    store = {"state": {}, "beat": {"1": "1", "2": "1"}}
    clock = [100.0]
    monkeypatch.setattr(processes, "_dir", lambda key: dict(store[key]))
    monkeypatch.setattr(processes, "index", lambda: 0)
    monkeypatch.setattr(processes, "count", lambda: 3)
    monkeypatch.setattr(processes.time, "monotonic", lambda: clock[0])
    dog = processes.Watchdog("nlprune prune", timeout=10)
    assert dog.peers(10) == {1: ("running", ""), 2: ("running", "")}
    clock[0] += 11
    store["beat"]["2"] = "2"
    store["state"]["2"] = json.dumps({"state": "done"})
    assert dog.peers(10) == {1: ("silent", "stopped responding 11 s ago (killed, or its machine was lost)"),
                             2: ("done", "")}
    store["state"]["2"] = json.dumps({"state": "failed", "message": "disk full"})
    assert dog.peers(10)[2] == ("failed", "disk full")
    assert dog.who_failed(RuntimeError("gloo")) == "process 2 of 3 failed (disk full)"
    assert dog.others_gone()  # silent or failed: process 0 may leave
