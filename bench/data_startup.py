"""Time the data start-up of a GPT2 run on a prepared ~1 GB indexed dataset: first build against cache hit.

Generates (seeded, vectorised) two Megatron-Core indexed datasets of uint16 tokens in ``--dir``: one of
about ``--gb`` GB and one ``--small-fraction`` of that, each token a uniform id below 50256 and every
document ended by GPT-2's end-of-document id 50256; document lengths (that end included) are
lognormal with mean ``--doc-tokens`` (sigma 1, at least 2 tokens). Data already in ``--dir`` from an
earlier ``--keep`` run with the same ``--gb``, ``--small-fraction``, ``--doc-tokens`` and ``--seed``
is reused.

For two ``--data-path`` configurations, the big dataset alone and the blend ``0.7 BIG 0.3 SMALL``,
it times ``pretrain_gpt2.data_provider(args)`` (tokenizer, opening the datasets, their document
splits and the blend indices of train, valid and test, see ``data_utils/blending.py``) with ``args``
from ``arguments.get_args`` for ``--seq-length 1024 --batch-size 8 --train-iters 100000 --eval-iters
10 --split 949,50,1``, each time in a fresh Python process (nothing cached in Python memory; the
OS page cache stays warm, as on a machine that just prepared or read its data; ``--cold`` drops the
datasets' and their indices' pages from it before every start, Linux only):

- first: the configuration's cached indices under ``DIR/index-cache`` are removed before the run, so
  it computes and writes them;
- cached: ``--repeats`` runs after it, which find them and map them.

Each cached run also times the first ``__getitem__`` of a few training samples (the first, second,
middle and last, then a few seeded random ones). Prints a table, a row per configuration: tokens,
documents, first-build seconds, cached-start seconds (median), the ratio first/cached, and the
median first-sample milliseconds; the tokenizer's load time (in both) is printed beside it; then
how much resident memory ``data_provider`` gained (the pages of the maps it touched: a first build
that reads every document's last token touches the whole ``.bin``) and how much it had read from
storage (page-cache misses: next to nothing unless ``--cold``). When the median cached start is
``--slow-s`` seconds or more, or with ``--profile``, one more cached start per configuration is
profiled with cProfile and its top functions printed (``--profile``: a first build too). The
generated data and its index cache are removed at the end unless ``--keep``.

Needs the real GPT-2 vocabulary (``--vocab-file``/``--merge-file``, default ``gpt2-vocab.json`` and
``gpt2-merges.txt`` in ``--cache-dir``; ``python tools/fetch_sample_data.py --cache-dir cache``
fetches them).

    python bench/data_startup.py
    python bench/data_startup.py --gb 4 --repeats 5 --dir /data/bench --keep --profile
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from arguments import get_args  # noqa: E402
from data_utils.blending import CACHE_FOLDER  # noqa: E402
from data_utils.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)
from data_utils.tokenization import (  # noqa: E402
    GPT2_MERGES_NAME,
    GPT2_VOCAB_NAME,
    make_tokenizer,  # noqa: E402
)
from pretrain_gpt2 import data_provider  # noqa: E402

EOD = 50256  # GPT-2's <|endoftext|>; ordinary tokens are drawn below it
CHUNK_TOKENS = 1 << 24  # tokens generated and written per step (32 MB of uint16)
RESULT = "RESULT "  # the line of a child's stdout that carries its timings
BLEND = (0.7, 0.3)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the big dataset's .bin in GB (1e9 bytes)")
    parser.add_argument("--small-fraction", type=float, default=0.25, help="size of the second dataset / the first")
    parser.add_argument("--doc-tokens", type=float, default=1000.0, help="mean document length in tokens")
    parser.add_argument("--dir", default=None, help="where the datasets go (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="leave the datasets and their index cache in --dir")
    parser.add_argument("--repeats", type=int, default=3, help="cached runs per configuration")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-iters", type=int, default=100000)
    parser.add_argument("--eval-iters", type=int, default=10)
    parser.add_argument("--split", default="949,50,1")
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, "cache"), help="where the GPT-2 files are looked for")
    parser.add_argument("--vocab-file", default=None, help=f"default CACHE_DIR/{GPT2_VOCAB_NAME}")
    parser.add_argument("--merge-file", default=None, help=f"default CACHE_DIR/{GPT2_MERGES_NAME}")
    parser.add_argument("--samples", type=int, default=8, help="training samples whose first __getitem__ is timed")
    parser.add_argument("--slow-s", type=float, default=3.0, help="profile cached starts at least this slow")
    parser.add_argument("--profile", action="store_true", help="profile one cached start per configuration")
    parser.add_argument("--cold", action="store_true",
                        help="drop the data and index files from the OS page cache before every timed start")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON spec of one timed start
    args = parser.parse_args(argv)
    for flag, value in (("--gb", args.gb), ("--small-fraction", args.small_fraction),
                        ("--doc-tokens", args.doc_tokens - 1), ("--repeats", args.repeats)):
        if not value > 0:
            parser.error(f"{flag} must be positive (--doc-tokens above 1)")
    return args


def document_lengths(num_tokens: int, mean: float, rng: np.random.Generator) -> np.ndarray:
    """Lognormal document lengths (int64, each >= 2, eod included) summing to exactly ``num_tokens``."""
    sigma = 1.0
    mu = np.log(mean) - sigma**2 / 2  # a lognormal's mean is exp(mu + sigma^2 / 2)
    parts, total = [], 0
    while total < num_tokens:
        draw = np.maximum(2, np.rint(rng.lognormal(mu, sigma, int(1.1 * (num_tokens - total) / mean) + 16)))
        parts.append(draw.astype(np.int64))
        total += int(parts[-1].sum())
    lengths = np.concatenate(parts)
    ends = np.cumsum(lengths)
    n = int(np.searchsorted(ends, num_tokens)) + 1  # the first n documents reach num_tokens
    lengths = lengths[:n]
    lengths[-1] -= int(ends[n - 1]) - num_tokens
    if lengths[-1] < 2:  # the trimmed last document is too short to hold a token and its eod: fold it in
        lengths = np.append(lengths[:-2], lengths[-2] + lengths[-1])
    return lengths


def write_dataset(prefix: str, num_tokens: int, mean_doc: float, seed: int) -> int:
    """A uint16 GPT-2 style indexed dataset of ``num_tokens`` random tokens at ``prefix``; its document count."""
    rng = np.random.default_rng(seed)
    lengths = document_lengths(num_tokens, mean_doc, rng)
    ends = np.cumsum(lengths)
    # document boundaries of the chunks: each chunk ends at the first document end past k * CHUNK_TOKENS
    cuts = np.unique(np.searchsorted(ends, np.arange(CHUNK_TOKENS, num_tokens, CHUNK_TOKENS)) + 1)
    bounds = np.concatenate([[0], cuts[cuts < len(lengths)], [len(lengths)]])
    with IndexedDatasetBuilder(data_file_path(prefix), np.uint16) as builder:
        for first, stop in zip(bounds[:-1], bounds[1:]):
            part = lengths[first:stop]
            tokens = rng.integers(0, EOD, int(part.sum()), dtype=np.uint16)
            tokens[np.cumsum(part) - 1] = EOD
            builder.add_documents(tokens, part, np.ones(len(part), dtype=np.int64))
        builder.finalize(index_file_path(prefix))
    return len(lengths)


def ensure_datasets(args: argparse.Namespace, folder: str) -> list[str]:
    """The big and the small dataset's prefixes in ``folder``, generated unless already there."""
    prefixes = []
    for k, fraction in enumerate((1.0, args.small_fraction)):
        gb = args.gb * fraction
        name = f"startup-{gb:g}gb-d{args.doc_tokens:g}-s{args.seed + k}"
        prefix = os.path.join(folder, name)
        if IndexedDataset.exists(prefix):
            print(f"reusing {prefix} (.bin/.idx)")
        else:
            start = time.perf_counter()
            num_tokens = int(gb * 1e9) // 2
            docs = write_dataset(prefix, num_tokens, args.doc_tokens, args.seed + k)
            seconds = time.perf_counter() - start
            print(f"generated {prefix}: {num_tokens} tokens, {docs} documents, {2 * num_tokens / 1e9:.2f} GB in "
                  f"{seconds:.1f}s ({2 * num_tokens / 1e6 / seconds:.0f} MB/s)", flush=True)
        prefixes.append(prefix)
    return prefixes


def clear_index_cache(folder: str, prefixes: Sequence[str]) -> None:
    """Remove the cached indices (and killed builds' temporaries) of ``prefixes`` from ``folder/index-cache``."""
    root = os.path.join(folder, CACHE_FOLDER)
    if not os.path.isdir(root):
        return
    names = [os.path.basename(p) + "." for p in prefixes]
    for entry in os.listdir(root):
        if any(entry.lstrip(".").startswith(n) for n in names):
            path = os.path.join(root, entry)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if not os.listdir(root):
        os.rmdir(root)


def train_argv(args: argparse.Namespace, data_path: Sequence[str]) -> list[str]:
    """The flags of the GPT2 run whose data start-up is timed."""
    vocab = args.vocab_file or os.path.join(args.cache_dir, GPT2_VOCAB_NAME)
    merges = args.merge_file or os.path.join(args.cache_dir, GPT2_MERGES_NAME)
    return ["--data-path", *data_path, "--seq-length", str(args.seq_length), "--max-position-embeddings",
            str(args.seq_length), "--batch-size", str(args.batch_size), "--train-iters", str(args.train_iters),
            "--eval-iters", str(args.eval_iters), "--split", args.split, "--seed", str(args.seed),
            "--cache-dir", args.cache_dir, "--vocab-file", vocab, "--merge-file", merges]


def sample_positions(n: int, count: int, seed: int) -> list[int]:
    """The first, second, middle and last of ``n`` samples, then seeded random ones, ``count`` in all."""
    fixed = list(dict.fromkeys(i for i in (0, 1, n // 2, n - 1) if 0 <= i < n))[:count]
    rest = np.random.default_rng(seed).integers(0, n, max(0, count - len(fixed))) if n else []
    return fixed + [int(i) for i in rest]


def resident_mb() -> float:
    """This process's resident memory in MB, file-backed pages of its maps included (NaN off Linux)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return float("nan")


def storage_read_mb() -> float:
    """MB this process has had read from storage (page-cache misses, mapped pages too; NaN off Linux)."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
        return int(fields["read_bytes"]) / 1e6
    except (OSError, KeyError, ValueError):
        return float("nan")


def evict(folder: str, prefixes: Sequence[str]) -> None:
    """Drop the datasets' files and their cached indices from the OS page cache (``--cold``; Linux only)."""
    paths = [f(p) for p in prefixes for f in (data_file_path, index_file_path)]
    for root, _, files in os.walk(os.path.join(folder, CACHE_FOLDER)):
        paths += [os.path.join(root, name) for name in files]
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed data start-up, in this (fresh) process; the timings as a dict."""
    import cProfile
    import io
    import pstats

    out: dict[str, Any] = {}
    args = get_args(spec["argv"])
    read, resident = storage_read_mb(), resident_mb()
    start = time.perf_counter()
    make_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.cache_dir)
    out["tokenizer_s"] = time.perf_counter() - start
    profiler = None
    if spec["profile"]:
        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    _, train, valid, test = data_provider(args)
    out["provider_s"] = time.perf_counter() - start
    out["touched_mb"] = resident_mb() - resident
    out["read_mb"] = storage_read_mb() - read
    if profiler is not None:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        out["profile"] = text.getvalue()
    out["lengths"] = [0 if d is None else len(d) for d in (train, valid, test)]
    out["getitem_ms"] = []
    for i in sample_positions(len(train), spec["samples"], spec["seed"]):
        start = time.perf_counter()
        train[i]
        out["getitem_ms"].append(1000 * (time.perf_counter() - start))
    return out


def run_child(args: argparse.Namespace, data_path: Sequence[str], profile: bool = False) -> dict[str, Any]:
    """``child`` in a fresh interpreter; its timings plus the process's wall time."""
    spec = {"argv": train_argv(args, data_path), "samples": args.samples, "seed": args.seed, "profile": profile}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: the timed start-up with --data-path {' '.join(data_path)} failed: {tail}")
    return {**json.loads(lines[-1][len(RESULT):]), "process_s": wall}


def measure(args: argparse.Namespace, folder: str, name: str, data_path: Sequence[str],
            prefixes: Sequence[str]) -> dict[str, Any]:
    """First (index cache cleared) and ``--repeats`` cached start-ups of one ``--data-path``; profiles."""

    def start(first: bool, profile: bool = False) -> dict[str, Any]:
        if first:
            clear_index_cache(folder, prefixes)
        if args.cold:
            evict(folder, prefixes)
        return run_child(args, data_path, profile)

    first = start(True)
    print(f"  {name}: first {first['provider_s']:.2f}s", end="", flush=True)
    cached = []
    for _ in range(args.repeats):
        cached.append(start(False))
        print(f", cached {cached[-1]['provider_s']:.2f}s", end="", flush=True)
    print()
    result = {"name": name, "first": first, "cached": cached, "profiles": {},
              "cached_s": statistics.median(c["provider_s"] for c in cached)}
    if args.profile or result["cached_s"] >= args.slow_s:
        result["profiles"]["cached"] = start(False, profile=True)["profile"]
    if args.profile:
        result["profiles"]["first"] = start(True, profile=True)["profile"]
    return result


def describe(prefixes: Sequence[str]) -> tuple[int, int, float]:
    """(tokens, documents, GB of .bin) of the datasets at ``prefixes`` together."""
    opened = [IndexedDataset(p) for p in prefixes]
    return (sum(d.num_tokens for d in opened), sum(d.num_documents for d in opened),
            sum(os.path.getsize(data_file_path(p)) for p in prefixes) / 1e9)


def report(results: Sequence[dict[str, Any]], sizes: dict[str, tuple[int, int, float]]) -> None:
    header = (f"{'configuration':<22} {'GB':>5} {'tokens':>12} {'documents':>10} {'first s':>8} {'cached s':>9} "
              f"{'first/cached':>12} {'sample ms':>9} {'tokenizer s':>11}")
    print(header)
    print("-" * len(header))
    for r in results:
        tokens, docs, gb = sizes[r["name"]]
        first = r["first"]["provider_s"]
        sample_ms = statistics.median(ms for c in r["cached"] for ms in c["getitem_ms"])
        tokenizer = statistics.median(c["tokenizer_s"] for c in r["cached"])
        print(f"{r['name']:<22} {gb:5.2f} {tokens:12d} {docs:10d} {first:8.2f} {r['cached_s']:9.3f} "
              f"{first / r['cached_s']:12.1f} {sample_ms:9.2f} {tokenizer:11.3f}")
    for r in results:
        c = r["cached"][0]
        print(f"{r['name']}: samples train/valid/test {c['lengths']}; first __getitem__ ms of the first cached run "
              f"{', '.join(f'{ms:.2f}' for ms in c['getitem_ms'])}; whole cached process (interpreter, torch "
              f"import, arguments, data, samples) {statistics.median(x['process_s'] for x in r['cached']):.2f}s")
    for r in results:
        first, c = r["first"], r["cached"][0]
        print(f"{r['name']}: resident memory gained by data_provider (mapped pages touched) first "
              f"{first['touched_mb']:.0f} MB, cached {c['touched_mb']:.0f} MB; read from storage first "
              f"{first['read_mb']:.0f} MB, cached {c['read_mb']:.0f} MB")
    for r in results:
        for kind, text in r["profiles"].items():
            print(f"\ncProfile of a {kind} start, {r['name']}:\n{text}")


def check_tokenizer(args: argparse.Namespace) -> None:
    for path, flag in ((args.vocab_file or os.path.join(args.cache_dir, GPT2_VOCAB_NAME), "--vocab-file"),
                       (args.merge_file or os.path.join(args.cache_dir, GPT2_MERGES_NAME), "--merge-file")):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path}: no such file; run `python tools/fetch_sample_data.py --cache-dir "
                             f"{args.cache_dir}` or pass {flag}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(RESULT + json.dumps(child(json.loads(args.child))), flush=True)
        return
    check_tokenizer(args)
    own_dir = args.dir is None
    folder = tempfile.mkdtemp(prefix="bench-data-startup-") if own_dir else args.dir
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"error: cannot create --dir {folder}: {exc.strerror}") from None
    prefixes: list[str] = []
    try:
        print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; data in "
              f"{folder}", flush=True)
        prefixes = ensure_datasets(args, folder)
        configs = {"one dataset": [prefixes[0]],
                   f"blend {BLEND[0]:g}/{BLEND[1]:g}": [str(BLEND[0]), prefixes[0], str(BLEND[1]), prefixes[1]]}
        sizes = {"one dataset": describe(prefixes[:1]), f"blend {BLEND[0]:g}/{BLEND[1]:g}": describe(prefixes)}
        results = [measure(args, folder, name, data_path, prefixes) for name, data_path in configs.items()]
        report(results, sizes)
        print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if not args.keep:
            if own_dir:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                clear_index_cache(folder, prefixes)
                for prefix in prefixes:
                    for path in (index_file_path(prefix), data_file_path(prefix)):
                        if os.path.exists(path):
                            os.remove(path)


if __name__ == "__main__":
    main()
