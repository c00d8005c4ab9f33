"""Find pairs of near-duplicate documents: MinHash + LSH candidates, confirmed by exact Jaccard similarity.

    python openwebtext/find_duplicates.py --inputs A.json [B.json ...] --output dups.json [--overwrite]
        [--threshold 0.5] [--lsh-threshold T] [--num-perm 128] [--seed 1] [--shingle-size 5]
        [--workers 1] [--text-key text] [--url-key url]

Every document (loose json with ``--text-key`` and ``--url-key``; each url at most once over all inputs)
becomes the set of its character ``--shingle-size``-grams (``openwebtext.common.shingles``: lower-cased,
whitespace runs made one space). A ``datasketch.MinHash`` of ``--num-perm`` permutations drawn from
``--seed`` summarises each set, and a ``MinHashLSH`` built for ``--lsh-threshold`` (default: the
``--threshold``) proposes, for each document, the earlier documents whose sets probably overlap that
much. Each proposed pair is then scored by the exact Jaccard similarity ``|A & B| / |A | B|`` of the two
shingle sets (the texts are read again from the inputs, so memory holds MinHash bands, not texts), and
kept when it is at least ``--threshold``. Documents without text have no shingles and are skipped.

The output is loose json: one line per document that has a near-duplicate after it, in input order,

    {"URL": [{"OTHER_URL": similarity}, ...]}

with the later documents in input order, so every pair appears once, under its earlier document.
Given the same inputs and flags the output is the same byte for byte, whatever ``--workers``.
LSH can miss a pair (a false negative), but never reports one below ``--threshold``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_utils.errors import DataError  # noqa: E402
from initialize import leave_ctrl_c_to_the_parent  # noqa: E402
from openwebtext.common import (  # noqa: E402
    JSON_SUFFIXES,
    SHINGLE_SIZE,
    atomic_output,
    byte_progress,
    check_output,
    expand_inputs,
    jaccard,
    read_documents,
    read_record_at,
    run_cli,
    shingles,
)

SCHEME = "affine32"  # datasketch >= 2.0's hashing scheme, named so a change of its default changes nothing here
BATCH = 4096  # documents read before their MinHashes are computed (by the worker pool with --workers > 1)


@dataclass(frozen=True)
class DedupConfig:
    """How documents are compared."""

    threshold: float = 0.5
    """Report pairs whose exact Jaccard similarity is at least this."""
    lsh_threshold: float | None = None
    """The Jaccard similarity LSH is tuned to find (None: ``threshold``); lower finds more, more slowly."""
    num_perm: int = 128
    """MinHash permutations: more estimate similarity better and cost time and memory."""
    seed: int = 1
    """Seed of the MinHash permutations."""
    shingle_size: int = SHINGLE_SIZE
    """Characters per shingle."""


@dataclass(frozen=True)
class DocRef:
    """Where a document is, to name it and read it again."""

    url: str
    file: int  # index into the input files
    offset: int  # byte offset of its line
    lineno: int


@functools.lru_cache(maxsize=8)
def _template(num_perm: int, seed: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME)


def minhash_values(text: str, num_perm: int, seed: int, shingle_size: int) -> np.ndarray | None:
    """The MinHash signature of ``text``'s shingles (``num_perm`` values), or None when it has none."""
    grams = shingles(text, shingle_size)
    if not grams:
        return None
    sketch = _template(num_perm, seed).copy()
    sketch.update_batch([g.encode("utf-8") for g in grams])
    return sketch.hashvalues


def _batches(paths: Sequence[str], text_key: str, url_key: str, on_bytes):
    """Lists of up to BATCH ``(DocRef, text)``, over every document of ``paths``; a repeated url is an error."""
    seen: dict[str, str] = {}
    batch = []
    for index, path in enumerate(paths):
        for lineno, offset, record in read_documents(path, text_key, url_key, on_bytes):
            url = record[url_key]
            if url in seen:
                raise DataError(f"{path}:{lineno}: url {url!r} was already seen at {seen[url]}; each document "
                                "needs its own url (drop the repeats, e.g. by filtering the url list with "
                                "blacklist_urls.py before downloading)")
            seen[url] = f"{path}:{lineno}"
            batch.append((DocRef(url, index, offset, lineno), record[text_key]))
            if len(batch) == BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def candidate_pairs(paths: Sequence[str], config: DedupConfig, text_key: str = "text", url_key: str = "url",
                    workers: int = 1) -> tuple[list[DocRef], set[tuple[int, int]], int]:
    """Every document with shingles, the LSH candidate pairs ``(i, j)``, i < j, among them, and the count skipped.

    Each document queries the index before it is inserted, so a pair is proposed once, by its later member.
    """
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=config.lsh_threshold or config.threshold, num_perm=config.num_perm)
    template = _template(config.num_perm, config.seed)
    hash_text = functools.partial(minhash_values, num_perm=config.num_perm, seed=config.seed,
                                  shingle_size=config.shingle_size)
    docs: list[DocRef] = []
    pairs: set[tuple[int, int]] = set()
    skipped = 0
    pool = None
    if workers > 1:
        import multiprocessing

        pool = multiprocessing.Pool(workers, initializer=leave_ctrl_c_to_the_parent)
    try:
        with byte_progress(paths, "minhash") as bar:
            for batch in _batches(paths, text_key, url_key, bar.update):
                texts = [text for _, text in batch]
                values = pool.map(hash_text, texts, chunksize=64) if pool else [hash_text(t) for t in texts]
                for (ref, _), hashvalues in zip(batch, values):
                    if hashvalues is None:
                        skipped += 1
                        continue
                    sketch = MinHash(seed=config.seed, hashvalues=hashvalues, permutations=template.permutations,
                                     scheme=SCHEME)
                    pairs.update((other, len(docs)) for other in lsh.query(sketch))
                    lsh.insert(len(docs), sketch)
                    docs.append(ref)
    finally:
        if pool is not None:
            pool.terminate()
    return docs, pairs, skipped


def score_pairs(paths: Sequence[str], docs: Sequence[DocRef], pairs: set[tuple[int, int]], config: DedupConfig,
                text_key: str = "text") -> dict[int, list[tuple[int, float]]]:
    """``{i: [(j, similarity), ...]}`` for the candidate pairs whose exact Jaccard similarity reaches the threshold."""
    from tqdm import tqdm

    handles = [open(path, "rb") for path in paths]
    try:
        @functools.lru_cache(maxsize=1024)  # pairs come sorted: the earlier document is reused across its run
        def shingles_of(i: int) -> frozenset[str]:
            record = read_record_at(handles[docs[i].file], docs[i].offset)
            return frozenset(shingles(record[text_key], config.shingle_size))

        found: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for i, j in tqdm(sorted(pairs), desc="jaccard", unit="pair", mininterval=1.0):
            similarity = jaccard(shingles_of(i), shingles_of(j))
            if similarity >= config.threshold:
                found[i].append((j, similarity))
        return found
    finally:
        for f in handles:
            f.close()


def write_duplicates(path: str, docs: Sequence[DocRef], found: dict[int, list[tuple[int, float]]]) -> None:
    """Write ``found`` in the format of the module docstring."""
    with atomic_output(path) as out:
        for i in sorted(found):
            others = [{docs[j].url: similarity} for j, similarity in found[i]]
            out.write(json.dumps({docs[i].url: others}, ensure_ascii=False) + "\n")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", required=True, help="loose json files, or folders of them")
    parser.add_argument("--output", required=True, help="where to write the near-duplicate pairs")
    parser.add_argument("--overwrite", "--force", dest="force", action="store_true",
                        help="replace --output if it exists")
    parser.add_argument("--threshold", type=_fraction, default=0.5,
                        help="report pairs with at least this Jaccard similarity (default 0.5)")
    parser.add_argument("--lsh-threshold", type=_fraction, default=None,
                        help="similarity LSH is tuned for (default: --threshold)")
    parser.add_argument("--num-perm", type=_positive, default=128, help="MinHash permutations (default 128)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the MinHash permutations (default 1)")
    parser.add_argument("--shingle-size", type=_positive, default=SHINGLE_SIZE,
                        help=f"characters per shingle (default {SHINGLE_SIZE})")
    parser.add_argument("--workers", type=_positive, default=1, help="processes computing MinHashes (default 1)")
    parser.add_argument("--text-key", default="text", help="json key of the text (default: text)")
    parser.add_argument("--url-key", default="url", help="json key of the url (default: url)")
    args = parser.parse_args(argv)
    if args.num_perm < 2:
        parser.error(f"--num-perm must be at least 2, got {args.num_perm}")

    paths = expand_inputs(args.inputs, "--inputs", exclude=[args.output], suffixes=JSON_SUFFIXES)
    check_output(args.output, args.force, paths, "--output")
    config = DedupConfig(args.threshold, args.lsh_threshold, args.num_perm, args.seed, args.shingle_size)
    docs, pairs, skipped = candidate_pairs(paths, config, args.text_key, args.url_key, args.workers)
    found = score_pairs(paths, docs, pairs, config, args.text_key)
    write_duplicates(args.output, docs, found)
    reported = sum(len(v) for v in found.values())
    urls = len(set(found) | {j for v in found.values() for j, _ in v})
    print(f"find_duplicates: read {len(docs) + skipped} documents from {len(paths)} file(s), "
          f"{skipped} without text skipped")
    print(f"  candidate pairs from LSH: {len(pairs)}")
    print(f"  pairs with similarity >= {args.threshold}: {reported} (involving {urls} documents)")
    print(f"  wrote {args.output}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
