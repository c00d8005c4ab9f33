"""The user mistakes this toolkit reports as one line, and nothing else.

Every kind derives from ``UserError``; ``initialize.run_main`` catches the base, prints ``error:
<message>`` once and exits with status 1. A message names the file, line, key or flag at fault and
says what to do. ``every_rank`` marks an error that all ranks of a job raised together (agreed by
``initialize.all_ranks_agree``, or raised at the same iteration by construction): only rank 0
prints it.
"""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """A mistake in what the user gave (flags, files, checkpoints), reported as one line."""

    every_rank_by_default = False

    def __init__(self, message: str, *, every_rank: bool | None = None) -> None:
        super().__init__(message)
        self.every_rank = self.every_rank_by_default if every_rank is None else every_rank


class ArgumentError(UserError, ValueError):
    """A command-line mistake; the message names the flag and the remedy."""


class DataError(UserError, ValueError):
    """Bad data input: a missing file, a malformed line, an unknown alias or tokenizer."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used here; the message names the file and the mismatch."""


class ConversionError(CheckpointError):
    """Input that cannot be converted; the message names the file or value and what to do."""


class NonFiniteError(UserError, RuntimeError):
    """Training met a non-finite loss or gradient norm it was told not to skip, or skipped too many
    steps. Every rank sees the same skipped steps, so every rank raises it at the same iteration."""

    every_rank_by_default = True


class WriteError(UserError, OSError):
    """Writing an output failed: a read-only or full file system, no permission, a quota; the message names
    the path. Also an ``OSError``, so code that catches a failed write still does."""


class Interrupted(UserError):
    """Ctrl-C: the run stopped at the user's request; ``initialize.run_cli`` prints ``interrupted: <message>``
    (rank 0) and exits with status 130."""

    every_rank_by_default = True


_WRITE_REASONS = {
    errno.ENOSPC: ("no space left on the device", "free some space and rerun"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space and rerun"),
    errno.EROFS: ("the file system is read-only", "choose a folder this process can write to"),
    errno.EACCES: ("permission denied", "choose a folder this process can write to"),
    errno.EPERM: ("operation not permitted", "choose a folder this process can write to"),
}
# How the writers that bypass Python's OSError (torch.save, safetensors) word the same failures.
_WORDED = (("No space left", errno.ENOSPC), ("os error 28", errno.ENOSPC), ("Disk quota", errno.EDQUOT),
           ("Read-only file system", errno.EROFS), ("Permission denied", errno.EACCES))
_SHORT_WRITE = ("unexpected pos", "file write failed", "I/O error", "Error while serializing", "requested and")


def _folder_is_full(path: str) -> bool:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def write_error(err: BaseException, path: str | None = None) -> WriteError | None:
    """The one-line ``WriteError`` for ``err``, a failed write of ``path`` (default: the path the error
    names), or ``None`` when ``err`` is not a failed write (then it is a bug, not the user's disk)."""
    if isinstance(err, WriteError):
        return err
    path = path or (getattr(err, "filename", None) if isinstance(err, OSError) else None)
    text = str(err)
    code = err.errno if isinstance(err, OSError) and err.errno in _WRITE_REASONS else None
    if code is None:
        code = next((c for mark, c in _WORDED if mark in text), None)
    worded_short = any(mark in text for mark in _SHORT_WRITE)  # numpy's tofile raises OSError without errno
    if code is None and (isinstance(err, OSError) and err.errno is not None or not worded_short):
        return None  # not a failed write of the kinds above: a bug, left to its traceback
    if code is None and path and _folder_is_full(path):
        code = errno.ENOSPC  # torch's "unexpected pos": the write stopped short on a full disk
    if code is None:
        first = re.sub(r"^\[enforce fail at [^]]*\]\s*\.?\s*", "", text.splitlines()[0] if text else "")
        return WriteError(f"cannot write {path or 'the output'}: the write failed ({first})")
    reason, remedy = _WRITE_REASONS[code]
    return WriteError(f"cannot write {path or 'the output'}: {reason} ({errno.errorcode[code]}); {remedy}")
