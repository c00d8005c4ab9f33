"""What the openwebtext/ steps share: inputs, atomic outputs, loose-json documents, shingles, reports.

Contract of every step:

- **Inputs** are files, or folders whose files are taken in sorted path order (recursively; hidden
  files, such as the temporaries of a killed run, are skipped). A missing input stops the step with one
  line before anything is read.
- **Outputs** are written under ``atomic.temporary_path(OUTPUT)`` and renamed into place when complete,
  so a failed or killed run leaves no partial file. An existing output is refused unless ``--overwrite``
  (``--force``) is given, and an output that is also an input is always refused.
- **Documents** are loose json: one json object per line with the text under ``--text-key`` (default
  ``text``) and, for the steps that need it, the page address under ``--url-key`` (default ``url``).
  A malformed line stops the step with ``FILE:LINE: ...`` and what to do; other keys pass through.
- **Errors** a user can fix are ``DataError``s; ``run_cli`` prints them as ``error: ...`` on stderr and
  exits 1, without a traceback.
- **Shingles** (near-duplicate detection) are the character ``size``-grams of the text lower-cased, with
  every run of whitespace made one space and the ends stripped, so re-wrapped or re-cased copies of a page
  still match; a text shorter than ``size`` is one shingle, an empty one has none.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as `python openwebtext/STEP.py`: the repository's modules must import
    sys.path.insert(0, REPO)

import initialize  # noqa: E402
from atomic import remove_orphans, temporary_path  # noqa: E402
from data_utils.corpora import loose_json_record  # noqa: E402
from data_utils.errors import DataError  # noqa: E402

SHINGLE_SIZE = 5
JSON_SUFFIXES = (".json", ".jsonl")  # the files taken from a folder of loose json
_WHITESPACE = re.compile(r"\s+")


def _write_failure(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}; check the path, its permissions and free space"


def run_cli(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run a step's ``main(argv)``; a user mistake or a failed write (a full disk, a folder we may not
    write to) becomes ``error: ...`` on stderr and exit status 1 (``initialize.run_cli``)."""
    return initialize.run_cli(lambda: main(argv), _write_failure)


def expand_inputs(paths: Sequence[str], flag: str, exclude: Iterable[str] = (),
                  suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files named by ``paths``: each file itself, each folder's files in sorted order (hidden ones skipped).

    From folders, only names ending in one of ``suffixes`` (when given) are taken, and never one of
    ``exclude`` (the step's own output). Raises DataError for a path that does not exist and for a
    folder that holds no file to take.
    """
    skip = {os.path.abspath(p) for p in exclude}
    files: list[str] = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, dirs, names in os.walk(path)
                for name in names
                if not name.startswith(".") and not _hidden_below(path, root)
            )
            found = [f for f in found if os.path.isfile(f) and os.path.abspath(f) not in skip and
                     (not suffixes or f.endswith(suffixes))]
            if not found:
                kind = f"no {'/'.join(suffixes)} file" if suffixes else "no file"
                raise DataError(f"{flag} {path}: the folder holds {kind}; point {flag} at the files to read")
            files.extend(found)
        else:
            raise DataError(f"{flag} {path}: no such file or folder; check the path")
    return files


def _hidden_below(top: str, root: str) -> bool:
    """Whether ``root`` lies in a hidden folder under ``top``."""
    rel = os.path.relpath(root, top)
    return rel != "." and any(part.startswith(".") for part in rel.split(os.sep))


def require_file(path: str, what: str) -> str:
    """``path`` if it is a file; else a DataError naming ``what`` it should have been."""
    if not os.path.isfile(path):
        kind = "a folder, not a file" if os.path.isdir(path) else "no such file"
        raise DataError(f"{what} {path}: {kind}; check the path")
    return path


def check_output(path: str, force: bool, inputs: Iterable[str] = (), what: str = "output") -> None:
    """Refuse ``path`` before any work: an input, a folder, or an existing file without ``--overwrite``."""
    for src in inputs:
        if os.path.exists(src) and os.path.exists(path) and os.path.samefile(src, path):
            raise DataError(f"{what} {path} is also an input; write to another file (inputs are never overwritten)")
    if os.path.isdir(path):
        raise DataError(f"{what} {path} is a folder; name the file to write")
    if os.path.exists(path) and not force:
        raise DataError(f"{what} {path} already exists; pass --overwrite to replace it (nothing was written)")


@contextlib.contextmanager
def atomic_output(path: str, binary: bool = False) -> Iterator[IO[Any]]:
    """A file to write ``path`` through: a temporary beside it, renamed into place when the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_orphans(folder)  # what a killed run left
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="\n") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_documents(path: str, text_key: str = "text", url_key: str | None = None,
                   on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """``(line number, byte offset, record)`` for each json object line of ``path``; blank lines are skipped.

    Every record holds a string under ``text_key`` and, when ``url_key`` is given, a non-empty string
    under ``url_key``; anything else raises a one-line DataError naming the file and line. ``on_bytes(n)``
    is called with the size of each line read (for a progress bar); ``offset`` is where the line starts,
    so ``read_record_at`` can read it again.
    """
    require_file(path, "input")
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if on_bytes is not None:
                on_bytes(len(raw))
            if not raw.strip():
                continue
            record = loose_json_record(raw, path, lineno, text_key)
            if url_key is not None:
                check_url_field(record, url_key, path, lineno)
            yield lineno, start, record


def read_record_at(f: IO[bytes], offset: int) -> dict[str, Any]:
    """The json object on the line starting at ``offset`` of ``f`` (a file ``read_documents`` checked)."""
    f.seek(offset)
    return json.loads(f.readline())


def check_url_field(record: Mapping[str, Any], url_key: str, path: str, lineno: int) -> str:
    """The non-empty string under ``url_key``; else a DataError naming ``path:lineno`` and the remedy."""
    if url_key not in record:
        present = ", ".join(repr(k) for k in record) or "none"
        raise DataError(f"{path}:{lineno}: no key {url_key!r} (keys present: {present}); pass --url-key with the "
                        "key that holds the page's url")
    url = record[url_key]
    if not isinstance(url, str) or not url:
        raise DataError(f"{path}:{lineno}: key {url_key!r} holds {url!r}, expected the page's url as a string")
    return url


def byte_progress(paths: Sequence[str], desc: str):
    """A tqdm bar over the total size of ``paths``; its ``update`` fits ``read_documents``'s ``on_bytes``."""
    from tqdm import tqdm

    total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    return tqdm(total=total, unit="B", unit_scale=True, mininterval=1.0, desc=desc)


def shingles(text: str, size: int = SHINGLE_SIZE) -> set[str]:
    """The set of character ``size``-grams of ``text`` as the module docstring normalises it."""
    norm = _WHITESPACE.sub(" ", text).strip().lower()
    if len(norm) <= size:
        return {norm} if norm else set()
    return {norm[i:i + size] for i in range(len(norm) - size + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """``|a & b| / |a | b|``; 0.0 when both are empty."""
    if not a and not b:
        return 0.0
    common = len(a & b)
    return common / (len(a) + len(b) - common)


def print_report(step: str, read: int, kept: int, dropped: Mapping[str, int], unit: str = "documents",
                 notes: Sequence[str] = ()) -> None:
    """Print what a step read, kept and dropped (per reason, largest first), then ``notes``."""
    lost = sum(dropped.values())
    print(f"{step}: read {read} {unit}, kept {kept}, dropped {lost}")
    for reason, count in sorted(dropped.items(), key=lambda item: (-item[1], item[0])):
        if count:
            print(f"  dropped {count:>9}  {reason}")
    for note in notes:
        print(f"  {note}")
