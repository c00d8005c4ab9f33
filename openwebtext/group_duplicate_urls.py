"""Group the urls of near-duplicate documents: connected components of the pairs at or above a threshold.

    python openwebtext/group_duplicate_urls.py dups.json groups.json [--threshold 0.9] [--overwrite]

Reads the pairs ``find_duplicates.py`` wrote (loose json, ``{"URL": [{"OTHER_URL": similarity}, ...]}``
per line) and joins two urls when their similarity is at least ``--threshold``; joining is transitive
(union-find), so A~B and B~C put A, B and C in one group even when A and C are less alike. Pairs below the
threshold join nothing. Writes one group per line as a json list of urls (two or more), the urls in order
of first appearance in the input and the groups in order of their first url, so the output is fixed by
the input. ``remove_group_duplicates.py`` then keeps one document of each group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_utils.errors import DataError  # noqa: E402
from openwebtext.common import atomic_output, check_output, require_file, run_cli  # noqa: E402

THRESHOLD = 0.9


class UnionFind:
    """Disjoint sets of hashable items, with path halving and union by size."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.size: dict[str, int] = {}

    def find(self, item: str) -> str:
        """The representative of ``item``'s set (``item`` joins as a set of its own if new)."""
        if item not in self.parent:
            self.parent[item], self.size[item] = item, 1
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: str, b: str) -> None:
        """Merge the sets of ``a`` and ``b``."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


def read_pairs(path: str) -> Iterator[tuple[str, str, float]]:
    """``(url, other_url, similarity)`` for every pair in a ``find_duplicates.py`` output; DataError if malformed."""
    require_file(path, "DUPLICATES")
    expected = 'expected {"url": [{"other_url": similarity}, ...]} per line, as find_duplicates.py writes'
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc}); {expected}") from None
            if not isinstance(entry, dict) or not all(isinstance(v, list) for v in entry.values()):
                raise DataError(f"{path}:{lineno}: {expected}")
            for url, others in entry.items():
                for item in others:
                    if not isinstance(item, dict):
                        raise DataError(f"{path}:{lineno}: {item!r} is not an object; {expected}")
                    for other, similarity in item.items():
                        if isinstance(similarity, bool) or not isinstance(similarity, (int, float)) \
                                or not 0.0 <= similarity <= 1.0:
                            raise DataError(f"{path}:{lineno}: similarity of {url!r} and {other!r} is "
                                            f"{similarity!r}, not a number in [0, 1]; {expected}")
                        yield url, other, float(similarity)


def group_urls(pairs: Iterable[tuple[str, str, float]], threshold: float = THRESHOLD) -> tuple[list[list[str]], int]:
    """Connected groups of the pairs with similarity >= ``threshold``, ordered as the module docstring says.

    Returns the groups and the number of pairs that reached the threshold.
    """
    sets = UnionFind()
    order: dict[str, int] = {}
    joined = 0
    for url, other, similarity in pairs:
        if similarity < threshold:
            continue
        joined += 1
        for u in (url, other):
            order.setdefault(u, len(order))
        sets.union(url, other)
    groups: dict[str, list[str]] = {}
    for url in sorted(order, key=order.__getitem__):
        groups.setdefault(sets.find(url), []).append(url)
    return [g for g in groups.values() if len(g) > 1], joined


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("duplicates", help="the pairs written by find_duplicates.py")
    parser.add_argument("output", help="where to write the groups, one json list of urls per line")
    parser.add_argument("--threshold", type=float, default=THRESHOLD,
                        help=f"join urls whose similarity is at least this (default {THRESHOLD})")
    parser.add_argument("--overwrite", "--force", dest="force", action="store_true",
                        help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")

    require_file(args.duplicates, "DUPLICATES")
    check_output(args.output, args.force, [args.duplicates], "OUTPUT")
    pairs = list(read_pairs(args.duplicates))
    groups, joined = group_urls(pairs, args.threshold)
    with atomic_output(args.output) as out:
        for group in groups:
            out.write(json.dumps(group, ensure_ascii=False) + "\n")
    urls = sum(len(g) for g in groups)
    print(f"group_duplicate_urls: read {len(pairs)} pairs, {joined} with similarity >= {args.threshold}")
    print(f"  {len(groups)} groups of {urls} urls: {urls - len(groups)} documents to remove (one kept per group)")
    print(f"  wrote {args.output}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
