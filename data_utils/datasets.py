"""Deterministic train/valid/test splits and the GPT2 windowed dataset.

``--split 949,50,1`` gives each document of the training corpora to train, valid or test by a hash
of (``--seed``, the document's index in its corpus) compared with the cumulative fractions. The
split is the same on every run with the same seed, and appending documents to a corpus never moves
the earlier ones to another split (except on corpora so small that a split would otherwise be empty:
each split with a non-zero share gets at least one document when there are enough). ``parse_split``
gives the 2019 rules: ``0.8`` leaves 0.2 to validation, and a split given as ``--valid-data`` or
``--test-data`` hands its share of ``--train-data`` back to training.

A split's documents form one token stream, each followed by the end-of-document id, cut into
windows of ``seq_length + 1`` tokens; consecutive windows share one boundary token, so sample ``i``
holds stream tokens ``[i * seq_length, i * seq_length + seq_length + 1)`` (inputs are
``text[:-1]``, labels ``text[1:]``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from data_utils.corpora import resolve_corpora
from data_utils.errors import DataError, warn
from data_utils.lazy_loader import InMemoryCorpus, LazyCorpus, load_corpus
from data_utils.tokenization import Tokenizer

logger = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "valid", "test")
_MASK64 = (1 << 64) - 1


def split_lengths(train: Any, evaluation: Any = None) -> tuple[Any, Any, Any]:
    """A per-split setting (train, valid, test): ``evaluation`` for validation and test when given
    (``--eval-seq-length``, ``--eval-max-preds-per-seq``), else the training one."""
    held_out = train if evaluation is None else evaluation
    return train, held_out, held_out


def parse_split(split: str, valid_given: bool = False, test_given: bool = False) -> tuple[float, float, float]:
    """Normalised (train, valid, test) fractions of ``--train-data`` from ``--split``, as in Megatron-LM (2019).

    ``"949,50,1"``, ``"95,5"``, ``"1"`` (``/`` also separates) are weights, normalised by their sum. Fractions
    summing below 1 leave the remainder to the next split (``"0.8"`` is 0.8 train, 0.2 valid; ``"0.8,0.1"`` gives
    test 0.1); three of them are weights like any others (``"0.5,0.2,0.1"`` is 5/8, 2/8, 1/8). A split given as
    its own data (``valid_given``, ``test_given``: ``--valid-data``/``--test-data``) takes nothing from
    ``--train-data``: its share goes back to the others, so ``"949,50,1"`` with ``--valid-data`` trains on
    949/950 of the documents.
    """
    fields = [f.strip() for f in split.replace("/", ",").split(",")]
    try:
        weights = [float(f) for f in fields]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(
            f"--split {split!r}: expected 1 to 3 non-negative numbers with a positive sum, e.g. 949,50,1"
        )
    total = sum(weights)
    if total < 1 and len(weights) < 3:  # fractions: the remainder is the next split's (2019 dropped a fourth)
        weights.append(1.0 - total)
    weights += [0.0] * (3 - len(weights))
    if valid_given:
        weights[1] = 0.0
    if test_given:
        weights[2] = 0.0
    total = sum(weights)
    if total <= 0:
        raise DataError(f"--split {split!r} gives --train-data nothing to train on once --valid-data/--test-data "
                        "take their splits; give training a share, e.g. 949,50,1")
    return weights[0] / total, weights[1] / total, weights[2] / total


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def document_hashes(num_docs: int, seed: int) -> np.ndarray:
    """A uniform float in [0, 1) per document index, a pure function of (seed, index)."""
    seed_key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    h = _splitmix64(np.arange(num_docs, dtype=np.uint64) ^ seed_key)
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def assign_splits(num_docs: int, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split number (0 train, 1 valid, 2 test) of each of ``num_docs`` documents (see ``assign_corpus_splits``)."""
    return assign_corpus_splits([num_docs], fractions, seed)[0]


def assign_corpus_splits(sizes: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split numbers of the documents of several corpora of ``sizes`` documents each.

    Document ``i`` of a corpus goes to the split whose interval of cumulative fractions holds its
    hash, so a split's share is its fraction on average and appending documents moves no earlier
    one. A split with a non-zero fraction that hashing leaves empty gets the document whose hash is
    nearest its interval, taken from a split with documents to spare, as long as there are at least
    as many documents as non-zero splits.
    """
    bounds = np.cumsum(np.asarray(fractions, dtype=np.float64))
    bounds /= bounds[-1]  # trailing zero fractions give bounds of exactly 1.0
    hashes = [document_hashes(n, seed) for n in sizes]
    which = [np.searchsorted(bounds[:-1], h, side="right").astype(np.int8) for h in hashes]
    wanted = [s for s in range(len(fractions)) if fractions[s] > 0]
    if sum(sizes) < len(wanted):
        return which
    lows = np.concatenate([[0.0], bounds[:-1]])
    for s in wanted:
        counts = sum((np.bincount(w, minlength=len(fractions)) for w in which),
                     np.zeros(len(fractions), dtype=np.int64))
        if counts[s]:
            continue
        best: tuple[float, int, int] | None = None
        for c, (w, h) in enumerate(zip(which, hashes, strict=True)):
            spare = counts[w] > 1
            if not spare.any():
                continue
            distance = np.where(spare, np.maximum(lows[s] - h, h - bounds[s]), np.inf)
            j = int(np.argmin(distance))
            if best is None or distance[j] < best[0]:
                best = (float(distance[j]), c, j)
        assert best is not None  # enough documents: some split holds more than one
        which[best[1]][best[2]] = s
    return which


class Documents:
    """Chosen documents of several corpora as one sequence: ``parts`` is ``[(corpus, indices)]``."""

    def __init__(self, parts: list[tuple[Any, np.ndarray]]) -> None:
        self.parts = [(corpus, np.asarray(idx, dtype=np.int64)) for corpus, idx in parts]
        counts = [len(idx) for _, idx in self.parts]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.lengths = (np.concatenate([corpus.lengths[idx] for corpus, idx in self.parts])
                        if self.parts else np.zeros(0, dtype=np.int64)).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[Any, int]:
        """(corpus, index in that corpus) of document ``i``."""
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        corpus, idx = self.parts[part]
        return corpus, int(idx[i - self._starts[part]])

    def __getitem__(self, i: int) -> np.ndarray:
        corpus, j = self.locate(i)
        return corpus[j]


def sample_index(i: int, num_samples: int) -> int:
    """``i`` as an index into ``num_samples`` samples (negative counts from the end); IndexError past them."""
    if i < 0:
        i += num_samples
    if not 0 <= i < num_samples:
        raise IndexError(f"sample {i} out of range for {num_samples} samples")
    return i


class GPT2Dataset(torch.utils.data.Dataset):
    """Windows of ``seq_length + 1`` tokens over documents joined by ``eod``; ``{'text': int64 array}``.

    ``docs`` is any sequence of 1-D token arrays (with a ``lengths`` array, or it is computed).
    Only the cumulative lengths are precomputed (or given as ``ends``, ``cumsum(lengths + 1)``); a
    sample reads just the documents it overlaps.
    """

    def __init__(self, docs: Sequence[np.ndarray], seq_length: int, eod: int, name: str = "train",
                 lengths: np.ndarray | None = None, ends: np.ndarray | None = None) -> None:
        if seq_length < 1:
            raise DataError(f"--seq-length must be positive, got {seq_length}")
        if lengths is None:
            lengths = getattr(docs, "lengths", None)
        self.lengths = np.asarray(lengths if lengths is not None else [len(d) for d in docs], dtype=np.int64)
        self.docs, self.seq_length, self.eod, self.name = docs, seq_length, eod, name
        # exclusive end of document j's tokens + its eod; ``ends`` may come precomputed (a cached map)
        self.ends = np.cumsum(self.lengths + 1) if ends is None else ends
        self.num_tokens = int(self.ends[-1]) if len(self.ends) else 0
        self.num_samples = (self.num_tokens - 1) // seq_length if self.num_tokens > seq_length else 0
        if self.num_samples == 0:
            raise DataError(
                f"the {name} split has {self.num_tokens} tokens in {len(self.lengths)} documents, fewer than the "
                f"{seq_length + 1} one sample needs (--seq-length {seq_length}); use more data, a shorter "
                f"--seq-length or a larger {name} share in --split"
            )

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = sample_index(i, self.num_samples)
        need = self.seq_length + 1
        out = np.empty(need, dtype=np.int64)
        pos = i * self.seq_length
        d = int(np.searchsorted(self.ends, pos, side="right"))  # first document ending after pos
        filled = 0
        while filled < need:
            local = pos - (int(self.ends[d]) - int(self.lengths[d]) - 1)
            if local < self.lengths[d]:
                take = min(int(self.lengths[d]) - local, need - filled)
                out[filled:filled + take] = self.docs[d][local:local + take]
            else:
                take = 1
                out[filled] = self.eod
                d += 1
            filled += take
            pos += take
        return {"text": out}


def _split_parts(names: list[str] | None, cache_dir: str | None, load, text_key: str
                 ) -> list[tuple[Any, np.ndarray]] | None:
    """Every document of the named corpora, or None when no names are given."""
    if not names:
        return None
    corpora = [load(path, text_key) for path in resolve_corpora(names, cache_dir)]
    return [(c, np.arange(len(c))) for c in corpora]


def split_documents(train_data: list[str] | None, valid_data: list[str] | None, test_data: list[str] | None,
                    split: str, seed: int, cache_dir: str | None, load: Callable[[str, str], Any],
                    text_key: str = "text", eval_text_key: str | None = None) -> list[list[tuple[Any, np.ndarray]]]:
    """The (train, valid, test) documents as ``[(corpus, indices)]`` lists; ``load(path, key)`` opens a corpus.

    ``train_data`` (aliases or paths) is split by ``split`` and ``seed`` (``parse_split``);
    ``valid_data``/``test_data``, when given, serve whole as those splits (their text under
    ``eval_text_key``, default ``text_key``) and their share of the train data goes back to training.
    """
    fractions = parse_split(split, bool(valid_data), bool(test_data))
    parts: list[list[tuple[Any, np.ndarray]]] = [[], [], []]
    train_parts = _split_parts(train_data, cache_dir, load, text_key) or []
    assigned = assign_corpus_splits([len(idx) for _, idx in train_parts], fractions, seed)
    for (corpus, idx), which in zip(train_parts, assigned, strict=True):
        for s in range(3):
            parts[s].append((corpus, idx[which == s]))
    for s, names in ((1, valid_data), (2, test_data)):
        given = _split_parts(names, cache_dir, load, eval_text_key or text_key)
        if given is not None:
            parts[s] = given
        elif fractions[s] > 0 and parts[s] and not sum(len(idx) for _, idx in parts[s]):
            total = sum(len(idx) for _, idx in train_parts)
            warn(f"--split {split} gives the {SPLIT_NAMES[s]} split {fractions[s]:.1%} of {total} documents, too few "
                 f"to leave it one: there is no {SPLIT_NAMES[s]} data; give --{SPLIT_NAMES[s]}-data or more documents")
    return parts


def build_gpt2_datasets(train_data: list[str] | None, valid_data: list[str] | None, test_data: list[str] | None,
                        split: str, seq_length: int, tokenizer: Tokenizer, lazy: bool, cache_dir: str | None,
                        seed: int, text_key: str = "text", group: Any = None, eval_text_key: str | None = None,
                        eval_seq_length: int | None = None
                        ) -> tuple[GPT2Dataset | None, GPT2Dataset | None, GPT2Dataset | None]:
    """(train, valid, test) GPT2 datasets; a split without documents is None.

    ``train_data`` (aliases or paths) is split by ``split`` and ``seed``; ``valid_data``/``test_data``,
    when given, serve whole as those splits (text under ``eval_text_key``, default ``text_key``) and
    their share of the train data goes to training. With ``lazy``, each corpus is tokenized once into
    ``cache_dir`` by the first rank of ``group`` (default: every rank) while the others wait; every
    rank of that group must call this.
    """
    loaded: dict[tuple[str, str], InMemoryCorpus | LazyCorpus] = {}

    def load(path: str, key: str) -> InMemoryCorpus | LazyCorpus:
        if (path, key) not in loaded:
            loaded[path, key] = load_corpus(path, tokenizer, lazy, cache_dir, key, group)
        return loaded[path, key]

    parts = split_documents(train_data, valid_data, test_data, split, seed, cache_dir, load, text_key, eval_text_key)
    datasets: list[GPT2Dataset | None] = []
    for name, split_parts, length in zip(SPLIT_NAMES, parts, split_lengths(seq_length, eval_seq_length), strict=True):
        docs = Documents(split_parts)
        dataset = GPT2Dataset(docs, length, tokenizer.eod, name) if len(docs) else None
        if dataset is not None:
            logger.info("%s: %d documents, %d tokens, %d samples of %d tokens", name, len(docs),
                        dataset.num_tokens, len(dataset), length + 1)
        datasets.append(dataset)
    return datasets[0], datasets[1], datasets[2]
