"""Output folders of the conversion tools: refused if they already hold something, complete or absent.

A conversion never overwrites: ``check_new_output`` refuses a target that exists and is not an empty
directory, before any work is done. ``new_output_dir`` then hands out a hidden staging folder beside
the target (``atomic.temporary_path``) to write into, renames it onto the target when the block
succeeds and removes it when it fails, so a full disk or a killed tool never leaves a half-written
checkpoint where a complete one is expected. Staging folders that killed conversions left behind are
cleared on the next use of the parent folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

from atomic import remove_orphans, temporary_path, unwritable
from errors import ConversionError, write_error


def check_new_output(path: str, flag: str) -> None:
    """Refuse an output that exists (other than as an empty directory), or whose nearest existing folder
    cannot be written: a conversion never overwrites, and fails before its work, not at the rename."""
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ConversionError(f"{flag} {path}: already exists and is not empty; choose a new directory "
                              "(nothing was written)")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    reason = unwritable(folder, path)
    if reason is not None:
        raise ConversionError(f"{flag} {reason}; nothing was written")


@contextlib.contextmanager
def new_output_dir(path: str, flag: str) -> Iterator[str]:
    """A staging folder beside ``path`` that becomes ``path`` only when the block succeeds."""
    check_new_output(path, flag)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise ConversionError(f"{flag} {path}: cannot create {parent} ({err.strerror})") from None
    remove_orphans(parent)  # staging folders of conversions that were killed
    staging = temporary_path(path)
    try:
        os.makedirs(staging)
        yield staging
        if os.path.isdir(path):
            os.rmdir(path)  # empty, checked above
        os.replace(staging, path)
    except Exception as err:  # a full disk, a read-only mount (torch and safetensors word them their own way)
        failure = write_error(err, path)
        if failure is None:
            raise
        raise ConversionError(f"{flag} {failure}; nothing was written") from None
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
