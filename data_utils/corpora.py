"""Corpus aliases and loose json reading.

``--train-data wikipedia`` names a corpus by alias; its files are configured outside the code:

- ``MEGATRON_CORPUS_<ALIAS>=PATH`` (alias upper-cased, other characters as ``_``); several files
  separated by ``os.pathsep`` (``:`` on Linux);
- ``MEGATRON_CORPORA=/path/to/corpora.json``, a json object mapping alias -> path or list of paths
  (relative paths are taken from the json file's folder); it may define new aliases too;
- built-in defaults: ``shakespeare`` is ``CACHE_DIR/shakespeare.json``, as written by
  ``tools/fetch_sample_data.py``.

The per-alias variable wins over the json file, which wins over the default. A path to an existing
file is always accepted as is.

Corpus files (``read_texts``) are loose json (one object per line, text under ``text_key``; the
default), tight json (the whole file one json array of objects, recognised by its first character
``[``, read into memory at once), or csv/tsv by extension (``.csv``, ``.tsv``; a header row names the
columns, the text is column ``text_key``, the delimiter ``,``/tab or ``--delim``, see ``set_delimiter``).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

from data_utils.errors import DataError

CORPORA_ENV = "MEGATRON_CORPORA"
CORPUS_ENV_PREFIX = "MEGATRON_CORPUS_"

_DELIMITER: list[str | None] = [None]  # --delim for csv/tsv files; None: by extension

NAMED_CORPORA: dict[str, str] = {
    "wikipedia": "English Wikipedia as loose json (WikiExtractor --json), cleaned",
    "webtext": "OpenWebText-style web pages as loose json (see openwebtext/)",
    "shakespeare": "Project Gutenberg Shakespeare from tools/fetch_sample_data.py (CACHE_DIR/shakespeare.json)",
}
_DEFAULT_FILES = {"shakespeare": "shakespeare.json"}  # relative to cache_dir


def corpus_env_var(alias: str) -> str:
    """The environment variable that sets ``alias``'s files."""
    return CORPUS_ENV_PREFIX + re.sub(r"[^A-Z0-9]", "_", alias.upper())


def _json_aliases() -> tuple[dict[str, list[str]], str | None]:
    """Aliases from the json file named by MEGATRON_CORPORA (paths made absolute), and that file."""
    config = os.environ.get(CORPORA_ENV)
    if not config:
        return {}, None
    try:
        with open(config, encoding="utf-8") as f:
            table = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{CORPORA_ENV}={config}: no such file; point it at a json object alias -> path(s)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{config}:{exc.lineno}: not valid JSON ({exc.msg}); it must map alias -> path(s)") from None
    if not isinstance(table, dict):
        raise DataError(f"{config}: expected a json object mapping alias -> path or list of paths")
    base = os.path.dirname(os.path.abspath(config))
    aliases = {}
    for alias, value in table.items():
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or not paths:
            raise DataError(f"{config}: alias {alias!r} must map to a path or a non-empty list of paths")
        aliases[alias.lower()] = [os.path.join(base, os.path.expanduser(p)) for p in paths]
    return aliases, config


def known_corpora() -> list[str]:
    """Every alias defined right now: built-in, json file and environment."""
    names = set(NAMED_CORPORA) | set(_json_aliases()[0])
    names |= {k[len(CORPUS_ENV_PREFIX):].lower() for k in os.environ if k.startswith(CORPUS_ENV_PREFIX)}
    return sorted(names)


def _lookup(alias: str, cache_dir: str | None) -> tuple[list[str], str] | None:
    """(paths, where they were set) for ``alias``, or None when nothing defines it."""
    var = corpus_env_var(alias)
    if os.environ.get(var):
        return [os.path.expanduser(p) for p in os.environ[var].split(os.pathsep) if p], var
    table, config = _json_aliases()
    if alias in table:
        return table[alias], f"{config} ({CORPORA_ENV})"
    if alias in _DEFAULT_FILES and cache_dir is not None:
        return [os.path.join(cache_dir, _DEFAULT_FILES[alias])], "the default under --cache-dir"
    return None


def resolve_corpus(name_or_path: str, cache_dir: str | None = None) -> list[str]:
    """Files of a corpus: ``name_or_path`` itself if it is a file, else the alias's configured files."""
    if os.path.isfile(name_or_path):
        return [name_or_path]
    alias = name_or_path.lower()
    how_to = f"set {corpus_env_var(alias)}=PATH or map it in the json file named by {CORPORA_ENV}"
    found = _lookup(alias, cache_dir)
    if found is None:
        if alias in NAMED_CORPORA:
            raise DataError(f"corpus alias {name_or_path!r} has no files configured; {how_to}")
        raise DataError(
            f"{name_or_path!r} is neither an existing file nor a known corpus alias "
            f"(known: {', '.join(known_corpora())}); {how_to}"
        )
    paths, source = found
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        hint = " (run `python tools/fetch_sample_data.py --cache-dir DIR`)" if alias in _DEFAULT_FILES else ""
        raise DataError(
            f"corpus alias {name_or_path!r} points to {', '.join(missing)}, which does not exist "
            f"(set by {source}){hint}; {how_to}"
        )
    return paths


def resolve_corpora(names: list[str], cache_dir: str | None = None) -> list[str]:
    """``resolve_corpus`` over several names, in order."""
    return [path for name in names for path in resolve_corpus(name, cache_dir)]


def open_corpus(path: str) -> BinaryIO:
    """``path`` opened for binary reading; a one-line DataError when it cannot be."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise DataError(
            f"cannot open corpus {path}: {exc.strerror}; check --train-data/--valid-data/--test-data"
        ) from None


def loose_json_lines(path: str, on_bytes: Callable[[int], None] | None = None) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` for each non-blank line of ``path``.

    ``on_bytes(n)`` is called with the size of each line read (for a progress bar).
    """
    f = open_corpus(path)
    with f:
        for lineno, raw in enumerate(f, start=1):
            if on_bytes is not None:
                on_bytes(len(raw))
            if raw.strip():
                yield lineno, raw


def loose_json_record(raw: bytes, path: str, lineno: int, text_key: str) -> dict[str, Any]:
    """One loose-json line parsed and checked to hold a string under ``text_key``; else one-line DataError."""
    line = raw.rstrip(b"\r\n")
    try:
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file") from None
    except json.JSONDecodeError as exc:
        # json's messages may end in " at" ("Unterminated string starting at"); the column says where.
        what = exc.msg.removesuffix(" at")
        where = "the line ends early" if exc.pos >= len(line.decode("utf-8", "replace")) else f"column {exc.colno}"
        raise DataError(
            f"{path}:{lineno}: not valid JSON ({what}; {where}); loose json needs one complete json object per line"
        ) from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a json object, got {type(record).__name__}")
    if text_key not in record:
        present = ", ".join(repr(k) for k in record) or "none"
        raise DataError(
            f"{path}:{lineno}: no key {text_key!r} (keys present: {present}); pass --text-key with the right key"
        )
    if not isinstance(record[text_key], str):
        raise DataError(
            f"{path}:{lineno}: key {text_key!r} holds a {type(record[text_key]).__name__}, expected a string"
        )
    return record


def batched_texts(texts: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """``texts`` in order, in lists of at most ``max_docs`` texts, cut once a list reaches ``max_chars`` characters."""
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def read_loose_json(path: str, text_key: str = "text",
                    on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """The ``text_key`` string of each json object line of ``path``; blank lines are skipped.

    ``on_bytes(n)`` is called with the size of each line read (for a progress bar).
    """
    for lineno, raw in loose_json_lines(path, on_bytes):
        yield loose_json_record(raw, path, lineno, text_key)[text_key]


def set_delimiter(delim: str | None) -> None:
    """Read every csv/tsv corpus of this process with ``delim`` (``--delim``); None: by extension."""
    if delim is not None:
        if len(delim) != 1:
            raise DataError(f"--delim {delim!r}: expected one character, e.g. ',' or '\\t'")
    _DELIMITER[0] = delim


def corpus_format(path: str) -> str:
    """``"csv"`` for ``.csv``/``.tsv`` files, else ``"json"`` (loose or tight, told apart on reading)."""
    return "csv" if os.path.splitext(path)[1].lower() in (".csv", ".tsv") else "json"


def delimiter(path: str) -> str | None:
    """The delimiter a csv/tsv ``path`` is read with (None for json): ``--delim``, else by extension."""
    if corpus_format(path) != "csv":
        return None
    if _DELIMITER[0] is not None:
        return _DELIMITER[0]
    return "\t" if path.lower().endswith(".tsv") else ","


def read_texts(path: str, text_key: str = "text", on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """The text of each document of a corpus file: loose json, tight json or csv/tsv (see the module docstring)."""
    if corpus_format(path) == "csv":
        yield from _read_csv(path, text_key, on_bytes)
        return
    with open_corpus(path) as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"["):
        yield from _read_tight_json(path, text_key, on_bytes)
    else:
        yield from read_loose_json(path, text_key, on_bytes)


def _read_tight_json(path: str, text_key: str, on_bytes: Callable[[int], None] | None) -> Iterator[str]:
    """Texts of a file holding one json array of objects."""
    with open(path, "rb") as f:
        raw = f.read()
    if on_bytes is not None:
        on_bytes(len(raw))
    try:
        records = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg.removesuffix(' at')}; column {exc.colno}); "
                        "a file starting with '[' must be one json array of objects") from None
    for n, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: element {n} of the json array is a {type(record).__name__}, expected an object")
        if not isinstance(record.get(text_key), str):
            what = "has no key" if text_key not in record else "does not hold a string under"
            raise DataError(f"{path}: element {n} of the json array {what} {text_key!r}; pass --text-key with the "
                            "right key")
        yield record[text_key]


def _read_csv(path: str, text_key: str, on_bytes: Callable[[int], None] | None) -> Iterator[str]:
    """Texts of column ``text_key`` of a csv/tsv file with a header row."""
    delim = delimiter(path)
    f = open_corpus(path)

    def lines() -> Iterator[str]:
        for raw in f:
            if on_bytes is not None:
                on_bytes(len(raw))
            try:
                yield raw.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: not UTF-8 ({exc.reason}); re-encode the file") from None

    csv.field_size_limit((1 << 31) - 1)  # documents are long fields (the default limit is 128 KiB)
    with f:
        reader = csv.DictReader(lines(), delimiter=delim)
        try:
            columns = reader.fieldnames
        except csv.Error as exc:
            raise DataError(f"{path}:1: not valid csv ({exc})") from None
        if not columns:
            return
        if text_key not in columns:
            shown = ", ".join(repr(c) for c in columns)
            raise DataError(f"{path}:1: no column {text_key!r} in the header (columns: {shown}, split by "
                            f"{delim!r}); pass --text-key with the right column or --delim with the right "
                            "delimiter")
        try:
            for row in reader:
                text = row.get(text_key)
                if text is None:
                    raise DataError(f"{path}:{reader.line_num}: the row has fewer fields than the header")
                yield text
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid csv ({exc})") from None
