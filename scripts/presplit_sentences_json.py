"""Rewrite a loose-json corpus with one sentence per line, for ``--presplit-sentences``.

    python scripts/presplit_sentences_json.py INPUT OUTPUT [--text-key text]

Each document's text becomes its sentences joined by ``\\n``, split exactly as training splits
without ``--presplit-sentences`` (``data_utils.sentences``: lines, then nltk's Punkt, no nltk data
needed); every other key is kept, blank lines are dropped. OUTPUT is written to a temporary file
beside it and renamed into place, so it is never left half written; INPUT is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_utils.errors import DataError  # noqa: E402
from data_utils.sentences import split_sentences  # noqa: E402


def records(path: str, text_key: str, on_bytes) -> Iterator[dict]:
    """Each json object line of ``path``, checked to hold a string under ``text_key``."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot open {path}: {exc.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            on_bytes(len(raw))
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file") \
                    from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); loose json "
                                "needs one complete json object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a json object, got {type(record).__name__}")
            if not isinstance(record.get(text_key), str):
                present = ", ".join(repr(k) for k in record) or "none"
                raise DataError(f"{path}:{lineno}: no string under key {text_key!r} (keys present: {present}); "
                                "pass --text-key with the right key")
            yield record


def presplit(src: str, dst: str, text_key: str) -> tuple[int, int]:
    """Write ``dst`` from ``src``; returns (documents, sentences)."""
    from tqdm import tqdm

    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise DataError(f"OUTPUT {dst} is INPUT; write to another file (INPUT is never overwritten)")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise DataError(f"cannot write {dst}: no folder {folder}")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=folder)
    docs = sentences = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out, \
                tqdm(total=os.path.getsize(src) if os.path.isfile(src) else None, unit="B", unit_scale=True,
                     mininterval=1.0, desc=f"splitting {os.path.basename(src)}") as bar:
            for record in records(src, text_key, bar.update):
                split = split_sentences(record[text_key])
                record[text_key] = "\n".join(split)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                docs, sentences = docs + 1, sentences + len(split)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise
    return docs, sentences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="loose json corpus (one json object per line)")
    parser.add_argument("output", help="where to write the corpus with one sentence per line")
    parser.add_argument("--text-key", default="text", help="key of the document text (default: text)")
    args = parser.parse_args(argv)
    try:
        docs, sentences = presplit(args.input, args.output, args.text_key)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {docs} documents, {sentences} sentences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
