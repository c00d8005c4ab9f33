"""Rewrite a loose-json corpus with one sentence per line, for ``--presplit-sentences``.

    python scripts/presplit_sentences_json.py INPUT OUTPUT [--text-key text] [--overwrite]

Each document's text becomes its sentences joined by ``\\n``, split exactly as training splits
without ``--presplit-sentences`` (``data_utils.sentences``: lines, then nltk's Punkt, no nltk data
needed); every other key is kept, blank lines are dropped. OUTPUT is written to a temporary file
beside it and renamed into place, so it is never left half written; INPUT is never overwritten, an
existing OUTPUT only with ``--overwrite`` (``--force``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic import atomic_file, check_new_file  # noqa: E402
from data_utils.corpora import loose_json_lines, loose_json_record  # noqa: E402
from data_utils.errors import DataError  # noqa: E402
from data_utils.sentences import split_sentences  # noqa: E402
from initialize import run_cli  # noqa: E402


def records(path: str, text_key: str, on_bytes) -> Iterator[dict]:
    """Each json object line of ``path``, checked to hold a string under ``text_key``."""
    for lineno, raw in loose_json_lines(path, on_bytes):
        yield loose_json_record(raw, path, lineno, text_key)


def presplit(src: str, dst: str, text_key: str, overwrite: bool = False) -> tuple[int, int]:
    """Write ``dst`` from ``src``; returns (documents, sentences)."""
    from tqdm import tqdm

    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise DataError(f"OUTPUT {dst} is INPUT; write to another file (INPUT is never overwritten)")
    check_new_file(dst, "OUTPUT", overwrite)
    docs = sentences = 0
    with atomic_file(dst) as out, \
            tqdm(total=os.path.getsize(src) if os.path.isfile(src) else None, unit="B", unit_scale=True,
                 mininterval=1.0, desc=f"splitting {os.path.basename(src)}") as bar:
        for record in records(src, text_key, bar.update):
            split = split_sentences(record[text_key])
            record[text_key] = "\n".join(split)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            docs, sentences = docs + 1, sentences + len(split)
    return docs, sentences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="loose json corpus (one json object per line)")
    parser.add_argument("output", help="where to write the corpus with one sentence per line")
    parser.add_argument("--text-key", default="text", help="key of the document text (default: text)")
    parser.add_argument("--overwrite", "--force", action="store_true", help="replace an existing OUTPUT")
    args = parser.parse_args(argv)
    counts: list[int] = []
    status = run_cli(lambda: counts.extend(presplit(args.input, args.output, args.text_key, args.overwrite)))
    if status:
        return status
    docs, sentences = counts
    print(f"wrote {args.output}: {docs} documents, {sentences} sentences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
