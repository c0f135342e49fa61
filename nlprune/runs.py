"""A pruning run directory: its results, its pruned model, and the state to resume it.

    RUN_DIR/.nlprune-run.json      marker: written when the directory is claimed
    RUN_DIR/.nlprune.lock          advisory lock (fcntl) naming the writing process
    RUN_DIR/results.json           the record (written last: its presence = run finished)
    RUN_DIR/model/                 Orbax checkpoint of the pruned model (weights + masks)
    RUN_DIR/masks.safetensors      the masks alone, bit-packed
    RUN_DIR/progress/layer-007/    resume state: pruned linears of each finished layer
    RUN_DIR/progress/cursor/       resume state: the next layer's calibration inputs, the
                                   settings, every finished layer's checksum and time

Every piece is written atomically (see nlprune.atomic), so a run killed at any point resumes
from its last finished layer, bit-identical to an uninterrupted run. Resume state that is
damaged or was made with other settings is named and recomputed, never loaded.

Nothing that is not provably nlprune's is deleted: ``--overwrite`` replaces only a directory
holding the marker (or an older run's files) and nothing else, and builds the new run in a
hidden sibling (``.RUN_DIR.nlprune-next``) that is swapped in only once it has finished: a
failed rerun leaves the old run as it was, an interrupted one resumes on the next rerun.

A run of several JAX processes (``jax.distributed``) has one writer, process 0
(:class:`nlprune.shared_run.SharedRunDir`); the others never touch the directory.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from nlprune import atomic, checkpoint, layered, packed_masks
from nlprune.modeling.llama import PRUNABLE_LINEARS, DecoderLayer, LlamaForCausalLM
from nlprune.modeling.masks import set_linears

RESULTS = "results.json"
MODEL = "model"
MASKS = "masks.safetensors"
PROGRESS = "progress"
CURSOR = "cursor"
MARKER = ".nlprune-run.json"
LOCK = ".nlprune.lock"
MARKER_FORMAT = "nlprune-run"
STAGING = "nlprune-next"
OURS = (RESULTS, MODEL, MASKS, PROGRESS, MARKER, LOCK)


class RunDirError(ValueError):
    """A run directory that cannot be used as asked."""


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomic JSON write: readers never see half a file, a crash never eats the old one."""
    atomic.write_file_atomically(Path(path), json.dumps(record, indent=2, default=str) + "\n")


def note(message: str) -> None:
    """A one-line notice on stderr (the CLI prints it as ``nlprune CMD: note: ...``)."""
    logging.getLogger("nlprune").warning(message)


def is_ours(name: str) -> bool:
    """An entry nlprune writes in a run directory, or a temporary file of one."""
    return name in OURS or any(name.startswith(f".{k}.") for k in OURS)


def _is_checkpoint(path: Path) -> bool:
    return (path / checkpoint.SIDECAR).is_file()


def has_marker(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()).get("format") == MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_run(path: Path) -> bool:
    """A directory nlprune made: its marker, or (older runs) our checkpoints and no other files."""
    if not path.is_dir():
        return False
    if has_marker(path):
        return True
    entries = [p.name for p in path.iterdir()]
    made = _is_checkpoint(path / MODEL) or _is_checkpoint(path / PROGRESS / CURSOR)
    return made and all(is_ours(n) for n in entries)


def foreign_entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not is_ours(p.name))


def _names(entries: list[str], most: int = 3) -> str:
    shown = ", ".join(entries[:most])
    return shown + (f" and {len(entries) - most} more" if len(entries) > most else "")


def fingerprint_sha256(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def check_output_file(path: str | Path, overwrite: bool, flag: str = "--output") -> Path:
    """Refuse, before any work, a JSON output that would replace a folder, a run's own file or
    (without ``overwrite``) any existing file, or that cannot be written."""
    if str(path).strip() == "":
        raise RunDirError(f"{flag} is empty (an unset variable?); give the file to write.")
    target = Path(path)
    if target.is_dir():
        raise RunDirError(f"{flag} {target} is a folder; give a file path such as {target / 'eval.json'}.")
    if target.name in OURS and is_run(target.parent):
        raise RunDirError(
            f"{flag} {target} belongs to the nlprune run {target.parent}; write elsewhere "
            f"(for example {target.parent / 'eval.json'})."
        )
    if target.exists() and not overwrite:
        raise RunDirError(f"{flag} {target} exists; pass --overwrite to replace it, or choose another path.")
    problem = atomic.creatable_problem(target)
    if problem:
        raise RunDirError(f"{flag} {target}: {problem}; choose another path.")
    return target


class RunDir:
    def __init__(self, path: str | Path):
        self.given = str(path)  # as typed: "" (an unset variable) reads as "."
        self.path = Path(path)
        self.work = self.path  # where this run writes: the path itself, or the staging sibling
        self._locks: list[atomic.DirectoryLock] = []
        self._claimed: list[tuple[Path, bool, bool]] = []  # (folder, created by us, was empty)
        self._fingerprint: dict[str, Any] | None = None
        self._layers: dict[str, str] = {}  # layer index -> its sidecar's checksum
        self.layer_seconds: list[float] = []  # every finished layer, earlier segments included

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    @property
    def progress(self) -> Path:
        return self.work / PROGRESS

    @property
    def staging(self) -> Path:
        return self.path.parent / f".{self.path.name}.{STAGING}"

    def is_finished(self) -> bool:
        return self.results_path.is_file()

    # ---- claiming ------------------------------------------------------------------------

    def check_target(self, overwrite: bool) -> None:
        """Every refusal that needs no lock, before anything is loaded or written."""
        path = Path(os.path.abspath(self.path))
        if path == Path.cwd() and not is_run(path):
            raise RunDirError(
                f"--output {self.given!r} is the current folder {path}, which is not an nlprune "
                "run (an unset variable?); give the run directory's own path."
            )
        atomic.recover_interrupted_swap(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--output {self.path} exists and is not a directory; choose another --output.")
        problem = atomic.creatable_problem(self.path)
        if problem:
            raise RunDirError(f"--output {self.path}: {problem}; choose another --output.")
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return
        if not is_run(self.path):
            raise RunDirError(
                f"{self.path} is not empty and is not an nlprune run (it holds "
                f"{_names(foreign_entries(self.path) or [p.name for p in self.path.iterdir()])}); "
                "nothing was changed. Choose another --output."
            )
        if self.is_finished() and not overwrite:
            staged = " (an interrupted --overwrite rerun is staged: rerun it to resume)" if self.staging.exists() else ""
            raise RunDirError(
                f"{self.path} already holds a finished run ({RESULTS}){staged}; pass --overwrite to "
                "replace it, or choose another --output."
            )
        foreign = foreign_entries(self.path)
        if overwrite and foreign:
            raise RunDirError(
                f"{self.path} holds files nlprune did not write ({_names(foreign)}), which --overwrite "
                "would delete; move them out of the run directory or choose another --output."
            )

    def claim(self, overwrite: bool) -> None:
        """Lock the directory (one writer at a time) and mark it as an nlprune run."""
        self.check_target(overwrite)
        busy = atomic.swap_in_progress(self.path)
        if busy:
            raise RunDirError(f"{self.path} is being replaced by {busy}; wait for it to finish.")
        try:
            self._claim_dir(self.path)
            self.check_target(overwrite)  # again, now that no other writer can change it
            if self.is_finished() and (self.path / PROGRESS).exists():
                shutil.rmtree(self.path / PROGRESS, ignore_errors=True)  # killed just after finishing
            if overwrite and any((self.path / n).exists() for n in (RESULTS, MODEL, MASKS, PROGRESS)):
                if self.staging.exists() and (not has_marker(self.staging) or foreign_entries(self.staging)):
                    raise RunDirError(
                        f"{self.staging} exists and is not nlprune's staging directory; move it away."
                    )
                self._claim_dir(self.staging)
                self.work = self.staging
        except BaseException:
            self.release(failed=True)
            raise

    @contextlib.contextmanager
    def claimed(self, overwrite: bool) -> Iterator["RunDir"]:
        """:meth:`claim`, then :meth:`release` on leaving (``failed`` when by an exception)."""
        self.claim(overwrite)
        try:
            yield self
        except BaseException:
            self.release(failed=True)
            raise
        self.release()

    def _claim_dir(self, path: Path) -> None:
        try:
            path.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
        empty = not any(p.name not in (MARKER, LOCK) for p in path.iterdir())
        lock = atomic.DirectoryLock(path / LOCK, f"run directory {self.path}").acquire()
        self._locks.append(lock)
        self._claimed.append((path, created, empty))
        if lock.note:
            note(lock.note)
        if not has_marker(path):
            marker = {"format": MARKER_FORMAT, "version": 1, "host": atomic.host(), "pid": os.getpid(),
                      "created": datetime.datetime.now().isoformat(timespec="seconds")}
            write_json(path / MARKER, marker)

    def release(self, failed: bool = False) -> None:
        """Drop the locks. After a failure, what the claim added to a folder that was empty
        (or absent) goes again while the lock is still held: no empty run folder is left."""
        if failed:
            for path, created, empty in reversed(self._claimed):
                if not empty or not path.is_dir() or any(p.name not in (MARKER, LOCK) for p in path.iterdir()):
                    continue
                if created:
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    for name in (MARKER, LOCK):
                        (path / name).unlink(missing_ok=True)
        for lock in reversed(self._locks):
            lock.release()
        self._locks, self._claimed = [], []

    # ---- resuming ------------------------------------------------------------------------

    def resume(
        self, model: LlamaForCausalLM | None, fingerprint: dict[str, Any], overwrite: bool
    ) -> tuple[int, LlamaForCausalLM | None, jax.Array | None]:
        """(layer to start from, model with the finished layers restored, that layer's inputs).
        ``model`` None (a streamed run): the finished layers are checked, not loaded.

        Resume state from other settings is refused (named fields) unless ``overwrite``;
        damaged resume state is named, discarded and recomputed from layer 0."""
        self._fingerprint = fingerprint
        if self.work == self.path and (self.path / RESULTS).exists():
            raise RunDirError(f"{self.path} already holds a finished run; pass --overwrite to replace it.")
        if self.work == self.staging:  # a staged run that finished but was never swapped in: rebuilt
            shutil.rmtree(self.work / MODEL, ignore_errors=True)
            for name in (RESULTS, MASKS):
                (self.work / name).unlink(missing_ok=True)
        cursor = self.progress / CURSOR
        if not self.progress.exists():
            return 0, model, None
        if not cursor.exists():
            return self._restart(model, f"{self.progress} has no {CURSOR}")
        try:
            meta = checkpoint.read_meta(cursor)["meta"]
            saved = meta["fingerprint"]
        except KeyError as e:
            return self._restart(model, f"{cursor} has no {e} entry")
        except (checkpoint.CheckpointError, ValueError, TypeError) as e:
            return self._restart(model, f"{cursor} is unreadable ({e})")
        if saved != fingerprint:
            if overwrite:
                return self._restart(model, None)
            diff = [
                f"{k}: saved {saved.get(k)!r}, now {fingerprint.get(k)!r}"
                for k in sorted(set(saved) | set(fingerprint))
                if saved.get(k) != fingerprint.get(k)
            ]
            raise RunDirError(
                f"{self.path} holds an unfinished run with other settings ({'; '.join(diff)}); "
                "rerun with the same settings to resume it, or pass --overwrite to start over."
            )
        try:
            start = int(meta["next_layer"])
            layers = {str(k): str(v) for k, v in meta["layers"].items()}
            seconds = [float(s) for s in meta["layer_seconds"]]
            if sorted(layers, key=int) != [str(i) for i in range(start)] or len(seconds) != start:
                raise ValueError("its layer list does not match next_layer")
            restored, hidden = self._restore(model, start, layers)
        except KeyError as e:  # a cursor written by an nlprune without checksums
            return self._restart(model, f"{cursor} has no {e} entry")
        except (checkpoint.CheckpointError, ValueError, TypeError) as e:
            return self._restart(model, str(e))
        self._layers, self.layer_seconds = layers, seconds
        return start, restored, hidden

    def _restart(self, model: LlamaForCausalLM, problem: str | None):
        if problem is not None:
            note(f"the resume state in {self.progress} cannot be used ({problem.rstrip('. ')}); "
                 "recomputing the run from layer 0.")
        shutil.rmtree(self.progress, ignore_errors=True)
        self._layers, self.layer_seconds = {}, []
        return 0, model, None

    def _restore(self, model: LlamaForCausalLM | None, start: int, layers: dict[str, str]):
        """The model with layers 0..start-1 restored (None for a streamed run: each finished
        layer is checked here and read again when needed) and layer ``start``'s inputs."""
        restored = None if model is None else list(model.model.layers)
        for i in range(start):
            where = self._checked_layer(i, layers)
            if restored is not None:
                state, _ = checkpoint.load_state(where)
                updates = {n: (jnp.asarray(s["weight"]), jnp.asarray(s["mask"])) for n, s in state.items()
                           if n in PRUNABLE_LINEARS}
                restored[i] = set_linears(restored[i], updates)
        state, _ = checkpoint.load_state(self.progress / CURSOR)
        if restored is not None:
            model = eqx.tree_at(lambda m: m.model.layers, model, restored)
        return model, jnp.asarray(state["hidden"])

    def _checked_layer(self, i: int, layers: dict[str, str] | None = None) -> Path:
        """Layer i's resume state, checked against the cursor's checksum and this run's settings."""
        layers = self._layers if layers is None else layers
        expected = fingerprint_sha256(self._fingerprint or {})
        where = self.progress / f"layer-{i:03d}"
        sidecar = checkpoint.read_meta(where)
        if sidecar.get("checksum") != layers.get(str(i)):
            raise ValueError(f"{where} is not the layer the cursor recorded (checksum differs)")
        if sidecar["meta"].get("layer") != i or sidecar["meta"].get("fingerprint_sha256") != expected:
            raise ValueError(f"{where} was written for another layer or other settings")
        return where

    def pruned_layer(self, config, i: int) -> DecoderLayer:
        """Pruned layer i of this (streamed) run, from its resume state."""
        state, _ = checkpoint.load_state(self._checked_layer(i))
        return layered.layer_from_state(config, state)

    # ---- per-layer resume state ----------------------------------------------------------

    def save_layer(
        self, index: int, layer: DecoderLayer, hidden: jax.Array, fingerprint: dict, seconds: float = 0.0,
        config=None,
    ) -> None:
        """After layer ``index`` is pruned: its linears, then the cursor (next inputs, the
        settings, every finished layer's checksum and time)."""
        state = layered.layer_state(layer)  # the whole layer: a streamed run's model is these
        if config is not None:  # a streamed run's masks file is joined from these at the end
            packed_masks.save_packed_layer_masks(self.progress / f"masks-{index:03d}.safetensors", config, index, layer)
        where = checkpoint.save_state(
            self.progress / f"layer-{index:03d}", state,
            {"layer": index, "fingerprint_sha256": fingerprint_sha256(fingerprint)},
        )
        self._layers = {k: v for k, v in self._layers.items() if int(k) < index}
        self._layers[str(index)] = checkpoint.read_meta(where)["checksum"]
        self.layer_seconds = self.layer_seconds[:index] + [float(seconds)]
        checkpoint.save_state(
            self.progress / CURSOR,
            {"hidden": np.asarray(hidden)},
            {"next_layer": index + 1, "fingerprint": fingerprint, "layers": self._layers,
             "layer_seconds": self.layer_seconds},
        )

    # ---- final outputs -------------------------------------------------------------------

    def finish(self, model: LlamaForCausalLM, record: dict[str, Any], meta: dict[str, Any]) -> None:
        """Write the outputs (results.json last: it marks the run finished), drop the resume
        state, and swap a staged rerun onto the old run; then release the lock."""
        checkpoint.save_model(self.work / MODEL, model, meta)
        packed_masks.save_packed_masks(self.work / MASKS, model)
        self._publish(record)

    def _publish(self, record: dict[str, Any]) -> None:
        """results.json last (it marks the run finished), the resume state dropped, a staged
        rerun swapped onto the old run, the lock released."""
        write_json(self.work / RESULTS, record)
        shutil.rmtree(self.work / PROGRESS, ignore_errors=True)
        if self.work != self.path:
            with atomic.deferred_signals():
                atomic.swap_into(self.work, self.path)
            self.work = self.path
        self.release()

    def finish_streamed(self, shell: dict[str, Any], config, record: dict[str, Any], meta: dict[str, Any]) -> None:
        """:meth:`finish` for a streamed run: the model is its per-layer states (linked, not
        copied) and ``shell`` (:func:`nlprune.runner.shell_parts`); the packed masks file is
        joined from the per-layer ones save_layer wrote."""
        dirs = [self._checked_layer(i) for i in range(config.num_hidden_layers)]
        layered.save_layered_model(self.work / MODEL, shell, dirs, config, meta)
        masks = [self.progress / f"masks-{i:03d}.safetensors" for i in range(config.num_hidden_layers)]
        for i, part in enumerate(masks):  # written by save_layer; remade from the layer if a crash lost it
            if not part.is_file():
                packed_masks.save_packed_layer_masks(part, config, i, self.pruned_layer(config, i))
        packed_masks.join_packed_masks(self.work / MASKS, masks)
        self._publish(record)


def open_finished(run_dir: str | Path) -> RunDir:
    """A finished run, to read: an interrupted swap is undone, and resume state left by a run
    killed just after it finished is removed when no writer holds the lock."""
    run = RunDir(run_dir)
    atomic.recover_interrupted_swap(run.path)
    if not run.path.is_dir():
        raise RunDirError(f"run directory {run.path} does not exist.")
    if not run.is_finished() and any(run.path.iterdir()) and not is_run(run.path):
        raise RunDirError(f"{run.path} is not an nlprune run directory; give the --output of an `nlprune prune`.")
    if not run.is_finished():
        raise RunDirError(
            f"{run.path} has no {RESULTS}: the run did not finish (rerun `nlprune prune` "
            "with the same --output to resume it)."
        )
    if (run.path / PROGRESS).exists() and os.access(run.path, os.W_OK):
        lock = atomic.DirectoryLock(run.path / LOCK, f"run directory {run.path}")
        try:
            lock.acquire()
        except (atomic.LockedError, OSError):
            return run
        try:
            shutil.rmtree(run.path / PROGRESS, ignore_errors=True)
        finally:
            lock.release()
    return run
