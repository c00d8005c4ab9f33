"""Temporary names for atomic writes, and the clean-up of those a killed writer left behind.

Everything this project writes where a complete file or folder is expected (checkpoints, the tracker,
token caches, converted checkpoints, fetched vocabularies) is first written under ``temporary_path(path)``
and renamed into place, so a crash leaves a temporary, never a partial result. The temporary name sits
beside the target, hidden, and says who wrote it: ``.NAME.HOST.PID.partial``. ``remove_orphans(folder)``
deletes the temporaries in ``folder`` whose writer is gone: written on this host by a process that no
longer exists, or (any host, since another node's processes cannot be seen from here) untouched for
``ORPHAN_IDLE_S``. The next run that uses the folder calls it, so a killed build or save costs nothing
but its own partial work.

A failed write (full disk, read-only folder, no permission) surfaces as one ``errors.WriteError`` naming the
target, the temporary removed. ``check_new_file`` refuses an output that exists (unless overwriting was
asked for) or cannot be written, before the work that produces it. ``FolderLock`` lets one run at a time
write a folder (``--save``): the holder's host and pid are recorded and a heartbeat keeps the lock fresh,
so a lock whose holder died (on this host) or stopped beating (on another) is taken over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from errors import ArgumentError, write_error

ORPHAN_IDLE_S = 24 * 3600  # a temporary nobody has written to for a day is abandoned, whichever host wrote it
_SUFFIX = ".partial"
_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.partial$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname()) or "localhost"


def temporary_path(path: str) -> str:
    """Where to write ``path`` before renaming it into place: ``DIR/.NAME.HOST.PID.partial``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{_host()}.{os.getpid()}{_SUFFIX}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _last_write(path: str) -> float:
    """The newest modification time of ``path`` and, for a folder, of anything in it."""
    newest = os.lstat(path).st_mtime
    if os.path.isdir(path) and not os.path.islink(path):
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except FileNotFoundError:
                    pass
    return newest


def is_orphan(path: str, idle_s: float = ORPHAN_IDLE_S) -> bool:
    """Whether ``path`` is a temporary of ``temporary_path`` whose writer is gone."""
    match = _PATTERN.match(os.path.basename(path))
    if match is None:
        return False
    if match["host"] == _host() and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
        return True
    try:
        return time.time() - _last_write(path) > idle_s
    except FileNotFoundError:
        return False


def remove_orphans(folder: str, idle_s: float = ORPHAN_IDLE_S) -> list[str]:
    """Delete the orphaned temporaries directly in ``folder``; the paths removed (none if it is absent)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        path = os.path.join(folder, name)
        if not is_orphan(path, idle_s):
            continue
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:  # another process of the same run removed it first
            continue
        except OSError:  # not ours to remove (permissions): leave it
            continue
        removed.append(path)
    return removed


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary path to write (by any writer: ``torch.save``, ``safetensors``, ``savefig``) that becomes
    ``path`` when the block succeeds; removed if the block raises. A failed write, wherever in the block,
    is one ``WriteError`` naming ``path``; other errors pass unchanged."""
    remove_orphans(os.path.dirname(os.path.abspath(path)))
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        failure = write_error(err, path)
        if failure is None:
            raise
        raise failure from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_file(path: str, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """A text file open for writing that becomes ``path`` only when the block succeeds.

    Orphaned temporaries in the folder go first; the file is written under ``temporary_path(path)``,
    renamed into place at the end of the block, and removed if the block raises (a failed write is a
    ``WriteError`` naming ``path``).
    """
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding) as f:
        yield f


def check_new_file(path: str, flag: str, overwrite: bool = False, option: str = "--overwrite") -> None:
    """Before the work that produces it: ``path`` can be written as a new file, and does not exist unless
    ``overwrite`` (the ``option`` flag) was given; else one ``ArgumentError`` naming ``flag``."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ArgumentError(f"{flag} {path}: is a directory; name a file inside it")
    if os.path.lexists(path) and not overwrite:
        raise ArgumentError(f"{flag} {path}: already exists; pass {option} to replace it, or choose another name")
    if not os.path.isdir(folder):
        raise ArgumentError(f"{flag} {path}: the folder {folder} does not exist; create it first")
    reason = unwritable(folder, path)
    if reason is not None:
        raise ArgumentError(f"{flag} {reason}")


def unwritable(folder: str, path: str) -> str | None:
    """Why ``path`` cannot be written in ``folder`` (a probe file created and removed there), or ``None``."""
    probe = temporary_path(os.path.join(folder, "write-test"))
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        failure = write_error(err, path)
        return str(failure) if failure is not None else f"cannot write {path}: {err.strerror}"
    return None


def default_file_mode(path: str) -> None:
    """Give ``path`` the mode a plain ``open`` would (0666 less the umask): writers that go through their
    own temporary file (safetensors) leave 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


LOCK_NAME = ".lock"
LOCK_HEARTBEAT_S = 30.0  # the holder touches the lock this often
LOCK_STALE_S = 300.0  # a lock from another host untouched this long is abandoned


class FolderLock:
    """``FOLDER/.lock``, held by one process: a JSON record of its host, pid and start, touched every
    ``heartbeat_s`` by a daemon thread. ``acquire`` creates it exclusively (``O_EXCL``, atomic on local
    and NFS file systems); an existing lock whose holder is gone (a dead pid on this host, or no
    heartbeat for ``stale_s`` from another host) is taken over, and ``acquire`` says so."""

    def __init__(self, folder: str, heartbeat_s: float = LOCK_HEARTBEAT_S, stale_s: float = LOCK_STALE_S) -> None:
        self.path = os.path.join(folder, LOCK_NAME)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.record = {"host": _host(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> tuple[dict, float] | None:
        """The record in the lock and its last heartbeat (mtime), or ``None`` when there is no lock."""
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
            beat = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = {}
        return (record if isinstance(record, dict) else {}), beat

    def _gone(self, record: dict, beat: float) -> str | None:
        """Why the holder of ``record`` is gone, or ``None`` while it may still run."""
        pid = record.get("pid")
        if record.get("host") == _host() and pid == os.getpid():
            return "an earlier run of this process that did not release it"
        if record.get("host") == _host() and isinstance(pid, int) and not _alive(pid):
            return f"process {pid} on this host is gone"
        if time.time() - beat > self.stale_s:
            return f"no heartbeat for {time.time() - beat:.0f} s"
        return None

    def acquire(self, what: str) -> str | None:
        """Hold the lock, or raise ``ArgumentError`` naming its holder (``what``: the flag and folder, as
        the message should name them). Returns a warning when a stale lock was taken over."""
        warning = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = self.holder()
                if found is None:
                    continue  # released meanwhile
                record, beat = found
                why = self._gone(record, beat)
                if why is None:
                    raise ArgumentError(
                        f"{what} is in use by another run (pid {record.get('pid')} on host {record.get('host')}, "
                        f"since {record.get('since')}); wait for it to end or choose another directory (if that "
                        f"run is gone, delete {self.path})") from None
                if not self._set_aside(record):
                    continue  # another process took it over first: look again
                warning = (f"warning: {what}: took over the lock of pid {record.get('pid')} on host "
                           f"{record.get('host')} ({why})")
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.record, f)
            self._thread = threading.Thread(target=self._beat, name="folder-lock-heartbeat", daemon=True)
            self._thread.start()
            return warning
        raise ArgumentError(f"{what}: could not take the lock {self.path}; other runs are starting there too")

    def _set_aside(self, record: dict) -> bool:
        """Move a stale lock out of the way; False when it is no longer the one judged stale."""
        aside = temporary_path(self.path)
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            with open(aside, encoding="utf-8") as f:
                same = json.loads(f.read()) == record
        except ValueError:
            same = record == {}
        if not same:  # a newer holder's lock: put it back
            os.rename(aside, self.path)
            return False
        os.remove(aside)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it still names this process."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        found = self.holder()
        if found is not None and found[0] == self.record:
            os.remove(self.path)
