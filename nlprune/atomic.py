"""Crash-safe file system steps: atomic files and directory swaps, locks, deferred signals.

* :func:`write_atomically` fills a hidden temporary sibling (``.<name>.tmp-<host>-<pid>-<token>``)
  and swaps it onto the target only once complete; :func:`swap_into` does the swap for a
  directory built elsewhere. The previous version is moved aside (``.<name>.old-...``) and
  deleted only after the new one is in place, so a crash leaves either the old or the new
  version; in the one window where neither is at the target (between the two renames),
  :func:`recover_interrupted_swap` puts the previous one back.
* :func:`write_file_atomically`: the same for one file (temporary sibling + rename), with the
  usual permissions (0666 minus the umask).
* :class:`DirectoryLock`: an advisory ``fcntl.flock`` lock file holding its holder's pid and
  host, so a second writer is refused with one line naming the holder.
* :func:`deferred_signals`: SIGINT/SIGTERM arriving during a save take effect once the save is
  complete, so an interrupted run never leaves a writer thread behind or a half-made swap;
  :func:`raise_terminated` makes SIGTERM an exception like Ctrl-C's, and
  :func:`install_unraisable_hook` keeps either from being lost in a garbage-collector callback.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- names and liveness


def host() -> str:
    return socket.gethostname().replace("/", "_") or "host"


def sibling_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-"


def new_token() -> str:
    """``<host>-<pid>-<random>``: names a writer's temporary siblings."""
    return f"{host()}-{os.getpid()}-{secrets.token_hex(4)}"


def leftovers(path: Path, kind: str) -> list[tuple[Path, str, int]]:
    """Hidden ``tmp``/``old`` siblings of ``path`` as (dir, host, pid), newest first."""
    prefix = sibling_prefix(path, kind)
    if not path.parent.is_dir():
        return []
    found = []
    for p in path.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        parts = p.name[len(prefix):].rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit():
            found.append((p, parts[0], int(parts[1])))

    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except FileNotFoundError:  # removed meanwhile by its own writer
            return 0.0

    return sorted(found, key=lambda t: mtime(t[0]), reverse=True)


def pid_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def writer_is_dead(writer_host: str, pid: int) -> bool:
    """True when the process that made a leftover can no longer be writing it."""
    if writer_host != host():
        return False  # another machine on a shared filesystem: we cannot tell, leave it be
    if pid == os.getpid():
        return False
    return not pid_is_alive(pid)


# --------------------------------------------------------------------------- flushing


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root, so the rename never outruns the data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by path relative to it."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            h = hashlib.sha256()
            with open(full, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            out[full.relative_to(root).as_posix()] = h.hexdigest()
    return out


def file_mode() -> int:
    """The mode a plain ``open(..., "w")`` gives a new file: 0666 minus the umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


# --------------------------------------------------------------------------- swaps


def recover_interrupted_swap(path: str | Path) -> None:
    """Undo what a killed :func:`write_atomically` / :func:`swap_into` left at ``path``.

    If ``path`` is missing but its previous version sits aside (killed between the two
    renames), the previous version is put back. Temporary and set-aside directories of dead
    writers on this host are deleted.
    """
    path = Path(path)
    if not path.exists():
        for old, writer, pid in leftovers(path, "old"):
            if writer_is_dead(writer, pid):
                log.warning("%s: restoring the previous version %s (a save was interrupted)", path, old)
                os.rename(old, path)
                break
    for kind in ("old", "tmp"):
        for leftover, writer, pid in leftovers(path, kind):
            if leftover.exists() and writer_is_dead(writer, pid):
                shutil.rmtree(leftover, ignore_errors=True)


def swap_in_progress(path: Path) -> str | None:
    """The writer (``host pid``) of a live swap onto ``path``, if one is half-way."""
    if path.exists():
        return None
    for _, writer, pid in leftovers(path, "old"):
        if not writer_is_dead(writer, pid):
            return f"pid {pid} on {writer}"
    return None


def swap_into(staged: Path, path: Path, token: str | None = None) -> Path:
    """Rename the complete directory ``staged`` onto ``path``; the previous ``path`` (if any)
    is moved aside first and deleted only once the new one is in place."""
    token = token or new_token()
    old = None
    try:
        if path.exists() or path.is_symlink():
            # POSIX rename cannot replace a non-empty directory: move the old one aside first.
            old = path.parent / (sibling_prefix(path, "old") + token)
            os.rename(path, old)
        os.rename(staged, path)
        fsync_dir(path.parent)
    except BaseException:
        if old is not None and not (path.exists() or path.is_symlink()):
            os.rename(old, path)  # the swap failed half-way: put the previous version back
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    return path


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Have ``write(tmp)`` fill a fresh sibling directory, then swap it onto ``path``.

    Whatever was at ``path`` (callers decide whether it may be replaced) stays in place until
    the new directory is complete and flushed; it is deleted only after the swap. SIGINT and
    SIGTERM wait until the swap is done or undone (:func:`deferred_signals`).
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with deferred_signals():
        recover_interrupted_swap(path)
        token = new_token()
        tmp = path.parent / (sibling_prefix(path, "tmp") + token)
        tmp.mkdir()
        try:
            write(tmp)
            fsync_tree(tmp)
            swap_into(tmp, path, token)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def write_file_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Have ``write(tmp)`` create a temporary sibling file, then rename it onto ``path``:
    readers see the old or the new file, a crash never leaves half a file, a failure leaves no
    temporary file. The file gets the usual permissions (some writers create theirs 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{new_token()}")
    try:
        with deferred_signals():
            write(tmp)
            os.chmod(tmp, file_mode())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_file_atomically(path: str | Path, data: str | bytes) -> Path:
    """:func:`write_file_with` for text or bytes."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    return write_file_with(path, lambda tmp: tmp.write_bytes(payload))


# --------------------------------------------------------------------------- checks


def os_error_in(e: BaseException, path: str | Path) -> OSError | None:
    """The OS error (disk full, read-only, ...) that a library reported as text, if any:
    tensorstore and safetensors raise ValueError-like errors with the errno inside."""
    text = str(e)
    codes = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)
    code = next((c for c in codes if f"os_error_code='{c}'" in text or f"os error {c})" in text), None)
    if code is None and "No space left on device" in text:
        code = errno.ENOSPC
    return None if code is None else OSError(code, os.strerror(code), str(path))


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def creatable_problem(path: str | Path) -> str | None:
    """Why ``path`` (a file or folder to create, fill or replace) cannot be written, or None.

    ``os.access`` also sees read-only mounts, for root too."""
    target = Path(os.path.abspath(path))
    base = nearest_existing(target)
    if base != target and not base.is_dir():
        return f"{base} is a file, so {target} cannot be created under it"
    # new entries go into the nearest existing folder; replacing renames in the parent
    folders = [base] if base != target else [target.parent] + ([target] if target.is_dir() else [])
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} is not writable"
    return None


# --------------------------------------------------------------------------- locks


class LockedError(ValueError):
    """Another process holds the lock."""


class DirectoryLock:
    """An advisory lock (``fcntl.flock``) on ``lock_path``, whose content names the holder.

    The kernel releases a flock when its holder dies, so a lock left by a killed process is
    free; its file still names the dead holder, and taking it over says so (``note``).
    """

    def __init__(self, lock_path: Path, what: str):
        self.lock_path = Path(lock_path)
        self.what = what
        self.fd: int | None = None
        self.note: str | None = None

    def acquire(self) -> "DirectoryLock":
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
                   if holder else "another process")
            raise LockedError(
                f"{self.what} is in use by {who}; wait for it to finish or stop it, or choose "
                "another output."
            ) from None
        except OSError as e:  # a filesystem without locks (some network mounts)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning("%s: cannot lock %s (%s); make sure no other nlprune writes there",
                        self.what, self.lock_path, e.strerror)
        previous = _read_holder(fd)
        if previous.get("host") == host() and isinstance(previous.get("pid"), int) \
                and previous["pid"] != os.getpid() and not pid_is_alive(previous["pid"]):
            self.note = (f"took over the lock of {self.what} from pid {previous['pid']}, which "
                         "stopped without releasing it")
        me = {"pid": os.getpid(), "host": host(),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # empty: released cleanly
        except OSError:
            pass
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode()) if raw.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- signals


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then deliver them.

    A save interrupted half-way would leave Orbax's writer threads writing into a directory
    being removed; deferring the signal lets the (short) save finish or fail cleanly first.
    A second SIGINT is delivered at once: the user insists.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and signal.SIGINT in received:
            _deliver(signum, previous[signum])
        received.append(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(received):
            _deliver(s, previous[s])


def _deliver(signum: int, handler: Any) -> None:
    if callable(handler):
        handler(signum, None)  # Python's SIGINT handler raises KeyboardInterrupt
    elif handler in (signal.SIG_DFL, None):
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so a run stops as cleanly as on Ctrl-C."""


def raise_terminated(signum: int, frame: Any) -> None:
    """A SIGTERM handler: raise :class:`Terminated` where the main thread is."""
    raise Terminated()


def _unraisable(unraisable: Any) -> None:
    """Python swallows an exception raised inside a garbage-collector callback (jax has one):
    a Ctrl-C or SIGTERM landing there would be lost, so it is sent again a moment later.
    Tensorstore's late callbacks onto the closed event loop of a failed Orbax read (the read
    already failed with one clear error) are dropped. Anything else is reported as usual."""
    exc = unraisable.exc_value
    if isinstance(exc, (KeyboardInterrupt, Terminated)):
        again = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        resend = threading.Timer(0.05, os.kill, (os.getpid(), again))
        resend.daemon = True  # a run that ends meanwhile needs no signal
        resend.start()
    elif not (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)):
        _previous_unraisable(unraisable)


_previous_unraisable = sys.unraisablehook


def install_unraisable_hook() -> None:
    if sys.unraisablehook is not _unraisable:
        sys.unraisablehook = _unraisable
