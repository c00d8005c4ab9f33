"""Temporary names for atomic writes, and the clean-up of those a killed writer left behind.

Everything this project writes where a complete file or folder is expected (checkpoints, the tracker,
token caches, converted checkpoints, fetched vocabularies) is first written under ``temporary_path(path)``
and renamed into place, so a crash leaves a temporary, never a partial result. The temporary name sits
beside the target, hidden, and says who wrote it: ``.NAME.HOST.PID.partial``. ``remove_orphans(folder)``
deletes the temporaries in ``folder`` whose writer is gone: written on this host by a process that no
longer exists, or (any host, since another node's processes cannot be seen from here) untouched for
``ORPHAN_IDLE_S``. The next run that uses the folder calls it, so a killed build or save costs nothing
but its own partial work.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

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
def atomic_file(path: str, encoding: str = "utf-8") -> Iterator[IO[str]]:
    """A text file open for writing that becomes ``path`` only when the block succeeds.

    Orphaned temporaries in the folder go first; the file is written under ``temporary_path(path)``,
    renamed into place at the end of the block, and removed if the block raises.
    """
    remove_orphans(os.path.dirname(os.path.abspath(path)))
    tmp = temporary_path(path)
    try:
        with open(tmp, "w", encoding=encoding) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
