"""One prune run by several JAX processes (``jax.distributed``): one writer, shared decisions,
and a failure in one process ending the others with one line.

* Process 0 alone touches the run directory (:class:`nlprune.shared_run.SharedRunDir`); the others
  learn each of its decisions (the claim, where a resumed run starts, whether the final write
  worked) through :func:`from_writer`, and the arrays it read (a resumed run's finished layers
  and their outputs) through :func:`share_arrays`, so no process reads files that process 0
  may be about to delete, and the processes need no shared filesystem.
* Decisions travel through the key-value store of the coordination service that
  ``jax.distributed.initialize`` starts (Orbax shares its own state the same way): small JSON
  values, no XLA program to compile, waits that stay interruptible. Arrays travel by
  ``multihost_utils.broadcast_one_to_all`` of their bits (a float sum with zeros would turn
  -0.0 into 0.0).
* :class:`Watchdog`: each process bumps a heartbeat in the store every second and reads the
  others'. A process that fails posts its error line; the others print
  ``... error: process 1 of 2 failed (...)`` and exit at once. One that stops beating for
  :func:`peer_timeout` seconds (killed, machine lost) is named the same way. A collective whose
  peer died fails at once on one machine (gloo sees the closed connection); the survivor then
  names the process whose heartbeat stopped. After a failure every process leaves with
  ``os._exit`` (:func:`leave`), skipping JAX's shutdown barrier, which would wait minutes for
  processes that are gone and then abort with a stack trace.

JAX itself ends every process at once, with its own fatal log, when process 0 dies: the
coordination service lives there. Nothing here can replace that message.

Nothing here is used by a one-process run; jax is imported lazily so that the command line
can import this module before ``jax.distributed.initialize``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

WRITER = 0
PREFIX = "nlprune"
PEER_TIMEOUT_ENV = "NLPRUNE_PEER_TIMEOUT"
DEFAULT_PEER_TIMEOUT = 30.0  # seconds without a heartbeat before a process is named lost
BEAT_SECONDS = 1.0
DEAD_AFTER_COLLECTIVE = 3.0  # a collective failed: a peer silent this long is the one that died


class ProcessFailed(RuntimeError):
    """Another process of the run failed, or could not be reached."""


class WriterRefused(ValueError):
    """Process 0 refused the run (its message, the same on every process)."""


# --------------------------------------------------------------------------- who is who


def distributed() -> bool:
    """Whether ``jax.distributed.initialize`` ran (jax not imported: no)."""
    return "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized()


def several() -> bool:
    if not distributed():
        return False
    import jax

    return jax.process_count() > 1


def index() -> int:
    import jax

    return jax.process_index()


def count() -> int:
    import jax

    return jax.process_count()


def is_writer() -> bool:
    """Process 0: the one that claims, writes and finishes the run directory."""
    return not several() or index() == WRITER


def name(i: int | None = None) -> str:
    return f"process {index() if i is None else i} of {count()}"


def peer_timeout() -> float:
    raw = os.environ.get(PEER_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_PEER_TIMEOUT
    except ValueError:
        raise ValueError(f"{PEER_TIMEOUT_ENV}={raw!r} is not a number of seconds; unset it or give e.g. 30.") from None
    if value <= 0:
        raise ValueError(f"{PEER_TIMEOUT_ENV}={raw!r} must be positive; unset it or give e.g. 30.")
    return value


def jax_timeouts(supported: set[str]) -> dict[str, int]:
    """``jax.distributed.initialize``'s heartbeat and shutdown timeouts, where the installed
    JAX takes them: JAX's own detection (which aborts with a fatal log) comes well after the
    watchdog's one line; a shutdown waits no longer than that for a process that is gone."""
    backstop = int(2 * peer_timeout() + 30)
    wanted = {"heartbeat_timeout_seconds": backstop, "shutdown_timeout_seconds": backstop}
    return {k: v for k, v in wanted.items() if k in supported}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- the store


def _client():
    from jax._src import distributed as jax_distributed  # the coordination service's client

    client = jax_distributed.global_state.client
    if client is None:
        raise ProcessFailed("jax.distributed is not initialised; run with --distributed (or JAX_COORDINATOR_ADDRESS).")
    return client


def _set(key: str, value: dict[str, Any]) -> None:
    _client().key_value_set(f"{PREFIX}/{key}", json.dumps(value), allow_overwrite=True)


def _dir(key: str) -> dict[str, str]:
    return {k.rsplit("/", 1)[-1]: v for k, v in _client().key_value_dir_get(f"{PREFIX}/{key}/")}


def _wait(key: str) -> dict[str, Any]:
    """The value at ``key`` once it is set: polled in 1 s waits so that Ctrl-C and SIGTERM are
    still handled; a writer that fails instead posts its error, and the watchdog ends us."""
    while True:
        try:
            return json.loads(_client().blocking_key_value_get(f"{PREFIX}/{key}", 1000))
        except Exception as e:  # noqa: BLE001  (the binding raises JaxRuntimeError; a timeout is a retry)
            if "DEADLINE_EXCEEDED" not in str(e):
                raise ProcessFailed(f"lost the coordination service while waiting for process 0 ({_one_line(e)[:200]}).") from None


_sequence = [0]  # every process makes the same decisions in the same order


def _next_key(kind: str) -> str:
    _sequence[0] += 1
    return f"{kind}/{_sequence[0]}"


# --------------------------------------------------------------------------- decisions


def _describe(e: BaseException) -> dict[str, Any]:
    if isinstance(e, OSError):
        return {"kind": "os", "errno": e.errno, "strerror": e.strerror, "filename": e.filename,
                "message": _one_line(e)}
    return {"kind": "value" if isinstance(e, ValueError) else "other", "message": _one_line(e) or type(e).__name__}


def _rebuild(error: dict[str, Any]) -> BaseException:
    """Process 0's error as the same kind of error here (the command line prints it alike)."""
    if error["kind"] == "os" and error.get("errno") is not None:
        return OSError(error["errno"], error["strerror"], *([error["filename"]] if error["filename"] else []))
    if error["kind"] == "value":
        return WriterRefused(error["message"])
    return ProcessFailed(f"process {WRITER} failed: {error['message']}")


def from_writer(decide: Callable[[], Any]) -> Any:
    """``decide()`` on process 0 only; its JSON result, or its error, on every process. One
    process: just ``decide()``."""
    if not several():
        return decide()
    key = _next_key("decision")
    if is_writer():
        try:
            value = decide()
        except BaseException as e:
            _set(key, {"error": _describe(e)})
            raise
        _set(key, {"value": value})
        return value
    got = _wait(key)
    if "error" in got:
        raise _rebuild(got["error"])
    return got["value"]


def share_arrays(arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """Process 0's ``arrays`` on every process, bit for bit (the others pass None)."""
    if not several():
        return dict(arrays or {})
    from jax.experimental import multihost_utils

    manifest = from_writer(lambda: {k: [list(a.shape), str(a.dtype)] for k, a in arrays.items()})
    out = {}
    for key, (shape, dtype) in manifest.items():
        dtype = _dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        local = _words(arrays[key]) if arrays is not None else np.zeros(-(-size // 4), np.uint32)
        got = np.asarray(multihost_utils.broadcast_one_to_all(local))
        out[key] = got.view(np.uint8)[:size].view(dtype).reshape(shape)
    return out


def _words(a: np.ndarray) -> np.ndarray:
    """``a``'s bytes as uint32 words (zero-padded): broadcast as a sum with zeros, integers
    stay exact (a float sum turns -0.0 into 0.0), and 32 bits need no jax_enable_x64."""
    raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return np.concatenate([raw, np.zeros(-raw.size % 4, np.uint8)]).view(np.uint32)


def _dtype(name: str) -> np.dtype:
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(name))  # bfloat16 too


# --------------------------------------------------------------------------- the watchdog

RERUN = "rerun every process to resume"


class Watchdog:
    """Heartbeats in the store; ends this process with one line when another fails or falls
    silent for ``timeout`` seconds."""

    def __init__(self, command: str, timeout: float):
        self.command, self.timeout = command, timeout
        self.me, self.n = index(), count()
        self._lock = threading.Lock()  # held by whoever prints the one line
        self._stopped = threading.Event()
        self._seen: dict[int, tuple[str, float]] = {}  # peer -> (its last beat, when that changed)
        self._ended: set[int] = set()  # peers seen failed or gone at the last look
        self._thread = threading.Thread(target=self._run, name="nlprune-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        """No more lines from the watchdog (waits for one being printed: that one exits)."""
        with self._lock:
            self._stopped.set()

    def _run(self) -> None:
        beat = 0
        while not self._stopped.wait(BEAT_SECONDS if beat else 0):
            beat += 1
            try:
                _set(f"beat/{self.me}", {"beat": beat})
                found = self.peers(self.timeout)
            except Exception as e:  # noqa: BLE001  (the coordination service is gone)
                self._end(f"lost the coordination service on process {WRITER} ({_one_line(e)[:200]}); {RERUN}")
                continue
            ended = {peer for peer, (state, _) in found.items() if state in ("failed", "left")}
            for peer in sorted(ended & self._ended):
                # acted on when seen twice, a beat apart: a refusal that reaches this process
                # as process 0's decision is printed by the main thread, as process 0 prints it
                self._end(f"{_ended_line(peer, *found[peer])}; stopping {name(self.me)} too")
            self._ended = ended
            for peer, (state, text) in found.items():
                if state == "silent" and not ended:
                    self._end(f"{name(peer)} {text}; stopping {name(self.me)} too; {RERUN}")

    def peers(self, silent_for: float) -> dict[int, tuple[str, str]]:
        """Every other process's state: "running", "done", "left", "failed" (with its error
        line) or "silent" (no heartbeat for ``silent_for`` s, with how long)."""
        states = {int(k): json.loads(v) for k, v in _dir("state").items()}
        beats, now, found = _dir("beat"), time.monotonic(), {}
        for peer in range(self.n):
            if peer == self.me:
                continue
            state = states.get(peer, {})
            if state.get("state") in ("done", "left", "failed"):
                found[peer] = (state["state"], state.get("message", ""))
                continue
            beat = beats.get(str(peer), "")
            last, since = self._seen.get(peer, (None, now))
            if beat != last:
                self._seen[peer] = (beat, now)
                since = now
            quiet = now - since
            found[peer] = ("silent", f"stopped responding {quiet:.0f} s ago (killed, or its machine was lost)") \
                if quiet > silent_for else ("running", "")
        return found

    def _end(self, line: str) -> None:
        with self._lock:
            if self._stopped.is_set():
                return
            with contextlib.suppress(Exception):
                _set(f"state/{self.me}", {"state": "left", "message": line})
            print(f"{_fresh_line()}{self.command}: error: {line}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)

    def who_failed(self, error: BaseException) -> str:
        """After a collective failed here: the line naming the peer that failed or died (its
        heartbeat stops within seconds), else the error itself."""
        deadline = time.monotonic() + DEAD_AFTER_COLLECTIVE + 2 * BEAT_SECONDS
        while time.monotonic() < deadline:
            try:
                found = self.peers(DEAD_AFTER_COLLECTIVE)
            except Exception:  # noqa: BLE001
                return f"lost the coordination service on process {WRITER}; {RERUN}"
            for peer, (state, text) in found.items():  # a posted failure first: the cause
                if state in ("failed", "left"):
                    return _ended_line(peer, state, text)
            for peer, (state, text) in found.items():
                if state == "silent":
                    return f"{name(peer)} {text} while {name(self.me)} exchanged data with it; {RERUN}"
            time.sleep(BEAT_SECONDS / 4)
        return f"a computation across processes failed on {name(self.me)}: {_one_line(error)[:300]}"

    def others_gone(self) -> bool:
        """Every other process has failed, left, finished or fallen silent."""
        try:
            found = self.peers(DEAD_AFTER_COLLECTIVE)
        except Exception:  # noqa: BLE001
            return True
        return all(state != "running" for state, _ in found.values())


def _ended_line(peer: int, state: str, text: str) -> str:
    return f"{name(peer)} {'failed' if state == 'failed' else 'stopped'} ({text})"


def _fresh_line() -> str:
    """A newline when a progress bar is on the current line."""
    from tqdm import tqdm

    return "\n" if getattr(tqdm, "_instances", None) else ""


_watchdog: list[Watchdog] = []


def _post_state(state: str, message: str = "") -> None:
    with contextlib.suppress(Exception):
        _set(f"state/{index()}", {"state": state, "message": message})


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No notes or warnings (process 0 shows them)."""
    logger = logging.getLogger("nlprune")
    mute = logging.Filter("nothing")  # matches no logger name: drops every record
    logger.addFilter(mute)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeFilter(mute)


@contextlib.contextmanager
def one_run(command: str) -> Iterator[None]:
    """The command's run, when several processes run it: the watchdog; notes on process 0
    only; a failure posted for the others (a collective that failed because a peer died is
    named as that peer's failure). One process: nothing."""
    if not several():
        yield
        return
    dog = Watchdog(command, peer_timeout()).start()
    _watchdog[:] = [dog]
    try:
        with contextlib.nullcontext() if is_writer() else _quiet():
            yield
    except BaseException as e:
        import jax

        if isinstance(e, jax.errors.JaxRuntimeError):
            line = dog.who_failed(e)
            dog.stop()
            _post_state("failed", line)
            raise ProcessFailed(line) from None
        dog.stop()
        _post_state("failed", _one_line(e) or type(e).__name__)
        raise
    dog.stop()
    _post_state("done")


def leave(rc: int, wait: float = 10.0) -> None:
    """After a failed command of several processes: exit now with ``rc``. Process 0 first
    waits (at most ``wait`` s) until every other process has stopped or left: the coordination
    service it hosts must outlive them, or JAX aborts them with its own fatal log."""
    if rc == 0 or not several():
        return
    if is_writer() and _watchdog:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not _watchdog[0].others_gone():
            time.sleep(BEAT_SECONDS / 4)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
