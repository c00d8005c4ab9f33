"""Tokenized corpora: in memory, or cached once on disk and memory-mapped (``--lazy-loader``).

Both classes expose the same small interface: ``len(corpus)`` documents, ``corpus[i]`` the 1-D
numpy token array of document ``i`` (no end-of-document token), ``corpus.lengths`` (int64 tokens
per document) and ``corpus.num_tokens``.

The lazy cache of a corpus ``SRC`` lives in ``CACHE_DIR/tokenized/<name>.<key>/``:
``tokens.bin`` (all documents' tokens back to back, uint16 when the vocabulary fits, else uint32),
``offsets.npy`` (int64, document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``) and ``meta.json``.
``key`` hashes SRC's real path, size and mtime, the text key and the tokenizer's identity, so an
edited source or another tokenizer gets a fresh cache. The folder is built under a temporary name
and renamed into place, so a crash never leaves a partial cache where a complete one is expected.
Caches of older versions of a source are not deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from data_utils.corpora import read_loose_json
from data_utils.errors import DataError
from data_utils.tokenization import Tokenizer

CACHE_FORMAT = 1
_CHUNK_DOCS, _CHUNK_CHARS = 1024, 8 << 20  # documents per encode_batch call, at most


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 2**16), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _is_first_rank() -> bool:
    """True without torch.distributed or on global rank 0 (only it draws progress bars)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _tokenized_chunks(path: str, tokenizer: Tokenizer, text_key: str, dtype: np.dtype) -> Iterator[list[np.ndarray]]:
    """Lists of per-document token arrays, in file order, with a progress bar over the file's bytes."""
    from tqdm import tqdm

    limit = np.iinfo(dtype).max
    with tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, mininterval=1.0,
              desc=f"tokenizing {os.path.basename(path)}", disable=not _is_first_rank()) as bar:
        texts: list[str] = []
        chars = 0
        for text in read_loose_json(path, text_key, on_bytes=bar.update):
            texts.append(text)
            chars += len(text)
            if len(texts) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
                yield _encode(tokenizer, texts, dtype, limit)
                texts, chars = [], 0
        if texts:
            yield _encode(tokenizer, texts, dtype, limit)


def _encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype, limit: int) -> list[np.ndarray]:
    docs = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
    if any(d.size and (d.max() > limit or d.min() < 0) for d in docs):
        raise RuntimeError(f"{tokenizer.name} returned an id outside {dtype} (vocab_size={tokenizer.vocab_size})")
    return [d.astype(dtype) for d in docs]


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
            dtype, n = np.dtype(self.meta["dtype"]), int(self.meta["num_tokens"])
            path = os.path.join(self.folder, "tokens.bin")
            self._tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.empty(0, dtype)
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


def cache_folder(path: str, tokenizer: Tokenizer, cache_dir: str, text_key: str = "text") -> str:
    """Where the lazy cache of ``path`` under this tokenizer lives (it may not exist yet)."""
    stat = os.stat(path)
    ident = {
        "format": CACHE_FORMAT, "source": os.path.realpath(path), "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns, "tokenizer": getattr(tokenizer, "identity", tokenizer.name),
        "text_key": text_key,
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path))
    return os.path.join(cache_dir, "tokenized", f"{stem}.{key}")


def build_cache(path: str, tokenizer: Tokenizer, folder: str, text_key: str = "text") -> None:
    """Tokenize ``path`` into ``folder`` (temporary folder, then one rename)."""
    before = os.stat(path)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", suffix=".tmp", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a shared cache should be readable by all
        dtype = token_dtype(tokenizer.vocab_size)
        lengths: list[int] = []
        with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
            for chunk in _tokenized_chunks(path, tokenizer, text_key, dtype):
                if chunk:
                    np.concatenate(chunk).tofile(out)
                lengths.extend(len(d) for d in chunk)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        meta = {"source": os.path.realpath(path), "tokenizer": getattr(tokenizer, "identity", tokenizer.name),
                "text_key": text_key, "dtype": dtype.name, "num_docs": len(lengths),
                "num_tokens": int(offsets[-1]), "format": CACHE_FORMAT}
        with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise DataError(f"{path} changed while it was being tokenized; run again once it is complete")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "meta.json")):
                raise
            shutil.rmtree(tmp)  # another process finished the same cache first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _once_per_group(ready: Callable[[], bool], build: Callable[[], None], group: Any = None) -> None:
    """Run ``build`` on the group's first rank while the others wait; then on any rank still not ready.

    Without torch.distributed (or in a group of one) it just builds when not ready. The second
    chance covers cache folders that are not shared between nodes.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        if not ready():
            build()
        return
    first = dist.get_global_rank(group, 0) if group is not None else 0
    failure: list[Any] = [None]
    if dist.get_rank() == first and not ready():
        try:
            build()
        except Exception as exc:
            failure = [(type(exc) is DataError, str(exc))]
            dist.broadcast_object_list(failure, src=first, group=group)
            raise
    dist.broadcast_object_list(failure, src=first, group=group)  # doubles as the barrier
    if failure[0] is not None:
        is_data_error, message = failure[0]
        raise (DataError if is_data_error else RuntimeError)(f"rank {first} failed to build the cache: {message}")
    if not ready():
        build()


def load_corpus(path: str, tokenizer: Tokenizer, lazy: bool, cache_dir: str | None = None,
                text_key: str = "text", group: Any = None) -> InMemoryCorpus | LazyCorpus:
    """Tokenized ``path``: the lazy cache (built once, by the group's first rank) or in memory."""
    if not os.path.isfile(path):
        raise DataError(f"cannot open corpus {path}: no such file; check --train-data/--valid-data/--test-data")
    if not lazy:
        return InMemoryCorpus.from_loose_json(path, tokenizer, text_key)
    if cache_dir is None:
        raise DataError("--lazy-loader needs --cache-dir DIR to keep the tokenized corpus in")
    folder = cache_folder(path, tokenizer, cache_dir, text_key)
    ready = lambda: os.path.isfile(os.path.join(folder, "meta.json"))
    _once_per_group(ready, lambda: build_cache(path, tokenizer, folder, text_key), group)
    return LazyCorpus(folder)
