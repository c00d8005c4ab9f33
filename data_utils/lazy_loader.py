"""Tokenized corpora: in memory, or cached once on disk and memory-mapped (``--lazy-loader``).

Two kinds. A document corpus (GPT2; ``InMemoryCorpus`` and ``LazyCorpus``, same small interface):
``len(corpus)`` documents, ``corpus[i]`` the 1-D numpy token array of document ``i`` (no
end-of-document token), ``corpus.lengths`` (int64 tokens per document) and ``corpus.num_tokens``.
A sentence corpus (BERT; ``SentenceCorpus``, in memory or mapped): each document split into
sentences by ``data_utils.sentences``, each sentence tokenized on its own, empty ones dropped.

The lazy cache of a corpus ``SRC`` lives in ``CACHE_DIR/tokenized/<name>.<key>/``:
``tokens.bin`` (all documents' tokens back to back, uint16 when the vocabulary fits, else uint32),
``offsets.npy`` (int64, document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``) and ``meta.json``.
A sentence cache, ``<name>.sentences.<key>/``, holds ``tokens.bin`` (all sentences back to back),
``sentence_offsets.npy`` and ``doc_offsets.npy`` (document ``d`` is sentences
``[doc_offsets[d], doc_offsets[d+1])``) instead of ``offsets.npy``.
``key`` hashes SRC's real path, size and mtime, the text key and the tokenizer's identity (a hash of
its files' contents; and, for sentences, the splitting mode), so an edited source, another tokenizer or
another splitting mode gets a fresh cache. Every open checks the folder against its ``meta.json``
(``cache_fault``: format, offsets ending at the token count, ``tokens.bin`` exactly that long); a
damaged cache is reported and rebuilt. The folder is built under a temporary name (``atomic``) and
renamed into place, so a crash never leaves a partial cache where a complete one is expected, and the
next run removes the temporaries of killed builds. Caches of older versions of a source are not deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

import mpu
from atomic import remove_orphans, temporary_path
from data_utils.coordination import once_per_group
from data_utils.corpora import batched_texts, delimiter, read_texts
from data_utils.errors import DataError, warn
from data_utils.sentences import split_sentences, splitter_identity
from data_utils.tokenization import Tokenizer
from errors import write_error

CACHE_FORMAT = 1
_CHUNK_DOCS, _CHUNK_CHARS = 1024, 8 << 20  # documents per encode_batch call, at most


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 2**16), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _text_chunks(path: str, text_key: str) -> Iterator[list[str]]:
    """Lists of document texts, in file order, with a progress bar over the file's bytes."""
    from tqdm import tqdm

    with tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, mininterval=1.0,
              desc=f"tokenizing {os.path.basename(path)}", disable=not mpu.is_rank_0()) as bar:
        yield from batched_texts(read_texts(path, text_key, on_bytes=bar.update), _CHUNK_DOCS, _CHUNK_CHARS)


def _tokenized_chunks(path: str, tokenizer: Tokenizer, text_key: str, dtype: np.dtype) -> Iterator[list[np.ndarray]]:
    """Lists of per-document token arrays, in file order."""
    for texts in _text_chunks(path, text_key):
        yield encode_texts(tokenizer, texts, dtype)


def _sentence_chunks(path: str, tokenizer: Tokenizer, text_key: str, dtype: np.dtype,
                     presplit: bool) -> Iterator[tuple[list[np.ndarray], list[int]]]:
    """Per chunk of documents: their sentences' token arrays in order (empty ones dropped), and how many each has."""
    for texts in _text_chunks(path, text_key):
        split = [split_sentences(text, presplit) for text in texts]
        encoded = encode_texts(tokenizer, [s for doc in split for s in doc], dtype)
        sentences: list[np.ndarray] = []
        counts: list[int] = []
        pos = 0
        for doc in split:
            kept = [ids for ids in encoded[pos:pos + len(doc)] if ids.size]
            pos += len(doc)
            sentences.extend(kept)
            counts.append(len(kept))
        yield sentences, counts


def encode_texts(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Each text tokenized as a ``dtype`` array; RuntimeError if the tokenizer returns an id that does not fit."""
    limit = np.iinfo(dtype).max
    docs = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
    if any(d.size and (d.max() > limit or d.min() < 0) for d in docs):
        raise RuntimeError(f"{tokenizer.name} returned an id outside {dtype} (vocab_size={tokenizer.vocab_size})")
    return [d.astype(dtype) for d in docs]


def _map_tokens(folder: str, meta: dict[str, Any]) -> np.ndarray:
    """A cache folder's ``tokens.bin``, memory-mapped read-only with the dtype and length ``meta`` records."""
    dtype, n = np.dtype(meta["dtype"]), int(meta["num_tokens"])
    path = os.path.join(folder, "tokens.bin")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.empty(0, dtype)


class InMemoryCorpus:
    """A list of per-document token arrays held in RAM (the default without ``--lazy-loader``)."""

    def __init__(self, docs: list[np.ndarray], path: str = "") -> None:
        self.docs = docs
        self.path = path
        self.lengths = np.array([len(d) for d in docs], dtype=np.int64)

    @classmethod
    def from_loose_json(cls, path: str, tokenizer: Tokenizer, text_key: str = "text") -> InMemoryCorpus:
        """Tokenize every document of ``path`` (loose json) into memory."""
        dtype = token_dtype(tokenizer.vocab_size)
        return cls([d for chunk in _tokenized_chunks(path, tokenizer, text_key, dtype) for d in chunk], path)

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.docs[i]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


class LazyCorpus:
    """A built cache folder, memory-mapped: reading a document slices the map, nothing more."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            self.meta: dict[str, Any] = json.load(f)
        self.path = self.meta["source"]
        self.offsets = np.load(os.path.join(folder, "offsets.npy"))
        self.lengths = np.diff(self.offsets)
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """The whole flat token array, memory-mapped read-only (opened on first use, per process)."""
        if self._tokens is None:
            self._tokens = _map_tokens(self.folder, self.meta)
        return self._tokens

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        # Data-loader workers reopen the map instead of pickling its contents.
        return {**self.__dict__, "_tokens": None}


def cache_folder(path: str, tokenizer: Tokenizer, cache_dir: str, text_key: str = "text",
                 sentences: str | None = None) -> str:
    """Where the lazy cache of ``path`` under this tokenizer lives (it may not exist yet).

    ``sentences`` (a ``splitter_identity``) names the cache of a sentence corpus split that way.
    """
    stat = os.stat(path)
    ident = {
        "format": CACHE_FORMAT, "source": os.path.realpath(path), "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns, "tokenizer": getattr(tokenizer, "identity", tokenizer.name),
        "text_key": text_key,
    }
    if delimiter(path) is not None:
        ident["delimiter"] = delimiter(path)
    if sentences is not None:
        ident["sentences"] = sentences
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path))
    kind = "" if sentences is None else ".sentences"
    return os.path.join(cache_dir, "tokenized", f"{stem}{kind}.{key}")


def _build_atomically(path: str, folder: str, write: Callable[[str], dict[str, Any]]) -> None:
    """Fill ``folder`` from source ``path``: ``write(tmp)`` writes the files and returns the meta, then one rename.

    ``meta.json`` is written last; a source that changes meanwhile is an error and leaves no cache.
    """
    before = os.stat(path)
    tmp = temporary_path(folder)
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a dead process of ours with the same pid left it
        os.mkdir(tmp)
        meta = write(tmp)
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise DataError(f"{path} changed while it was being tokenized; run again once it is complete")
        if os.path.isdir(folder) and cache_fault(folder):  # damaged: out of the way in one rename, then deleted
            doomed = temporary_path(folder + ".damaged")
            os.rename(folder, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if cache_fault(folder):
                raise
            shutil.rmtree(tmp)  # another process finished the same cache first
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_error(err, folder) if isinstance(err, Exception) else None
        if failure is not None:  # a full disk or a read-only --cache-dir: one line naming the cache
            raise failure from None
        raise


def _offsets(lengths: list[int]) -> np.ndarray:
    """int64 ``[0, cumsum(lengths)...]``."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def build_cache(path: str, tokenizer: Tokenizer, folder: str, text_key: str = "text") -> None:
    """Tokenize ``path`` into ``folder`` (temporary folder, then one rename)."""

    def write(tmp: str) -> dict[str, Any]:
        dtype = token_dtype(tokenizer.vocab_size)
        lengths: list[int] = []
        with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
            for chunk in _tokenized_chunks(path, tokenizer, text_key, dtype):
                if chunk:
                    np.concatenate(chunk).tofile(out)
                lengths.extend(len(d) for d in chunk)
        offsets = _offsets(lengths)
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        return {"source": os.path.realpath(path), "tokenizer": getattr(tokenizer, "identity", tokenizer.name),
                "text_key": text_key, "dtype": dtype.name, "num_docs": len(lengths),
                "num_tokens": int(offsets[-1]), "format": CACHE_FORMAT}

    _build_atomically(path, folder, write)


def _write_sentences(chunks: Iterator[tuple[list[np.ndarray], list[int]]],
                     write_tokens: Callable[[np.ndarray], None]) -> tuple[np.ndarray, np.ndarray]:
    """Pass every chunk's sentence tokens to ``write_tokens``; (sentence_offsets, doc_offsets)."""
    sentence_lengths: list[int] = []
    doc_counts: list[int] = []
    for sentences, counts in chunks:
        if sentences:
            write_tokens(np.concatenate(sentences))
        sentence_lengths.extend(len(s) for s in sentences)
        doc_counts.extend(counts)
    return _offsets(sentence_lengths), _offsets(doc_counts)


class SentenceCorpus:
    """Documents as runs of non-empty tokenized sentences, in RAM or memory-mapped from a cache folder.

    ``tokens`` holds every sentence back to back: sentence ``s`` is
    ``tokens[sentence_offsets[s]:sentence_offsets[s + 1]]`` and document ``d`` is sentences
    ``[doc_offsets[d], doc_offsets[d + 1])``, so any run of a document's sentences is one slice.
    ``lengths`` (tokens) and ``num_sentences`` are per document.
    """

    def __init__(self, tokens: np.ndarray | None, sentence_offsets: np.ndarray, doc_offsets: np.ndarray,
                 path: str = "", folder: str | None = None, meta: dict[str, Any] | None = None) -> None:
        self._tokens, self.folder, self.path, self.meta = tokens, folder, path, meta or {}
        self.sentence_offsets = np.asarray(sentence_offsets, dtype=np.int64)
        self.doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
        self.lengths = np.diff(self.sentence_offsets[self.doc_offsets])
        self.num_sentences = np.diff(self.doc_offsets)

    @classmethod
    def from_documents(cls, docs: Sequence[Sequence[Sequence[int]]], path: str = "") -> SentenceCorpus:
        """A corpus from per-document lists of sentence token ids (empty sentences dropped)."""
        kept = [[np.asarray(s, dtype=np.int64) for s in doc if len(s)] for doc in docs]
        chunks = iter([([s for doc in kept for s in doc], [len(doc) for doc in kept])])
        parts: list[np.ndarray] = []
        sentence_offsets, doc_offsets = _write_sentences(chunks, parts.append)
        return cls(np.concatenate(parts) if parts else np.empty(0, np.int64), sentence_offsets, doc_offsets, path)

    @classmethod
    def from_loose_json(cls, path: str, tokenizer: Tokenizer, text_key: str = "text",
                        presplit: bool = False) -> SentenceCorpus:
        """Split and tokenize every document of ``path`` (loose json) into memory."""
        dtype = token_dtype(tokenizer.vocab_size)
        parts: list[np.ndarray] = []
        chunks = _sentence_chunks(path, tokenizer, text_key, dtype, presplit)
        sentence_offsets, doc_offsets = _write_sentences(chunks, parts.append)
        return cls(np.concatenate(parts) if parts else np.empty(0, dtype), sentence_offsets, doc_offsets, path)

    @classmethod
    def open(cls, folder: str) -> SentenceCorpus:
        """A built cache folder; its tokens are memory-mapped on first use."""
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        sentence_offsets = np.load(os.path.join(folder, "sentence_offsets.npy"))
        doc_offsets = np.load(os.path.join(folder, "doc_offsets.npy"))
        return cls(None, sentence_offsets, doc_offsets, meta["source"], folder, meta)

    @property
    def tokens(self) -> np.ndarray:
        """Every sentence's tokens back to back (memory-mapped read-only for a cache folder)."""
        if self._tokens is None:
            self._tokens = _map_tokens(self.folder, self.meta)
        return self._tokens

    def __len__(self) -> int:
        return len(self.num_sentences)

    def __getitem__(self, d: int) -> list[np.ndarray]:
        """Document ``d`` as a list of sentence token arrays."""
        bounds = self.sentence_offsets[self.doc_offsets[d]:self.doc_offsets[d + 1] + 1]
        return [self.tokens[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    def sentence_lengths(self, d: int) -> np.ndarray:
        """Tokens in each sentence of document ``d``."""
        return np.diff(self.sentence_offsets[self.doc_offsets[d]:self.doc_offsets[d + 1] + 1])

    def span(self, d: int, start: int, stop: int) -> np.ndarray:
        """Tokens of sentences ``[start, stop)`` of document ``d``, as one array."""
        first = int(self.doc_offsets[d])
        return self.tokens[self.sentence_offsets[first + start]:self.sentence_offsets[first + stop]]

    @property
    def num_tokens(self) -> int:
        return int(self.sentence_offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        # Data-loader workers reopen the map instead of pickling its contents.
        return {**self.__dict__, "_tokens": None} if self.folder is not None else self.__dict__


def build_sentence_cache(path: str, tokenizer: Tokenizer, folder: str, text_key: str = "text",
                         presplit: bool = False) -> None:
    """Split and tokenize ``path`` into ``folder``: ``tokens.bin``, ``sentence_offsets.npy``, ``doc_offsets.npy``."""

    def write(tmp: str) -> dict[str, Any]:
        dtype = token_dtype(tokenizer.vocab_size)
        with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
            chunks = _sentence_chunks(path, tokenizer, text_key, dtype, presplit)
            sentence_offsets, doc_offsets = _write_sentences(chunks, lambda tokens: tokens.tofile(out))
        np.save(os.path.join(tmp, "sentence_offsets.npy"), sentence_offsets)
        np.save(os.path.join(tmp, "doc_offsets.npy"), doc_offsets)
        return {"source": os.path.realpath(path), "tokenizer": getattr(tokenizer, "identity", tokenizer.name),
                "text_key": text_key, "sentences": splitter_identity(presplit), "dtype": dtype.name,
                "num_docs": len(doc_offsets) - 1, "num_sentences": len(sentence_offsets) - 1,
                "num_tokens": int(sentence_offsets[-1]), "format": CACHE_FORMAT}

    _build_atomically(path, folder, write)


def _check_source(path: str, lazy: bool, cache_dir: str | None) -> None:
    if not os.path.isfile(path):
        raise DataError(f"cannot open corpus {path}: no such file; check --train-data/--valid-data/--test-data")
    if lazy and cache_dir is None:
        raise DataError("--lazy-loader needs --cache-dir DIR to keep the tokenized corpus in")


def _check_not_empty(corpus: Any, path: str) -> None:
    """A corpus without a single token is a mistake: say which file, not that training data is missing."""
    if corpus.num_tokens == 0:
        what = "holds only blank lines or empty texts" if len(corpus) or os.path.getsize(path) else "is empty"
        raise DataError(f"corpus {path} {what}: there is nothing to tokenize; check the file (and --text-key)")


def cache_fault(folder: str) -> str | None:
    """What is wrong with a cache folder, or None when it is complete and consistent.

    Cheap enough for every open: ``meta.json`` readable and of this format, the offsets files
    present and ending at ``num_tokens``, and ``tokens.bin`` exactly ``num_tokens`` tokens long.
    """
    if not os.path.isdir(folder):
        return "missing"
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        dtype, num_tokens = np.dtype(meta["dtype"]), int(meta["num_tokens"])
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"meta.json is unreadable ({type(err).__name__}: {err})"
    if meta.get("format") != CACHE_FORMAT:
        return f"format {meta.get('format')}, this version writes {CACHE_FORMAT}"
    # Each offsets file and where it must end (None: not recorded, only its presence is checked).
    ends = ({"sentence_offsets.npy": num_tokens, "doc_offsets.npy": meta.get("num_sentences")}
            if "sentences" in meta else {"offsets.npy": num_tokens})
    for name, expected in ends.items():
        try:
            offsets = np.load(os.path.join(folder, name), mmap_mode="r")
        except (OSError, ValueError) as err:
            return f"{name} is unreadable ({err})"
        if offsets.ndim != 1 or not len(offsets):
            return f"{name} is empty"
        if expected is not None and int(offsets[-1]) != int(expected):
            return f"{name} ends at {int(offsets[-1])}, meta.json says {expected}"
    try:
        size = os.path.getsize(os.path.join(folder, "tokens.bin"))
    except OSError:
        return "tokens.bin is missing"
    if size != num_tokens * dtype.itemsize:
        return f"tokens.bin has {size} bytes, meta.json says {num_tokens} {dtype.name} tokens " \
               f"({num_tokens * dtype.itemsize} bytes)"
    return None


def _ensure_built(folder: str, build: Callable[[], None], group: Any) -> None:
    """``folder`` built by the group's first rank (or by any rank that still lacks it).

    Orphaned temporaries of killed builds are removed first; an existing but damaged cache (a
    truncated ``tokens.bin``, a missing file) is reported in one line and rebuilt.
    """
    for path in remove_orphans(os.path.dirname(folder)):
        warn(f"removed {path}, left by a cache build that was killed")

    def ready() -> bool:
        fault = cache_fault(folder)
        if fault is not None and fault != "missing":
            warn(f"token cache {folder} is damaged ({fault}); rebuilding it")
        return fault is None

    once_per_group(ready, build, group)


def load_corpus(path: str, tokenizer: Tokenizer, lazy: bool, cache_dir: str | None = None,
                text_key: str = "text", group: Any = None) -> InMemoryCorpus | LazyCorpus:
    """Tokenized ``path``: the lazy cache (built once, by the group's first rank) or in memory."""
    _check_source(path, lazy, cache_dir)
    if not lazy:
        corpus: InMemoryCorpus | LazyCorpus = InMemoryCorpus.from_loose_json(path, tokenizer, text_key)
    else:
        folder = cache_folder(path, tokenizer, cache_dir, text_key)
        _ensure_built(folder, lambda: build_cache(path, tokenizer, folder, text_key), group)
        corpus = LazyCorpus(folder)
    _check_not_empty(corpus, path)
    return corpus


def load_sentence_corpus(path: str, tokenizer: Tokenizer, lazy: bool, cache_dir: str | None = None,
                         text_key: str = "text", presplit: bool = False, group: Any = None) -> SentenceCorpus:
    """``path`` split into sentences and tokenized: the lazy cache (built once per group) or in memory.

    The cache is keyed by the splitting mode too, so ``presplit`` on and off never share one.
    """
    _check_source(path, lazy, cache_dir)
    if not lazy:
        corpus = SentenceCorpus.from_loose_json(path, tokenizer, text_key, presplit)
    else:
        folder = cache_folder(path, tokenizer, cache_dir, text_key, sentences=splitter_identity(presplit))
        _ensure_built(folder, lambda: build_sentence_cache(path, tokenizer, folder, text_key, presplit), group)
        corpus = SentenceCorpus.open(folder)
    _check_not_empty(corpus, path)
    return corpus
