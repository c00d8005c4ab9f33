"""Tokenizers on standard vocabulary files, behind one small interface.

``make_tokenizer(tokenizer_type, vocab_file, merge_file, cache_dir)`` returns an object with
``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size`` (unpadded), ``eod`` (the id
appended after every document), ``name`` and ``identity`` (a string that changes whenever the ids
could change; caches of tokenized corpora are keyed by it).

Files looked up in ``cache_dir`` when no explicit path is given:

- ``GPT2BPETokenizer``: ``gpt2-vocab.json`` and ``gpt2-merges.txt`` (OpenAI GPT-2 format);
- ``BertWordPieceTokenizer``: ``bert-uncased-vocab.txt`` (one WordPiece token per line).

``python tools/fetch_sample_data.py --cache-dir DIR`` writes the GPT-2 pair.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from data_utils.errors import DataError

GPT2_VOCAB_NAME = "gpt2-vocab.json"
GPT2_MERGES_NAME = "gpt2-merges.txt"
BERT_VOCAB_NAME = "bert-uncased-vocab.txt"
GPT2_EOD_TOKEN = "<|endoftext|>"
FETCH_HINT = "python tools/fetch_sample_data.py --cache-dir DIR"


class Tokenizer(ABC):
    """What the data path needs from a tokenizer."""

    name: str

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids in the vocabulary, before any padding for model parallelism."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id, appended after every document."""

    @property
    def identity(self) -> str:
        """A string that differs between tokenizers that could give different ids."""
        return self.name

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text; subclasses may parallelise."""
        return [self.encode(text) for text in texts]


def _hash_files(*paths: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _find_file(explicit: str | None, cache_dir: str | None, default_name: str, what: str,
               tokenizer_type: str, flag: str) -> str:
    """The explicit path if given, else ``cache_dir/default_name``; DataError naming both if absent."""
    tried = []
    if explicit is not None:
        if os.path.isfile(explicit):
            return explicit
        tried.append(explicit)
    elif cache_dir is not None:
        candidate = os.path.join(cache_dir, default_name)
        if os.path.isfile(candidate):
            return candidate
        tried.append(candidate)
    where = ", ".join(tried) if tried else f"nothing (no {flag} and no --cache-dir)"
    raise DataError(
        f"{tokenizer_type} needs its {what}: tried {where}; pass {flag} PATH or run "
        f"`{FETCH_HINT}` and pass --cache-dir DIR"
    )


class _TokenizersBacked(Tokenizer):
    """The shared half of the tokenizers-library backends: ``self._tok`` and ``self._identity``."""

    _tok: Any
    _identity: str

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def identity(self) -> str:
        return self._identity


class GPT2BPETokenizer(_TokenizersBacked):
    """OpenAI GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; same ids as GPT-2."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as exc:  # tokenizers raises a bare Exception on unreadable files
            raise DataError(
                f"cannot read GPT-2 vocabulary {vocab_file} / merges {merge_file}: {exc}; "
                f"regenerate them with `{FETCH_HINT}`"
            ) from exc
        self._tok = HFTokenizer(model)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        self._tok.decoder = decoders.ByteLevel()
        eod = self._tok.token_to_id(GPT2_EOD_TOKEN)
        if eod is None:
            raise DataError(f"{vocab_file} has no {GPT2_EOD_TOKEN!r} token; regenerate it with `{FETCH_HINT}`")
        self._eod = eod
        self._identity = f"{self.name}:{_hash_files(vocab_file, merge_file)}"
        self.vocab_file, self.merge_file = vocab_file, merge_file

    @property
    def eod(self) -> int:
        return self._eod


class BertWordPieceTokenizer(_TokenizersBacked):
    """BERT WordPiece from a ``vocab.txt``; ``eod`` is ``[SEP]``. Special ids: ``cls``, ``sep``, ``mask``, ``pad``."""

    name = "BertWordPieceTokenizer"

    def __init__(self, vocab_file: str, lower_case: bool = True) -> None:
        from tokenizers import BertWordPieceTokenizer as HFWordPiece

        try:
            self._tok = HFWordPiece(vocab_file, lowercase=lower_case)
        except Exception as exc:
            raise DataError(f"cannot read WordPiece vocabulary {vocab_file}: {exc}; pass a BERT vocab.txt") from exc
        ids = {tok: self._tok.token_to_id(tok) for tok in ("[CLS]", "[SEP]", "[MASK]", "[PAD]")}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise DataError(f"{vocab_file} lacks the special tokens {missing}; pass a BERT vocab.txt")
        self.cls, self.sep, self.mask, self.pad = ids["[CLS]"], ids["[SEP]"], ids["[MASK]"], ids["[PAD]"]
        self._identity = f"{self.name}:{'lower' if lower_case else 'cased'}:{_hash_files(vocab_file)}"

    @property
    def eod(self) -> int:
        return self.sep



TOKENIZER_TYPES = ("GPT2BPETokenizer", "BertWordPieceTokenizer")


def make_tokenizer(tokenizer_type: str, vocab_file: str | None = None, merge_file: str | None = None,
                   cache_dir: str | None = None) -> Tokenizer:
    """Build the tokenizer named ``tokenizer_type`` from explicit files or those in ``cache_dir``."""
    if tokenizer_type == "GPT2BPETokenizer":
        vocab = _find_file(vocab_file, cache_dir, GPT2_VOCAB_NAME, "vocabulary", tokenizer_type, "--vocab-file")
        merges = _find_file(merge_file, cache_dir, GPT2_MERGES_NAME, "merges", tokenizer_type, "--merge-file")
        return GPT2BPETokenizer(vocab, merges)
    if tokenizer_type == "BertWordPieceTokenizer":
        vocab = _find_file(vocab_file, cache_dir, BERT_VOCAB_NAME, "vocabulary", tokenizer_type, "--vocab-file")
        return BertWordPieceTokenizer(vocab)
    raise DataError(
        f"unknown tokenizer type {tokenizer_type!r}; known: {', '.join(TOKENIZER_TYPES)} (--tokenizer-type)"
    )
