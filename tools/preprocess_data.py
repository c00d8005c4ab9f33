"""Tokenize loose json once into Megatron-Core indexed datasets (``.bin`` + ``.idx``).

    python tools/preprocess_data.py --input corpus.json --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --cache-dir cache --append-eod --workers 8
    python tools/preprocess_data.py --input 'shards/*.json' --output-prefix data/wiki --split-sentences \\
        --tokenizer-type BertWordPieceTokenizer --vocab-file bert-large-uncased-vocab.txt --workers 8

For each ``--json-keys`` key (default ``text``) it writes ``{output-prefix}_{key}_{level}.bin`` and
``.idx``, with ``level`` ``document`` (one sequence per document) or, with ``--split-sentences``,
``sentence`` (one sequence per sentence, split by ``data_utils.sentences.split_sentences`` and
tokenized one by one exactly as the lazy sentence corpus does; ``--presplit-sentences`` takes each
line as one sentence). ``--append-eod`` adds the tokenizer's end-of-document id after each document
(to its last sentence). Documents without a token are skipped and counted. Tokens are uint16 when the
vocabulary has fewer than 65500 ids (Megatron-Core's rule), else int32. The format and the reader are
in ``data_utils/indexed_dataset.py``.

Input files (several, or globs) are read in order in chunks of whole lines; ``--workers N`` processes
tokenize the chunks while this one writes their results in order, so the output is byte-identical
whatever N. Worker processes use one tokenizer thread each (``TOKENIZERS_PARALLELISM=false`` unless
set); with one worker the tokenization runs in this process, with the tokenizers library's threads.
Outputs are written under temporary names and renamed when complete: a bad line (reported as
``file:line``) or an interruption leaves nothing, and existing outputs are replaced only with
``--overwrite`` (``--force``).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic import check_new_file, remove_orphans  # noqa: E402
from data_utils import sentences  # noqa: E402
from data_utils.corpora import loose_json_record  # noqa: E402
from data_utils.errors import DataError  # noqa: E402
from data_utils.indexed_dataset import (  # noqa: E402
    IndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)
from data_utils.tokenization import TOKENIZER_TYPES, Tokenizer, make_tokenizer  # noqa: E402
from initialize import leave_ctrl_c_to_the_parent  # noqa: E402

CHUNK_BYTES = 1 << 20  # input handed to a worker at a time (whole lines; a longer line makes a longer chunk)
DEFAULT_LOG_INTERVAL = 100_000


@dataclass(frozen=True)
class EncodeConfig:
    """What a worker needs to tokenize chunks; plain values, so it pickles to worker processes.

    ``tokenizer`` holds ``make_tokenizer``'s keyword arguments.
    """

    tokenizer: dict[str, Any]
    json_keys: tuple[str, ...] = ("text",)
    split_sentences: bool = False
    presplit: bool = False
    append_eod: bool = False


@dataclass
class Encoded:
    """One chunk's documents for one key: ``tokens`` back to back, ``lengths`` per sequence,
    ``sequences`` per kept document, and how many documents were ``empty`` (skipped)."""

    tokens: np.ndarray
    lengths: np.ndarray
    sequences: np.ndarray
    empty: int


@dataclass
class KeyStats:
    """What was written for one json key."""

    prefix: str
    documents: int = 0
    empty: int = 0
    sequences: int = 0
    tokens: int = 0


@dataclass
class Summary:
    """A whole run: json records read, input bytes, seconds, and per key what was written."""

    records: int = 0
    bytes: int = 0
    seconds: float = 0.0
    keys: dict[str, KeyStats] = field(default_factory=dict)
    dtype: str = ""


class Encoder:
    """Parses and tokenizes chunks of loose-json lines (in a worker process, or in this one)."""

    def __init__(self, config: EncodeConfig) -> None:
        self.config = config
        self.tokenizer: Tokenizer = make_tokenizer(**config.tokenizer)
        self.dtype = best_dtype(self.tokenizer.vocab_size)

    def __call__(self, chunk: tuple[str, int, bytes]) -> tuple[int, dict[str, Encoded]]:
        """(records in the chunk, per key its ``Encoded``) for ``(path, number of its first line, bytes)``."""
        path, first_lineno, data = chunk
        texts: dict[str, list[str]] = {key: [] for key in self.config.json_keys}
        records = 0
        for offset, raw in enumerate(data.split(b"\n")):
            if not raw.strip():
                continue
            records += 1
            for key in self.config.json_keys:
                texts[key].append(_record_text(raw, path, first_lineno + offset, key))
        return records, {key: self.encode(docs) for key, docs in texts.items()}

    def encode(self, docs: Sequence[str]) -> Encoded:
        """Tokenize documents: each one whole, or sentence by sentence, dropping sentences without tokens."""
        if self.config.split_sentences:
            pieces = [sentences.split_sentences(doc, self.config.presplit) for doc in docs]
        else:
            pieces = [[doc] for doc in docs]
        ids = iter(self.tokenizer.encode_batch([p for doc in pieces for p in doc]))
        eod = [self.tokenizer.eod] if self.config.append_eod else []
        kept: list[list[list[int]]] = []
        for doc in pieces:
            pieces_ids = [s for s in itertools.islice(ids, len(doc)) if s]
            if pieces_ids:
                kept.append(pieces_ids[:-1] + [pieces_ids[-1] + eod])
        lengths = np.fromiter((len(s) for doc in kept for s in doc), np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(s for doc in kept for s in doc), np.int64,
                           int(lengths.sum()))
        limit = np.iinfo(self.dtype).max
        if flat.size and (flat.min() < 0 or flat.max() > limit):
            raise RuntimeError(f"{self.tokenizer.name} returned ids {flat.min()}..{flat.max()}, outside {self.dtype} "
                               f"(vocab_size={self.tokenizer.vocab_size})")
        return Encoded(flat.astype(self.dtype), lengths, np.array([len(d) for d in kept], np.int64),
                       len(docs) - len(kept))


def _record_text(raw: bytes, path: str, lineno: int, key: str) -> str:
    try:
        return loose_json_record(raw, path, lineno, key)[key]
    except DataError as err:
        raise DataError(str(err).replace("--text-key", "--json-keys")) from None


_WORKER_ENCODER: Encoder | None = None


def _start_worker(config: EncodeConfig) -> None:
    global _WORKER_ENCODER
    leave_ctrl_c_to_the_parent()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker: --workers sets the cores
    _WORKER_ENCODER = Encoder(config)


def _encode_in_worker(chunk: tuple[str, int, bytes]) -> tuple[int, dict[str, Encoded]]:
    assert _WORKER_ENCODER is not None, "the pool initializer did not run"
    return _WORKER_ENCODER(chunk)


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by ``--input``: paths as given, globs expanded (sorted); one DataError line if one is missing."""
    import glob

    files: list[str] = []
    for pattern in patterns:
        if os.path.isfile(pattern):
            files.append(pattern)
        elif os.path.isdir(pattern):
            raise DataError(f"--input {pattern} is a folder; pass its files, or a glob such as {pattern}/*.json")
        elif any(c in pattern for c in "*?["):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise DataError(f"--input {pattern!r} matches no file; check the pattern (quote it for the shell)")
            files.extend(matches)
        else:
            raise DataError(f"cannot open corpus {pattern}: no such file; check --input")
    return files


def read_chunks(paths: Sequence[str], chunk_bytes: int | None = None) -> Iterator[tuple[str, int, bytes]]:
    """``(path, number of the first line, bytes)`` pieces of whole lines of each file, in order.

    Each piece is about ``chunk_bytes`` (default ``CHUNK_BYTES``) long, or one line when a line is longer.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    for path in paths:
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise DataError(f"cannot open corpus {path}: {exc.strerror}; check --input") from None
        with f:
            lineno, carry = 1, b""
            while block := f.read(chunk_bytes):
                data = carry + block
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no line ends in it yet: read on
                    carry = data
                    continue
                carry = data[cut:]
                yield path, lineno, data[:cut]
                lineno += data.count(b"\n", 0, cut)
            if carry:
                yield path, lineno, carry


def _encoded_chunks(chunks: Iterator[tuple[str, int, bytes]], config: EncodeConfig,
                    workers: int) -> Iterator[tuple[int, int, dict[str, Encoded]]]:
    """``(bytes, records, per key Encoded)`` for each chunk, in input order, encoded by ``workers`` processes.

    At most two chunks per worker are in flight, so memory stays bounded however fast the input reads.
    """
    if workers == 1:
        encode = Encoder(config)
        for chunk in chunks:
            yield (len(chunk[2]), *encode(chunk))
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(config,)) as pool:
        pending: deque[tuple[int, Any]] = deque()
        for chunk in chunks:
            pending.append((len(chunk[2]), pool.apply_async(_encode_in_worker, (chunk,))))
            if len(pending) >= 2 * workers:
                size, result = pending.popleft()
                yield (size, *result.get())
        while pending:
            size, result = pending.popleft()
            yield (size, *result.get())


def output_prefixes(output_prefix: str, json_keys: Sequence[str], split_sentences: bool) -> dict[str, str]:
    """``{key: f"{output_prefix}_{key}_{level}"}``, Megatron-Core's names (level ``document`` or ``sentence``)."""
    level = "sentence" if split_sentences else "document"
    return {key: f"{output_prefix}_{key}_{level}" for key in json_keys}


def _check_outputs(output_prefix: str, prefixes: Sequence[str], force: bool) -> None:
    folder = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(folder):
        raise DataError(f"--output-prefix {output_prefix}: folder {folder} does not exist; create it first")
    for prefix in prefixes:
        for path in (data_file_path(prefix), index_file_path(prefix)):
            check_new_file(path, "--output-prefix", force)  # exists, a directory, writable: before any work
    remove_orphans(folder)  # what a killed run left


def preprocess(inputs: Sequence[str], tokenizer: dict[str, Any], output_prefix: str,
               json_keys: Sequence[str] = ("text",), *, split_sentences: bool = False, presplit: bool = False,
               append_eod: bool = False, workers: int = 1, force: bool = False,
               log_interval: int = DEFAULT_LOG_INTERVAL, progress: bool = True) -> Summary:
    """Tokenize loose-json ``inputs`` (files) into one indexed dataset per key; what was written.

    ``tokenizer`` holds ``make_tokenizer``'s keyword arguments. ``presplit`` implies ``split_sentences``.
    """
    split_sentences = split_sentences or presplit
    config = EncodeConfig(dict(tokenizer), tuple(json_keys), split_sentences, presplit, append_eod)
    prefixes = output_prefixes(output_prefix, json_keys, split_sentences)
    _check_outputs(output_prefix, list(prefixes.values()), force)
    dtype = best_dtype(make_tokenizer(**config.tokenizer).vocab_size)  # also trains a missing SentencePiece model
    if split_sentences:
        sentences.split_sentences("", presplit)  # imports nltk and builds the splitter once, before workers fork
    summary = Summary(keys={key: KeyStats(prefix) for key, prefix in prefixes.items()}, dtype=dtype.name)
    start = time.perf_counter()
    with ExitStack() as stack:
        builders = {key: stack.enter_context(IndexedDatasetBuilder(data_file_path(prefix), dtype))
                    for key, prefix in prefixes.items()}
        encoded = _encoded_chunks(read_chunks(inputs), config, workers)
        stack.callback(encoded.close)  # stops the worker pool first if anything fails
        bar = stack.enter_context(_progress_bar(inputs, progress))
        for size, records, per_key in encoded:
            for key, part in per_key.items():
                builders[key].add_documents(part.tokens, part.lengths, part.sequences)
                _count(summary.keys[key], part)
            logged = summary.records // log_interval
            summary.records += records
            summary.bytes += size
            bar.update(size)
            if summary.records // log_interval > logged:
                bar.write(_rate_line(summary, time.perf_counter() - start))
        for key, stats in summary.keys.items():
            if stats.tokens == 0:
                more = f" (and {len(inputs) - 1} more files)" if len(inputs) > 1 else ""
                raise DataError(f"{inputs[0]}{more}: no tokens under key {key!r} in {summary.records} json records; "
                                "nothing written (check the files and --json-keys)")
        for key, builder in builders.items():
            builder.finalize(index_file_path(prefixes[key]))
    summary.seconds = time.perf_counter() - start
    return summary


def _count(stats: KeyStats, part: Encoded) -> None:
    stats.documents += len(part.sequences)
    stats.empty += part.empty
    stats.sequences += len(part.lengths)
    stats.tokens += len(part.tokens)


def _progress_bar(inputs: Sequence[str], enabled: bool) -> Any:
    from tqdm import tqdm

    total = sum(os.path.getsize(path) for path in inputs)
    return tqdm(total=total, unit="B", unit_scale=True, mininterval=1.0, desc="tokenizing", disable=not enabled)


def _rate_line(summary: Summary, seconds: float) -> str:
    seconds = max(seconds, 1e-9)
    return (f"{summary.records} documents, {summary.bytes / 1e6:.1f} MB in {seconds:.1f}s: "
            f"{summary.records / seconds:.0f} documents/s, {summary.bytes / 1e6 / seconds:.2f} MB/s")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True, help="loose json files or globs, read in order")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one output per key")
    group.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (BERT)")
    group.add_argument("--presplit-sentences", action="store_true",
                       help="documents are one sentence a line (implies --split-sentences)")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=TOKENIZER_TYPES)
    group.add_argument("--vocab-file", default=None, help="vocabulary file (GPT2 vocab.json or BERT vocab.txt)")
    group.add_argument("--merge-file", default=None, help="GPT2 BPE merges.txt")
    group.add_argument("--tokenizer-model-type", default=None,
                       help="BertWordPieceTokenizer: bert-large-uncased, bert-base-cased, ...; SentencePiece: the "
                            "model type of a model it trains")
    group.add_argument("--tokenizer-path", default="tokenizer.model", help="SentencePieceTokenizer: the model file")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="SentencePieceTokenizer: pieces of a model trained from --input when it is absent")
    group.add_argument("--cache-dir", default="cache", help="where vocabulary files are looked up")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document id to each document")
    group = parser.add_argument_group("output")
    group.add_argument("--output-prefix", required=True, help="outputs are PREFIX_KEY_LEVEL.bin and .idx")
    group.add_argument("--overwrite", "--force", dest="force", action="store_true", help="replace existing outputs")
    group.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    group.add_argument("--log-interval", type=int, default=DEFAULT_LOG_INTERVAL,
                       help="print the rate every this many documents")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.log_interval < 1:
        parser.error(f"--log-interval must be at least 1, got {args.log_interval}")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys {' '.join(args.json_keys)}: a key is given twice")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    inputs = expand_inputs(args.input)
    tokenizer = {"tokenizer_type": args.tokenizer_type, "vocab_file": args.vocab_file, "merge_file": args.merge_file,
                 "cache_dir": args.cache_dir, "model_type": args.tokenizer_model_type,
                 "tokenizer_path": args.tokenizer_path, "vocab_size": args.vocab_size, "train_files": inputs,
                 "text_key": args.json_keys[0]}
    summary = preprocess(inputs, tokenizer, args.output_prefix, args.json_keys,
                         split_sentences=args.split_sentences, presplit=args.presplit_sentences,
                         append_eod=args.append_eod, workers=args.workers, force=args.force,
                         log_interval=args.log_interval, progress=not args.no_progress)
    for key, stats in summary.keys.items():
        print(f"{stats.prefix}.bin/.idx ({key!r}, {summary.dtype}): {stats.documents} documents "
              f"({stats.empty} empty skipped), {stats.sequences} sequences, {stats.tokens} tokens")
    print(_rate_line(summary, summary.seconds) + f" with {args.workers} worker(s)")


if __name__ == "__main__":
    from initialize import run_main

    run_main(main)
