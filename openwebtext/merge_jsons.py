"""Concatenate loose json files into one, checking every line on the way.

    python openwebtext/merge_jsons.py --inputs DIR_OR_FILES... --output merged.json [--overwrite] [--text-key text]

Files are taken in the order given; a folder contributes its ``.json``/``.jsonl`` files in sorted path
order (recursively, hidden files skipped, never the output itself). Every non-blank line must be a json
object with a string under ``--text-key``; the first that is not stops the merge with its file and line,
and nothing is written. The objects are written one per line, in order, with their keys unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openwebtext.common import (  # noqa: E402
    JSON_SUFFIXES,
    atomic_output,
    byte_progress,
    check_output,
    expand_inputs,
    read_documents,
    run_cli,
)


def merge(paths: list[str], dst: str, text_key: str = "text") -> list[int]:
    """Write the documents of ``paths`` to ``dst``, in order; the number taken from each file."""
    counts = []
    with atomic_output(dst) as out, byte_progress(paths, "merging") as bar:
        for path in paths:
            counts.append(0)
            for _, _, record in read_documents(path, text_key, on_bytes=bar.update):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts[-1] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", required=True, help="loose json files, or folders of them")
    parser.add_argument("--output", required=True, help="where to write the merged loose json")
    parser.add_argument("--overwrite", "--force", dest="force", action="store_true",
                        help="replace --output if it exists")
    parser.add_argument("--text-key", default="text", help="json key every document must hold (default: text)")
    args = parser.parse_args(argv)

    paths = expand_inputs(args.inputs, "--inputs", exclude=[args.output], suffixes=JSON_SUFFIXES)
    check_output(args.output, args.force, paths, "--output")
    counts = merge(paths, args.output, args.text_key)
    empty = sum(1 for n in counts if n == 0)
    print(f"merge_jsons: {sum(counts)} documents from {len(paths)} file(s)"
          + (f", {empty} of them empty" if empty else ""))
    print(f"  wrote {args.output}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
