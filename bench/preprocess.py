"""Time ``tools/preprocess_data.py`` with 1 and 2 worker processes on the same generated corpus.

Writes ``--mb`` MB of loose json to a temporary folder: documents of 50 to 1500 words drawn (seeded)
from a fixed list of common English words, cut into sentences of 5 to 30 words, with a paragraph break
now and then. Then runs the tool's core (``preprocess``: read, parse, tokenize, write ``.bin``/``.idx``,
everything but the interpreter's start) with each ``--workers`` count, alternating the order every
repeat so that a noisy machine slows all alike, and prints for each the median documents/s and input
MB/s over ``--repeats``, the ratio of each to the first count's throughput, and whether every run
wrote the same bytes (it must). The tokenizer is the real GPT-2 BPE from ``--cache-dir`` when
``gpt2-vocab.json`` and ``gpt2-merges.txt`` are there (``python tools/fetch_sample_data.py --cache-dir
cache`` fetches them), else the tests' tiny GPT-2 table. With one worker the tokenization runs in the
tool's own process and the tokenizers library may use several threads; each extra worker process uses
one. ``--split-sentences`` times the sentence level (nltk Punkt in Python: the workers matter more).

    python bench/preprocess.py
    python bench/preprocess.py --mb 50 --repeats 5 --workers 1 2 4 --split-sentences
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_utils.tokenization import GPT2_MERGES_NAME, GPT2_VOCAB_NAME  # noqa: E402
from tools.preprocess_data import output_prefixes, preprocess  # noqa: E402

WORDS = (
    "the of and to in is was for that on as with by he it at from his an were are which this be or has had not "
    "first one their its new after but who they have her she two been other when there all during into school "
    "time may years more most only over city some world would where later up such used many can state about "
    "national out known university united then made also team three between while under season film under "
    "music group war american history government north south river house game through family life century "
    "series part since well including being against early day second both these work name company before "
    "public london number each area four however called found took village station county played water book"
).split()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="size of the generated corpus")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to compare")
    parser.add_argument("--split-sentences", action="store_true", help="sentence level instead of documents")
    parser.add_argument("--cache-dir", default="cache", help="where the real GPT-2 vocabulary is looked for")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args()


def write_corpus(path: str, megabytes: float, seed: int) -> int:
    """Loose json of about ``megabytes`` MB from the word list; the number of documents."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    target, written, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            sentences = []
            remaining = int(rng.integers(50, 1500))
            while remaining > 0:
                n = min(remaining, int(rng.integers(5, 30)))
                sentence = " ".join(words[rng.integers(0, len(words), n)])
                sentences.append(sentence[0].upper() + sentence[1:] + ("." if rng.random() < 0.9 else "?"))
                remaining -= n
                if rng.random() < 0.1:
                    sentences.append("\n\n")
            line = json.dumps({"text": " ".join(sentences).replace(" \n\n ", "\n\n")}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


def tokenizer_spec(cache_dir: str, folder: str) -> tuple[dict, str]:
    """``make_tokenizer`` arguments and a description: the real GPT-2 files if present, else the tiny table."""
    vocab, merges = os.path.join(cache_dir, GPT2_VOCAB_NAME), os.path.join(cache_dir, GPT2_MERGES_NAME)
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        from tests.helpers import write_tiny_gpt2

        vocab, merges = write_tiny_gpt2(folder)
        what = "the tests' tiny GPT-2 table (no gpt2-vocab.json in --cache-dir)"
    else:
        what = f"GPT-2 BPE from {cache_dir}"
    return {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": vocab, "merge_file": merges}, what


def digest(prefix: str) -> str:
    sha = hashlib.sha256()
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as f:
            sha.update(f.read())
    return sha.hexdigest()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        start = time.perf_counter()
        path = os.path.join(tmp, "corpus.json")
        docs = write_corpus(path, args.mb, args.seed)
        spec, what = tokenizer_spec(args.cache_dir, tmp)
        level = "sentence" if args.split_sentences else "document"
        print(f"corpus: {docs} documents, {os.path.getsize(path) / 1e6:.1f} MB (generated in "
              f"{time.perf_counter() - start:.1f}s); tokenizer: {what}; level: {level}; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}")
        rates: dict[int, list[tuple[float, float]]] = {w: [] for w in args.workers}
        digests = set()
        for repeat in range(args.repeats):
            order = args.workers if repeat % 2 == 0 else args.workers[::-1]
            for workers in order:
                prefix = os.path.join(tmp, f"out{workers}")
                s = preprocess([path], spec, prefix, split_sentences=args.split_sentences, workers=workers,
                               force=True, progress=False)
                rates[workers].append((s.records / s.seconds, s.bytes / 1e6 / s.seconds))
                print(f"  repeat {repeat + 1}, {workers} worker(s): {s.seconds:.2f}s", flush=True)
                digests.add(digest(output_prefixes(prefix, ["text"], args.split_sentences)["text"]))
        base = statistics.median(r[1] for r in rates[args.workers[0]])
        for workers, runs in rates.items():
            docs_s, mb_s = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            print(f"{workers:>2} worker(s): median {docs_s:8.0f} documents/s | {mb_s:6.2f} MB/s | "
                  f"ratio to {args.workers[0]} worker(s) {mb_s / base:.2f}")
        print(f"outputs identical across worker counts and repeats: {'yes' if len(digests) == 1 else 'NO'}")


if __name__ == "__main__":
    main()
