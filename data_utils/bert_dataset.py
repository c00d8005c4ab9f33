"""BERT's sentence pairs over sentence corpora: the Megatron-LM 2019 / Google BERT recipe.

Sample ``i`` is a pure function of (``seed``, ``stream``, ``i``): every draw below comes, in the
order written, from ``np.random.default_rng([stream, seed mod 2**64, i])``, so a resumed run and
every data-loader worker see the same samples. ``build_bert_datasets`` gives train, valid and test
streams 0, 1 and 2. With ``budget = seq_length - 3`` (the room left by ``[CLS]`` and two ``[SEP]``):

1. Target: with probability 0.01 the budget becomes a uniform integer in ``[2, seq_length - 3]``
   (Google's short ``target_seq_length``).
2. Segment A: a document ``d`` drawn with probability proportional to its length in tokens
   (documents without sentences never), a start sentence ``s`` uniform among its ``n_d`` sentences.
   The chunk is sentences ``s, s+1, ...`` up to and including the first at which their total
   reaches the budget, or to the end of ``d``. A is the chunk's first ``k`` sentences, ``k``
   uniform in ``[1, len(chunk) - 1]`` (``k = 1`` for a one-sentence chunk).
3. Segment B: when the chunk has one sentence, and otherwise with probability 0.5, B is random
   (``is_random = 1``): a document other than ``d``, uniform among those with sentences, from a
   start sentence uniform among its own, taking sentences until B holds ``budget - len(A)`` tokens
   (at least one sentence) or the document ends. Otherwise (``is_random = 0``) B is the rest of
   the chunk, the sentences that follow A. A split with a single document has no other document:
   there its start sentence is uniform in ``[0, n_d - 1)``, its chunk is extended to two sentences
   when the first fills the budget, and B always follows A (``is_random = 0``, no coin drawn); that
   document needs two sentences.
4. Truncation (Google's ``truncate_seq_pair``): while ``len(A) + len(B) > budget``, drop one token
   of the longer segment (B on a tie) from its front or back by a fair coin. The lengths this
   leaves are computed directly, and the tokens dropped from each segment's front are drawn as
   Binomial(dropped, 1/2), A's then B's: the same distribution. Both segments stay non-empty.
5. Layout: ``[CLS] A [SEP] B [SEP]`` then ``[PAD]`` up to ``seq_length``. ``types`` is 0 for CLS,
   A and the first SEP, 1 for B and the second SEP, 0 on padding; ``pad_mask`` is 1 on padding.
6. Masking (Google's ``create_masked_lm_predictions``, as Megatron-LM 2019): with ``n = len(A) +
   len(B) + 3``, the whole sequence with ``[CLS]`` and both ``[SEP]`` but without padding, ``num =
   max(1, round(0.15 * n))`` (Python's ``round``, halves to even), at most ``max_preds_per_seq``
   when that is not None, positions drawn uniformly without replacement among A's and B's tokens
   (never CLS, SEP or PAD). Then ``num`` uniform ``u`` and ``num`` random ids, each uniform over
   the text ids: ``[0, vocab_size)`` less ``[PAD]``, ``[CLS]``, ``[SEP]`` and ``[MASK]``, the ids no
   text encodes to. A position with ``u < 0.8`` becomes ``[MASK]``, ``0.8 <= u < 0.9`` its random
   id, else it is unchanged. ``mask`` is 1 at those positions, ``mask_labels`` holds their
   original ids there and -1 elsewhere.

``len(dataset)`` is ``max(1, num_tokens // (seq_length - 3))``: a sample takes about a budget of
tokens from A's document, so an epoch reads the split's tokens about once.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from data_utils.datasets import SPLIT_NAMES, Documents, sample_index, split_documents, split_lengths
from data_utils.errors import DataError
from data_utils.lazy_loader import SentenceCorpus, load_sentence_corpus
from data_utils.tokenization import Tokenizer

logger = logging.getLogger(__name__)
SHORT_SEQ_PROB = 0.01
MASKED_LM_PROB = 0.15
_MASK64 = (1 << 64) - 1


class SentenceDocuments(Documents):
    """Chosen documents of several sentence corpora as one sequence: ``parts`` is ``[(corpus, indices)]``."""

    def __init__(self, parts: list[tuple[SentenceCorpus, np.ndarray]]) -> None:
        super().__init__(parts)
        self.num_sentences = (np.concatenate([corpus.num_sentences[idx] for corpus, idx in self.parts])
                              if self.parts else np.zeros(0, dtype=np.int64)).astype(np.int64)

    def sentence_lengths(self, i: int) -> np.ndarray:
        """Tokens in each sentence of document ``i``."""
        corpus, j = self.locate(i)
        return corpus.sentence_lengths(j)

    def span(self, i: int, start: int, stop: int) -> np.ndarray:
        """Tokens of sentences ``[start, stop)`` of document ``i``, as one array."""
        corpus, j = self.locate(i)
        return corpus.span(j, start, stop)


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """``{'cls', 'sep', 'mask', 'pad'}`` ids of a BERT tokenizer; DataError naming what is missing."""
    ids = {key: getattr(tokenizer, key, None) for key in ("cls", "sep", "mask", "pad")}
    missing = [f"[{key.upper()}]" for key, value in ids.items() if value is None]
    if missing:
        raise DataError(
            f"{tokenizer.name} has no {', '.join(missing)} id; BERT sentence pairs need a tokenizer with "
            "[CLS], [SEP], [MASK] and [PAD] (e.g. --tokenizer-type BertWordPieceTokenizer)"
        )
    return {key: int(value) for key, value in ids.items()}


def check_bert_lengths(seq_length: int, max_preds_per_seq: int | None) -> None:
    """DataError unless ``[CLS] A [SEP] B [SEP]`` fits and at least one token may be predicted."""
    if seq_length < 5:
        raise DataError(f"--seq-length {seq_length} leaves no room for [CLS] A [SEP] B [SEP]; use at least 5")
    if max_preds_per_seq is not None and max_preds_per_seq < 1:
        raise DataError(f"--max-preds-per-seq must be at least 1, got {max_preds_per_seq}")


def trimmed_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Lengths left by dropping one token of the longer segment (B on a tie) until the sum fits ``budget``."""
    if len_a + len_b <= budget:
        return len_a, len_b
    shorter = min(len_a, len_b)
    if budget - shorter >= shorter:  # only the longer one is cut
        return (budget - shorter, len_b) if len_a > len_b else (len_a, budget - shorter)
    return (budget + 1) // 2, budget // 2  # both cut down to equal, then alternately (B first)


def _sentences_to_fill(lengths: np.ndarray, target: int) -> int:
    """Leading sentences up to and including the first at which their total reaches ``target`` (or all)."""
    return min(int(np.searchsorted(np.cumsum(lengths), target, side="left")) + 1, len(lengths))


class BertSentencePairDataset(torch.utils.data.Dataset):
    """Masked sentence pairs, sampled as the module docstring states; each sample a dict of int64 arrays.

    ``docs`` is a ``SentenceCorpus`` or ``SentenceDocuments`` (anything with ``lengths``,
    ``num_sentences``, ``sentence_lengths(i)`` and ``span(i, start, stop)``). Keys: ``text``,
    ``types``, ``mask``, ``mask_labels``, ``pad_mask`` of shape ``(seq_length,)`` and ``is_random``
    of shape ``()``.
    """

    def __init__(self, docs: Any, seq_length: int, max_preds_per_seq: int | None, tokenizer: Tokenizer,
                 seed: int, stream: int = 0, name: str = "train") -> None:
        check_bert_lengths(seq_length, max_preds_per_seq)
        ids = special_ids(tokenizer)
        self.cls, self.sep, self.mask_id, self.pad = ids["cls"], ids["sep"], ids["mask"], ids["pad"]
        self.vocab_size = int(tokenizer.vocab_size)
        self.text_ids = np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64), list(ids.values()))
        self.docs, self.seq_length, self.max_preds_per_seq = docs, seq_length, max_preds_per_seq
        self.seed, self.stream, self.name = seed & _MASK64, stream, name
        self.num_sentences = np.asarray(docs.num_sentences, dtype=np.int64)
        self.cum_tokens = np.cumsum(np.asarray(docs.lengths, dtype=np.int64))
        self.num_tokens = int(self.cum_tokens[-1]) if len(self.cum_tokens) else 0
        self.eligible = np.flatnonzero(self.num_sentences > 0)  # documents with at least one sentence
        if len(self.eligible) == 0:
            raise DataError(
                f"the {name} split has {len(self.num_sentences)} documents but not one sentence in them; check "
                f"--text-key, use more data or give the {name} split a larger share in --split"
            )
        self.single_document = len(self.eligible) == 1
        if self.single_document and self.num_sentences[self.eligible[0]] < 2:
            raise DataError(
                f"the {name} split has a single document with a single sentence, and a sentence pair needs two; "
                f"use more data or give the {name} split a larger share in --split"
            )
        self.num_samples = max(1, self.num_tokens // (seq_length - 3))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = sample_index(i, self.num_samples)
        rng = np.random.default_rng([self.stream, self.seed, i])
        budget = self.seq_length - 3
        if rng.random() < SHORT_SEQ_PROB:
            budget = int(rng.integers(2, budget + 1))
        a, b, is_random = self._pair(rng, budget)
        keep_a, keep_b = trimmed_lengths(len(a), len(b), budget)
        front_a = int(rng.binomial(len(a) - keep_a, 0.5))
        front_b = int(rng.binomial(len(b) - keep_b, 0.5))
        return self._sample(a[front_a:front_a + keep_a], b[front_b:front_b + keep_b], is_random, rng)

    def _pair(self, rng: np.random.Generator, budget: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Untruncated segments A and B and ``is_random`` (steps 2 and 3)."""
        doc = int(np.searchsorted(self.cum_tokens, rng.integers(self.num_tokens), side="right"))
        n = int(self.num_sentences[doc])
        start = int(rng.integers(n - 1 if self.single_document else n))
        lengths = self.docs.sentence_lengths(doc)[start:start + budget]  # sentences hold >= 1 token each
        chunk = _sentences_to_fill(lengths, budget)
        if self.single_document:
            chunk = max(chunk, 2)
        num_a = int(rng.integers(1, chunk)) if chunk >= 2 else 1
        a = self.docs.span(doc, start, start + num_a)
        if chunk == 1 or (not self.single_document and rng.random() < 0.5):
            return a, self._random_b(rng, doc, max(1, budget - len(a)), budget), 1
        return a, self.docs.span(doc, start + num_a, start + chunk), 0

    def _random_b(self, rng: np.random.Generator, doc_a: int, target: int, budget: int) -> np.ndarray:
        """Segment B from another document: sentences from a random one until ``target`` tokens or its end."""
        pick = int(rng.integers(len(self.eligible) - 1))
        pick += pick >= int(np.searchsorted(self.eligible, doc_a))  # skip A's own document
        doc = int(self.eligible[pick])
        start = int(rng.integers(self.num_sentences[doc]))
        lengths = self.docs.sentence_lengths(doc)[start:start + budget]
        return self.docs.span(doc, start, start + _sentences_to_fill(lengths, target))

    def _sample(self, a: np.ndarray, b: np.ndarray, is_random: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Steps 5 and 6: layout, padding and masking."""
        la, lb, seq = len(a), len(b), self.seq_length
        text = np.full(seq, self.pad, dtype=np.int64)
        text[0], text[1:1 + la], text[1 + la] = self.cls, a, self.sep
        text[2 + la:2 + la + lb], text[2 + la + lb] = b, self.sep
        types = np.zeros(seq, dtype=np.int64)
        types[2 + la:3 + la + lb] = 1
        pad_mask = np.zeros(seq, dtype=np.int64)
        pad_mask[3 + la + lb:] = 1

        num = max(1, round(MASKED_LM_PROB * (la + lb + 3)))  # over [CLS] A [SEP] B [SEP], as Google counts
        if self.max_preds_per_seq is not None:
            num = min(num, self.max_preds_per_seq)
        candidates = np.concatenate([np.arange(1, 1 + la), np.arange(2 + la, 2 + la + lb)])
        positions = rng.choice(candidates, size=num, replace=False)
        u, random_ids = rng.random(num), self.text_ids[rng.integers(0, len(self.text_ids), size=num)]
        mask, mask_labels = np.zeros(seq, dtype=np.int64), np.full(seq, -1, dtype=np.int64)
        mask[positions], mask_labels[positions] = 1, text[positions]
        text[positions[u < 0.8]] = self.mask_id
        swap = (u >= 0.8) & (u < 0.9)
        text[positions[swap]] = random_ids[swap]
        return {"text": text, "types": types, "is_random": np.array(is_random, dtype=np.int64), "mask": mask,
                "mask_labels": mask_labels, "pad_mask": pad_mask}


def build_bert_datasets(train_data: list[str] | None, valid_data: list[str] | None, test_data: list[str] | None,
                        split: str, seq_length: int, max_preds_per_seq: int | None, tokenizer: Tokenizer,
                        lazy: bool, cache_dir: str | None, seed: int, text_key: str = "text",
                        presplit_sentences: bool = False, group: Any = None, eval_text_key: str | None = None,
                        eval_seq_length: int | None = None, eval_max_preds_per_seq: int | None = None
                        ) -> tuple[BertSentencePairDataset | None, BertSentencePairDataset | None,
                                   BertSentencePairDataset | None]:
    """(train, valid, test) sentence-pair datasets; a split without documents is None.

    Documents go to splits exactly as in ``build_gpt2_datasets`` (``split`` and ``seed`` over the
    train data; ``valid_data``/``test_data``, when given, replace those shares, their text under
    ``eval_text_key``, default ``text_key``). Each corpus is split
    into sentences (``presplit_sentences``: one per line, else Punkt) and tokenized, with ``lazy``
    once into ``cache_dir`` by the first rank of ``group`` while the others wait; every rank of that
    group must call this. The splits sample streams 0, 1 and 2 of ``seed``; valid and test are as
    deterministic as train.
    """
    lengths = split_lengths(seq_length, eval_seq_length)
    max_preds = split_lengths(max_preds_per_seq, eval_max_preds_per_seq)
    for length, preds in zip(lengths, max_preds, strict=True):
        check_bert_lengths(length, preds)
    special_ids(tokenizer)  # fail before tokenizing anything
    loaded: dict[tuple[str, str], SentenceCorpus] = {}

    def load(path: str, key: str) -> SentenceCorpus:
        if (path, key) not in loaded:
            loaded[path, key] = load_sentence_corpus(path, tokenizer, lazy, cache_dir, key, presplit_sentences, group)
        return loaded[path, key]

    parts = split_documents(train_data, valid_data, test_data, split, seed, cache_dir, load, text_key, eval_text_key)
    datasets: list[BertSentencePairDataset | None] = []
    for stream, (name, split_parts) in enumerate(zip(SPLIT_NAMES, parts, strict=True)):
        docs = SentenceDocuments(split_parts)
        dataset = (BertSentencePairDataset(docs, lengths[stream], max_preds[stream], tokenizer, seed, stream, name)
                   if len(docs) else None)
        if dataset is not None:
            logger.info("%s: %d documents, %d sentences, %d tokens, %d sentence pairs of %d tokens", name,
                        len(docs), int(docs.num_sentences.sum()), dataset.num_tokens, len(dataset), lengths[stream])
        datasets.append(dataset)
    return datasets[0], datasets[1], datasets[2]
