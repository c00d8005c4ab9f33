"""Training from indexed datasets (``--data-path``): splits, GPT2 windows, BERT pairs and weighted blends.

``--data-path PREFIX`` trains on ``PREFIX.bin``/``PREFIX.idx`` (``data_utils.indexed_dataset``,
Megatron-Core's format, written by ``tools/preprocess_data.py``); ``--data-path 0.7 A 0.3 B`` blends
several, each global sample drawn from a dataset in proportion to its weight (``--data-path A B``:
in proportion to their sizes in tokens).

Per dataset, every document goes to train, valid or test by ``--split`` and ``--seed`` exactly as
for json corpora (``datasets.assign_corpus_splits``). GPT2 reads a split's documents as one token
stream with the end-of-document id after each (a document that already ends in it, written with
``--append-eod``, is not given a second one), cut into windows of ``seq_length + 1``. BERT needs
sentence-level data (``--split-sentences``): its sentence pairs come from the sentence index.

The blend of one split, ``n`` samples long (the samples training or one evaluation will draw), is
built so that any prefix of it holds each dataset in proportion to its weight: the ``c``-th draw
from dataset ``k`` has the key ``(c + 1/2) / w_k`` and draws are taken in key order (ties to the
lower ``k``), so after ``i`` samples dataset ``k`` has given ``w_k * i`` of them, to within one. The
``c``-th draw from dataset ``k`` is its sample ``perm_{k,e}[c mod len_k]`` with ``e = c // len_k``,
``perm_{k,e}`` the argsort of row ``e`` of uniform numbers drawn from a generator seeded by
(``--seed``, split, ``k``) (the identity with ``--no-shuffle``). Nothing depends on ``n`` but
where the blend stops, so a run resumed with more ``--train-iters`` continues exactly, and nothing
depends on the model- or data-parallel layout. The training sampler walks the blend in order (it
is shuffled already).

The document splits and the blend are computed once, by the first rank while the others wait, and
cached as ``.npy`` files in ``index-cache/`` beside the first dataset (``--data-cache-path`` names
another folder; a read-only data folder falls back to ``CACHE_DIR/index-cache``), keyed by
everything they depend on, so a later run on a multi-terabyte corpus starts in seconds: it maps
the cached arrays and reads nothing else whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from atomic import remove_orphans, temporary_path
from data_utils.bert_dataset import BertSentencePairDataset, SentenceDocuments
from data_utils.coordination import once_per_group
from data_utils.datasets import (
    SPLIT_NAMES,
    GPT2Dataset,
    assign_corpus_splits,
    parse_split,
    sample_index,
    split_lengths,
)
from data_utils.errors import DataError, warn
from data_utils.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from data_utils.lazy_loader import SentenceCorpus
from data_utils.tokenization import Tokenizer

logger = logging.getLogger(__name__)
INDEX_FORMAT = 1
CACHE_FOLDER = "index-cache"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_data_path(values: Sequence[str]) -> list[tuple[float | None, str]]:
    """``[(weight, prefix)]`` from ``--data-path PREFIX``, ``W1 PREFIX1 W2 PREFIX2 ...`` or ``PREFIX1 PREFIX2 ...``.

    Weights are normalised to sum to 1; prefixes given without any weight get None (each then weighs
    by its size in tokens, see ``build_indexed_datasets``). A trailing ``.bin`` or ``.idx`` is dropped.
    """
    values = list(values)
    if not values:
        raise DataError("--data-path needs at least one PREFIX (tools/preprocess_data.py writes PREFIX.bin/.idx)")
    if not any(_is_number(v) for v in values):
        return [(None, _strip(v)) for v in values]
    if len(values) % 2:
        raise DataError(f"--data-path {' '.join(values)}: a blend is pairs of WEIGHT PREFIX, and {len(values)} "
                        "values are not pairs (every prefix needs its weight)")
    blend = []
    for weight_text, prefix in zip(values[0::2], values[1::2], strict=True):
        if not _is_number(weight_text):
            raise DataError(f"--data-path: {weight_text!r} should be the weight of {prefix!r} (a blend is pairs of "
                            "WEIGHT PREFIX, e.g. 0.7 A 0.3 B)")
        weight = float(weight_text)
        if not math.isfinite(weight) or weight <= 0:
            raise DataError(f"--data-path: the weight of {prefix!r} is {weight_text}; weights must be positive "
                            "(leave a dataset out instead of giving it 0)")
        blend.append((weight, _strip(prefix)))
    total = sum(w for w, _ in blend)
    return [(w / total, p) for w, p in blend]


def _strip(prefix: str) -> str:
    for suffix in (".bin", ".idx"):
        prefix = prefix.removesuffix(suffix)
    return prefix


def _identity(prefix: str) -> dict[str, Any]:
    """What a prefix's cached indices depend on: its real path, and both files' sizes and mtimes."""
    out: dict[str, Any] = {"prefix": os.path.realpath(prefix)}
    for path in (index_file_path(prefix), data_file_path(prefix)):
        stat = os.stat(path)
        out[os.path.splitext(path)[1]] = [stat.st_size, stat.st_mtime_ns]
    return out


def _key(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def index_cache_dir(prefix: str, data_cache_path: str | None, cache_dir: str | None) -> str:
    """Where the indices of ``prefix`` are cached: ``data_cache_path``, else beside the data when writable."""
    if data_cache_path:
        return data_cache_path
    beside = os.path.join(os.path.dirname(os.path.abspath(prefix)), CACHE_FOLDER)
    if os.access(beside if os.path.isdir(beside) else os.path.dirname(beside), os.W_OK):
        return beside
    if cache_dir is None:
        raise DataError(f"{os.path.dirname(beside)} is read-only; give --data-cache-path DIR for the sample indices")
    return os.path.join(cache_dir, CACHE_FOLDER)


class _CachedArrays:
    """A set of named ``.npy`` arrays in ``folder`` (``NAME.npy`` + ``meta.json``), written once, mapped after."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def ready(self) -> bool:
        return os.path.isfile(os.path.join(self.folder, "meta.json"))

    def write(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Write the arrays, then ``meta.json``, into a temporary folder renamed into place in one step."""
        parent = os.path.dirname(self.folder)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create {parent} for the sample indices ({exc.strerror}); give "
                            "--data-cache-path DIR") from None
        for path in remove_orphans(parent):
            warn(f"removed {path}, left by a sample-index build that was killed")
        tmp = temporary_path(self.folder)
        try:
            os.makedirs(tmp)
            for name, array in arrays.items():
                np.save(os.path.join(tmp, name + ".npy"), array)
            with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                json.dump({**meta, "format": INDEX_FORMAT}, f)
            if not self.ready():  # else another process (another node) finished the same build first
                if os.path.isdir(self.folder):  # a folder without meta.json: an interrupted copy; replace it
                    shutil.rmtree(self.folder)
                os.rename(tmp, self.folder)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)

    def load(self, name: str) -> np.ndarray:
        return np.load(os.path.join(self.folder, name + ".npy"), mmap_mode="r")

    def meta(self) -> dict[str, Any]:
        with open(os.path.join(self.folder, "meta.json"), encoding="utf-8") as f:
            return json.load(f)


def _build_once(cache: _CachedArrays, build: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]],
                group: Any) -> None:
    """``build()`` on the group's first rank unless cached, the others waiting (``coordination.once_per_group``)."""
    once_per_group(cache.ready, lambda: cache.write(*build()), group, what=f"the sample index {cache.folder}")


def _document_lengths(ds: IndexedDataset) -> np.ndarray:
    """Tokens per document (int64), vectorised over the sequence index."""
    ends = np.concatenate([[0], np.cumsum(ds.sequence_lengths, dtype=np.int64)])
    return ends[ds.document_indices[1:]] - ends[ds.document_indices[:-1]]


def _ends_with(ds: IndexedDataset, lengths: np.ndarray, token: int, sample: int = 4096) -> np.ndarray:
    """Whether each document's last token is ``token`` (False for empty documents).

    Up to ``sample`` evenly spaced documents (the first and last among them) are read first: when all
    or none end in ``token`` (data written with or without ``--append-eod``) that answer holds for
    every document, so a first build reads a few thousand pages, not the whole ``.bin``. Only a mixed
    sample reads every document's last token.
    """
    has = np.flatnonzero(lengths > 0)
    out = np.zeros(len(lengths), dtype=bool)
    if not len(has):
        return out

    def last_tokens(docs: np.ndarray) -> np.ndarray:
        last_seq = ds.document_indices[docs + 1] - 1
        positions = ds.sequence_pointers[last_seq] // ds.dtype.itemsize + ds.sequence_lengths[last_seq] - 1
        return ds.tokens[positions]

    probe = has[np.unique(np.linspace(0, len(has) - 1, min(sample, len(has))).astype(np.int64))]
    ends = last_tokens(probe) == token
    if ends.all() or not ends.any():
        out[has] = bool(ends[0])
    else:
        out[has] = last_tokens(has) == token
    return out


def _check_vocabulary(ds: IndexedDataset, vocab_size: int) -> None:
    """DataError when the first tokens of ``ds`` hold an id outside the tokenizer's vocabulary."""
    head = np.asarray(ds.tokens[:1 << 20])
    if len(head) and int(head.max()) >= vocab_size:
        raise DataError(f"{ds.prefix}: holds token id {int(head.max())}, beyond the tokenizer's {vocab_size} ids: it "
                        "was prepared with another vocabulary; pass the --tokenizer-type/--vocab-file it was made with")


class IndexedDocuments:
    """The documents of one split of an indexed dataset: ``docs[i]`` tokens, ``lengths``, from cached arrays.

    A document ending in the end-of-document id is shown without it (the GPT2 stream adds one).
    """

    def __init__(self, ds: IndexedDataset, doc_ids: np.ndarray, lengths: np.ndarray) -> None:
        self.ds, self.doc_ids, self.lengths = ds, doc_ids, lengths

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.ds.document(int(self.doc_ids[i]))[:int(self.lengths[i])]


class IndexedGPT2Dataset(GPT2Dataset):
    """``GPT2Dataset`` over a split of an indexed dataset, its cumulative lengths read from the cache."""

    def __init__(self, docs: IndexedDocuments, ends: np.ndarray, seq_length: int, eod: int, vocab_size: int,
                 name: str) -> None:
        super().__init__(docs, seq_length, eod, name, lengths=docs.lengths, ends=ends)
        self.vocab_size = vocab_size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        sample = super().__getitem__(i)
        top = int(sample["text"].max())
        if top >= self.vocab_size:
            raise DataError(f"{self.docs.ds.prefix}: holds token id {top}, beyond the tokenizer's {self.vocab_size} "
                            "ids: it was prepared with another vocabulary")
        return sample


class IndexedSentenceCorpus(SentenceCorpus):
    """A sentence-level indexed dataset (``--split-sentences``) seen as a ``SentenceCorpus`` for BERT."""

    def __init__(self, ds: IndexedDataset) -> None:
        offsets = np.append(ds.sequence_pointers // ds.dtype.itemsize, ds.num_tokens)
        super().__init__(None, offsets, np.asarray(ds.document_indices), path=ds.prefix)
        self.ds = ds

    @property
    def tokens(self) -> np.ndarray:
        return self.ds.tokens

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__


class BlendedDataset(torch.utils.data.Dataset):
    """``num_samples`` samples drawn from ``datasets`` by ``weights`` (see the module docstring).

    ``dataset_index[i]`` and ``sample_index[i]`` say which sample of which dataset sample ``i`` is.
    ``presampled`` tells the training loop to read it in order: the order is already shuffled.
    """

    presampled = True

    def __init__(self, datasets: Sequence[Any], dataset_index: np.ndarray, sample_index: np.ndarray,
                 name: str = "train") -> None:
        self.datasets, self.dataset_index, self.sample_index, self.name = list(datasets), dataset_index, \
            sample_index, name

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = sample_index(i, len(self))
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]


def blend_indices(weights: Sequence[float], sizes: Sequence[int], num_samples: int, seed: int, split: int,
                  shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(dataset index, sample index) arrays of a blend of ``num_samples`` (see the module docstring)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    k_count = len(w)
    draws = [np.arange(int(math.ceil((num_samples + k_count) * wk)) + 1, dtype=np.int64) for wk in w]
    keys = np.concatenate([(c + 0.5) / wk for c, wk in zip(draws, w, strict=True)])
    source = np.concatenate([np.full(len(c), k, dtype=np.int16) for k, c in enumerate(draws)])
    order = np.lexsort((source, keys))[:num_samples]
    dataset_index = source[order]
    draw = np.concatenate(draws)[order]
    samples = np.empty(num_samples, dtype=np.int64)
    for k, size in enumerate(sizes):
        mine = np.flatnonzero(dataset_index == k)
        if not len(mine):
            continue
        epochs, offsets = np.divmod(draw[mine], size)
        if shuffle:
            # Row e of one seeded stream orders epoch e; a longer blend only adds rows.
            keys = np.random.default_rng([seed, split, k]).random((int(epochs[-1]) + 1, size))
            samples[mine] = np.argsort(keys, axis=1, kind="stable")[epochs, offsets]
        else:
            samples[mine] = offsets
    return dataset_index, samples


def _split_documents(prefix: str, ds: IndexedDataset, fractions: Sequence[float], seed: int, eod: int | None,
                     root: str, group: Any) -> _CachedArrays:
    """Cached per-split document ids (and, for GPT2 with ``eod``, lengths and stream ends) of one dataset."""
    ident = {**_identity(prefix), "fractions": list(fractions), "seed": seed, "eod": eod}
    cache = _CachedArrays(os.path.join(root, f"{os.path.basename(prefix)}.splits.{_key(ident)}"))

    def build() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        which = assign_corpus_splits([ds.num_documents], fractions, seed)[0]
        arrays: dict[str, np.ndarray] = {}
        lengths = _document_lengths(ds)
        if eod is not None:
            lengths = lengths - _ends_with(ds, lengths, eod)
        for s, name in enumerate(SPLIT_NAMES):
            ids = np.flatnonzero(which == s).astype(np.int64)
            arrays[f"{name}_docs"] = ids
            if eod is not None:
                arrays[f"{name}_lengths"] = lengths[ids]
                arrays[f"{name}_ends"] = np.cumsum(lengths[ids] + 1)
        return arrays, ident

    _build_once(cache, build, group)
    return cache


def build_indexed_datasets(data_path: Sequence[str], split: str, seed: int, num_samples: Sequence[int],
                           make_dataset: Callable[[int, int, str, IndexedDataset, _CachedArrays], Any],
                           tokenizer: Tokenizer, *, gpt2: bool, valid_given: bool = False, test_given: bool = False,
                           shuffle: bool = True, data_cache_path: str | None = None, cache_dir: str | None = None,
                           group: Any = None) -> list[BlendedDataset | None]:
    """(train, valid, test) blends over ``--data-path``; None for a split without documents or samples.

    ``num_samples[s]`` is how many samples split ``s`` needs (0: none). ``make_dataset(split, k, name,
    ds, cache)`` builds dataset ``k``'s split from its cached document ids. A split given as
    ``--valid-data``/``--test-data`` (``valid_given``, ``test_given``) takes nothing here.
    """
    blend = parse_data_path(data_path)
    if blend[0][0] is None:  # prefixes without weights: each in proportion to its tokens
        sizes = [IndexedDataset(prefix).num_tokens for _, prefix in blend]
        blend = [(size / max(1, sum(sizes)), prefix) for size, (_, prefix) in zip(sizes, blend, strict=True)]
    fractions = parse_split(split, valid_given, test_given)
    root = index_cache_dir(blend[0][1], data_cache_path, cache_dir)
    opened = []
    for weight, prefix in blend:
        ds = IndexedDataset(prefix)
        _check_vocabulary(ds, tokenizer.vocab_size)
        if not gpt2 and len(ds) == ds.num_documents and ds.num_documents > 0:
            raise DataError(f"{prefix}: one sequence per document, but BERT's sentence pairs need sentence-level data; "
                            "run tools/preprocess_data.py with --split-sentences")
        cache = _split_documents(prefix, ds, fractions, seed, tokenizer.eod if gpt2 else None, root, group)
        opened.append((weight, prefix, ds, cache))
    out: list[BlendedDataset | None] = []
    for s, name in enumerate(SPLIT_NAMES):
        members, weights = [], []
        for k, (weight, _prefix, ds, cache) in enumerate(opened):
            if fractions[s] > 0 and len(cache.load(f"{name}_docs")):
                members.append(make_dataset(s, k, name, ds, cache))
                weights.append(weight)
        if not members or num_samples[s] <= 0:
            out.append(None)
            continue
        ident = {"members": [cache.folder for *_, cache in opened], "sizes": [len(m) for m in members],
                 "weights": weights, "split": name, "samples": int(num_samples[s]), "seed": seed, "shuffle": shuffle,
                 "kind": type(members[0]).__name__}
        index = _CachedArrays(os.path.join(root, f"{os.path.basename(blend[0][1])}.blend.{name}.{_key(ident)}"))

        def build(members=members, weights=weights, s=s, ident=ident) -> tuple[dict[str, np.ndarray], dict]:
            d, i = blend_indices(weights, [len(m) for m in members], int(num_samples[s]), seed, s, shuffle)
            return {"dataset_index": d, "sample_index": i}, ident

        _build_once(index, build, group)
        dataset = BlendedDataset(members, index.load("dataset_index"), index.load("sample_index"), name)
        logger.info("%s: %d samples blended from %s", name, len(dataset),
                    ", ".join(f"{w:.3f} {os.path.basename(p)}" for w, p, *_ in opened))
        out.append(dataset)
    return out


def gpt2_member(seq_length: int, tokenizer: Tokenizer, eval_seq_length: int | None = None
                ) -> Callable[..., IndexedGPT2Dataset]:
    """``make_dataset`` for GPT2 windows over one dataset's split (validation and test windows of
    ``eval_seq_length`` when given)."""
    lengths = split_lengths(seq_length, eval_seq_length)

    def make(split: int, k: int, name: str, ds: IndexedDataset, cache: _CachedArrays) -> IndexedGPT2Dataset:
        docs = IndexedDocuments(ds, cache.load(f"{name}_docs"), cache.load(f"{name}_lengths"))
        return IndexedGPT2Dataset(docs, cache.load(f"{name}_ends"), lengths[split], tokenizer.eod, tokenizer.vocab_size,
                                  f"{name} split of {os.path.basename(ds.prefix)}")

    return make


def bert_member(seq_length: int, max_preds_per_seq: int | None, tokenizer: Tokenizer, seed: int,
                eval_seq_length: int | None = None, eval_max_preds_per_seq: int | None = None) -> Callable[..., Any]:
    """``make_dataset`` for BERT sentence pairs over one sentence-level dataset's split (stream ``3 k + split``;
    validation and test with the ``eval_`` lengths when given)."""
    lengths = split_lengths(seq_length, eval_seq_length)
    max_preds = split_lengths(max_preds_per_seq, eval_max_preds_per_seq)

    def make(split: int, k: int, name: str, ds: IndexedDataset, cache: _CachedArrays) -> Any:
        docs = SentenceDocuments([(IndexedSentenceCorpus(ds), np.asarray(cache.load(f"{name}_docs")))])
        return BertSentencePairDataset(docs, lengths[split], max_preds[split], tokenizer, seed, 3 * k + split,
                                       f"{name} split of {os.path.basename(ds.prefix)}")

    return make
