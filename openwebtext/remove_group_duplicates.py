"""Keep one document of each group of near-duplicates: the first of the group in the input's order.

    python openwebtext/remove_group_duplicates.py groups.json INPUT.json OUTPUT.json [--overwrite] [--url-key url]

GROUPS is what ``group_duplicate_urls.py`` wrote: one json list of urls per line, no url in two groups.
INPUT is loose json with the page address under ``--url-key``. OUTPUT gets every document of INPUT, in
order and with its keys unchanged, except those whose url belongs to a group that an earlier document of INPUT already
stands for. Documents in no group are all kept; a group none of whose urls is in INPUT is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_utils.errors import DataError  # noqa: E402
from openwebtext.common import (  # noqa: E402
    atomic_output,
    byte_progress,
    check_output,
    print_report,
    read_documents,
    require_file,
    run_cli,
)

DUPLICATE = "near-duplicate of a document kept earlier"


def read_groups(path: str) -> dict[str, int]:
    """url -> line number of its group, for every url of ``path``; DataError if malformed or not disjoint."""
    require_file(path, "GROUPS")
    expected = 'expected one json list of urls per line (["url", "other_url", ...]), as group_duplicate_urls.py writes'
    group_of: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                group = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc}); {expected}") from None
            if not isinstance(group, list) or not all(isinstance(url, str) for url in group):
                raise DataError(f"{path}:{lineno}: {expected}")
            for url in group:
                if group_of.get(url, lineno) != lineno:
                    raise DataError(f"{path}:{lineno}: url {url!r} is also in the group of line {group_of[url]}; "
                                    "groups must be disjoint (write them with group_duplicate_urls.py)")
                group_of[url] = lineno
    return group_of


def remove_duplicates(group_of: dict[str, int], src: str, dst: str, url_key: str = "url",
                      text_key: str = "text") -> tuple[int, int, int]:
    """Write ``src`` less the later members of each group to ``dst``; returns (read, kept, groups found)."""
    kept_groups: set[int] = set()
    read = kept = 0
    with atomic_output(dst) as out, byte_progress([src], "removing duplicates") as bar:
        for _, _, record in read_documents(src, text_key, url_key, bar.update):
            read += 1
            group = group_of.get(record[url_key])
            if group is not None:
                if group in kept_groups:
                    continue
                kept_groups.add(group)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            kept += 1
    return read, kept, len(kept_groups)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", help="the groups written by group_duplicate_urls.py")
    parser.add_argument("input", help="loose json documents")
    parser.add_argument("output", help="where to write the documents kept")
    parser.add_argument("--overwrite", "--force", dest="force", action="store_true",
                        help="replace OUTPUT if it exists")
    parser.add_argument("--url-key", default="url", help="json key of the url (default: url)")
    parser.add_argument("--text-key", default="text", help="json key of the text (default: text)")
    args = parser.parse_args(argv)

    require_file(args.input, "INPUT")
    check_output(args.output, args.force, [args.groups, args.input], "OUTPUT")
    group_of = read_groups(args.groups)
    read, kept, found = remove_duplicates(group_of, args.input, args.output, args.url_key, args.text_key)
    groups = len(set(group_of.values()))
    print_report("remove_group_duplicates", read, kept, {DUPLICATE: read - kept},
                 notes=[f"{found} of {groups} groups found in {args.input}, one document kept of each",
                        f"wrote {args.output}"])


if __name__ == "__main__":
    sys.exit(run_cli(main))
