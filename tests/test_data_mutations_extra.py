"""Rules of the data code that the other data tests left open, each found by injecting a bug that they missed.

Corpus reading (tight json after whitespace or a byte-order mark, csv details, ``--delim`` in the
lazy cache key), the in-order training loader, the blend's key order and its per-(split, dataset)
shuffles, the split fill-in's nearest document, eod handling of indexed documents, the index caches
(keyed by seed, split, weights and shuffle; written atomically) and the vocabulary checks.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction

import numpy as np
import pytest

from data_utils import DataError
from data_utils.blending import IndexedGPT2Dataset, blend_indices, build_indexed_datasets, gpt2_member
from data_utils.corpora import read_texts, set_delimiter
from data_utils.datasets import assign_splits, document_hashes, parse_split
from data_utils.lazy_loader import load_corpus
from data_utils.samplers import make_data_loader
from tests.helpers import ByteTokenizer, gpt2_blends, numbered_texts, write_gpt2_prefix, write_indexed


@pytest.fixture
def default_delimiter():
    """Leave the process-wide ``--delim`` as it was found (None) whatever the test does."""
    yield
    set_delimiter(None)


# --- corpus files ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["\n  \t", "\ufeff", "\ufeff\r\n "])
def test_tight_json_is_recognised_after_whitespace_and_a_byte_order_mark(tmp_path, prefix):
    path = tmp_path / "tight.json"
    path.write_text(prefix + json.dumps([{"text": "one"}, {"text": "two"}], indent=1), encoding="utf-8")
    assert list(read_texts(str(path))) == ["one", "two"]


def test_csv_header_after_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_text("\ufefftext,id\nhello,1\n", encoding="utf-8")
    assert list(read_texts(str(path))) == ["hello"]


def test_a_csv_field_longer_than_the_csv_default_limit_is_read_whole(tmp_path):
    long_text = "word " * 40_000  # 200 KB, past csv's 128 KiB default field limit
    path = tmp_path / "long.csv"
    path.write_text(f'id,text\n1,"{long_text}"\n2,short\n', encoding="utf-8")
    assert list(read_texts(str(path))) == [long_text, "short"]


@pytest.mark.parametrize("delim", [";;", "", "\\t"])
def test_set_delimiter_takes_one_character_only(delim, default_delimiter):
    with pytest.raises(DataError, match="--delim .*expected one character"):
        set_delimiter(delim)


def test_the_lazy_cache_of_a_csv_corpus_follows_the_delimiter(tmp_path, default_delimiter):
    # Split by ',' the header is [text, a;text] and the text is 'p'; split by ';' it is [text,a, text] and 'r'.
    path = tmp_path / "both.csv"
    path.write_text("text,a;text\np,q;r\n", encoding="utf-8")
    tok, cache = ByteTokenizer(), str(tmp_path / "cache")
    assert tok.decode(load_corpus(str(path), tok, lazy=True, cache_dir=cache)[0]) == "p"
    set_delimiter(";")
    assert tok.decode(load_corpus(str(path), tok, lazy=True, cache_dir=cache)[0]) == "r"
    set_delimiter(None)
    assert tok.decode(load_corpus(str(path), tok, lazy=True, cache_dir=cache)[0]) == "p"


# --- the training loader --------------------------------------------------------------------------------------------

class _Numbers:
    """Sample ``i`` is ``{'text': [i]}``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"text": np.array([i])}


@pytest.mark.parametrize("dp_size", [1, 2])
def test_an_in_order_training_loader_walks_every_epoch_in_sample_order(dp_size):
    # --no-shuffle, and a presampled blend: endless training batches in sample order, epoch after epoch.
    n, batch = 7, 2
    per_rank = []
    for rank in range(dp_size):
        it = make_data_loader(_Numbers(n), batch, rank, dp_size, seed=3, shuffle=True, in_order=True)
        per_rank.append([next(it)["text"][:, 0].tolist() for _ in range(6)])
    stream = [i for step in range(6) for rank in range(dp_size) for i in per_rank[rank][step]]
    assert stream == (list(range(n)) * 4)[:len(stream)]


# --- the blend ------------------------------------------------------------------------------------------------------

def _reference_blend(weights: list[int], n: int) -> list[int]:
    """The documented rule in exact arithmetic: draw c of dataset k has key (c + 1/2) / w_k; ties to the lower k."""
    w = [Fraction(x, sum(weights)) for x in weights]
    keys = sorted(((c + Fraction(1, 2)) / wk, k) for k, wk in enumerate(w) for c in range(n + 1))
    return [k for _, k in keys[:n]]


@pytest.mark.parametrize("weights", [[1, 3], [1, 1], [1, 1, 2], [3, 1, 4]])
def test_the_blend_takes_draws_in_key_order_with_ties_to_the_lower_dataset(weights):
    # Normalised, these weights are exact binary fractions, so the float keys order as the exact ones.
    dataset_index, _ = blend_indices(weights, [1000] * len(weights), 400, seed=0, split=0)
    assert dataset_index.tolist() == _reference_blend(weights, 400)
    if weights == [1, 3]:  # by hand: keys 2, 6, 10 for dataset 0 and 2/3, 2, 10/3, 14/3, 6 ... for dataset 1
        assert dataset_index[:12].tolist() == [1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1]


def test_each_split_and_each_dataset_of_a_blend_has_its_own_order():
    d, train = blend_indices([1, 1], [50, 50], 400, seed=1, split=0)
    d_valid, valid = blend_indices([1, 1], [50, 50], 400, seed=1, split=1)
    np.testing.assert_array_equal(d, d_valid)  # the interleave depends on the weights only
    for k in (0, 1):
        assert sorted(train[d == k][:50].tolist()) == list(range(50))
        assert train[d == k][:50].tolist() != valid[d == k][:50].tolist(), k  # valid is not train's order
    assert train[d == 0][:50].tolist() != train[d == 1][:50].tolist()  # nor do equal-sized datasets share one


# --- the split fill-in ----------------------------------------------------------------------------------------------

def _reference_fill_in(hashes: np.ndarray, fractions: tuple[float, ...]) -> np.ndarray:
    """Hash assignment, then each empty non-zero split (in order) takes the document nearest its interval
    from a split holding more than one (the lowest index on a tie)."""
    bounds = np.cumsum(fractions)
    bounds /= bounds[-1]
    lows = np.concatenate([[0.0], bounds[:-1]])
    which = np.searchsorted(bounds[:-1], hashes, side="right")
    for s in range(len(fractions)):
        counts = np.bincount(which, minlength=len(fractions))
        if fractions[s] == 0 or counts[s]:
            continue
        candidates = [(max(lows[s] - h, h - bounds[s]), j) for j, h in enumerate(hashes) if counts[which[j]] > 1]
        which[min(candidates)[1]] = s
    return which


def test_the_fill_in_takes_the_document_nearest_the_empty_split():
    fractions = parse_split("0.5,0.4,0.1")
    from_above = 0
    for seed in range(300):
        hashes = document_hashes(4, seed)
        expected = _reference_fill_in(hashes, fractions)
        np.testing.assert_array_equal(assign_splits(4, fractions, seed), expected, err_msg=f"seed {seed}")
        natural = np.searchsorted(np.cumsum(fractions)[:-1], hashes, side="right")
        moved = np.flatnonzero(natural != expected)
        from_above += int(any(natural[j] > expected[j] for j in moved))
    assert from_above > 0  # some fill-ins took a document from the split above the empty one


# --- indexed datasets and their caches ------------------------------------------------------------------------------

@pytest.mark.parametrize("append_eod", [True, False])
def test_indexed_documents_are_shown_without_their_trailing_eod(tmp_path, append_eod):
    texts = numbered_texts(12, "d")
    prefix = write_gpt2_prefix(tmp_path, texts, "docs", append_eod)
    train, _, _ = gpt2_blends([prefix], tmp_path, samples=(10, 0, 0), shuffle=False)
    docs, tok = train.datasets[0].docs, ByteTokenizer()
    assert [docs[i].tolist() for i in range(len(docs))] == [tok.encode(t) for t in texts]


def _train_doc_ids(prefix: str, folder, split: str, seed: int) -> list[int]:
    train, _, _ = gpt2_blends([prefix], folder, split=split, seed=seed, samples=(20, 0, 0))
    return train.datasets[0].docs.doc_ids.tolist()


def test_the_cached_document_split_follows_seed_and_split(tmp_path):
    prefix = write_gpt2_prefix(tmp_path, numbered_texts(60, "d"), "docs")
    for split, seed in (("50,25,25", 3), ("50,25,25", 4), ("80,10,10", 4), ("50,25,25", 3)):
        expected = np.flatnonzero(assign_splits(60, parse_split(split), seed) == 0).tolist()
        assert _train_doc_ids(prefix, tmp_path, split, seed) == expected, (split, seed)


def test_the_cached_blend_follows_weights_and_shuffle(tmp_path):
    a = write_gpt2_prefix(tmp_path, numbered_texts(40, "a"), "a")
    b = write_gpt2_prefix(tmp_path, numbered_texts(40, "b"), "b")
    for wa, wb in (("0.7", "0.3"), ("0.3", "0.7")):
        train, _, _ = gpt2_blends([wa, a, wb, b], tmp_path, samples=(1000, 0, 0))
        assert np.mean(train.dataset_index == 0) == pytest.approx(float(wa), abs=0.002)
    shuffled, _, _ = gpt2_blends([a], tmp_path, samples=(30, 0, 0))
    ordered, _, _ = gpt2_blends([a], tmp_path, samples=(30, 0, 0), shuffle=False)
    assert shuffled.sample_index.tolist() != list(range(30))
    assert ordered.sample_index.tolist() == list(range(30))


def test_a_split_that_needs_no_samples_gets_no_blend(tmp_path):
    prefix = write_gpt2_prefix(tmp_path, numbered_texts(60, "d"), "docs")
    train, valid, test = gpt2_blends([prefix], tmp_path, split="80,10,10", samples=(50, 0, 10))
    assert len(train) == 50 and valid is None and len(test) == 10


def test_a_failed_index_build_leaves_nothing_and_the_next_run_builds(tmp_path, monkeypatch):
    prefix = write_gpt2_prefix(tmp_path, numbered_texts(30, "d"), "docs")
    real_save, calls = np.save, []

    def disk_full_on_the_second_array(path, array, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", disk_full_on_the_second_array)
    with pytest.raises(OSError, match="No space left"):
        gpt2_blends([prefix], tmp_path, samples=(20, 0, 0))
    assert os.listdir(tmp_path / "index-cache") == []  # no half-written folder, no temporary left
    monkeypatch.undo()
    train, _, _ = gpt2_blends([prefix], tmp_path, samples=(20, 0, 0))
    assert train.datasets[0].docs.doc_ids.tolist() == list(range(30)) and len(train) == 20


def test_a_token_id_equal_to_the_vocabulary_size_is_refused(tmp_path):
    prefix = write_indexed(str(tmp_path / "edge"), [[[1, 2, 3, 257]]] * 4)
    with pytest.raises(DataError, match="holds token id 257, beyond the tokenizer's 257 ids"):
        gpt2_blends([prefix], tmp_path)
    tok = ByteTokenizer(vocab_size=258)  # one id more: accepted
    train, _, _ = build_indexed_datasets([prefix], "1", 3, (10, 0, 0), gpt2_member(8, tok), tok, gpt2=True,
                                         cache_dir=str(tmp_path))
    assert 257 in train[0]["text"].tolist()


def test_each_indexed_sample_checks_its_ids_against_the_vocabulary(tmp_path):
    # The up-front check reads only the first 2**20 tokens; each sample checks its own ids as well.
    docs = [[[5, 6, 7, 8, 9, 10, 11]] for _ in range(6)] + [[[1, 2, 257, 3, 4, 5, 6, 7, 8, 9]]]
    prefix = write_indexed(str(tmp_path / "late"), docs)
    wide = ByteTokenizer(vocab_size=258)
    train, _, _ = build_indexed_datasets([prefix], "1", 3, (10, 0, 0), gpt2_member(8, wide), wide, gpt2=True,
                                         cache_dir=str(tmp_path))
    member = train.datasets[0]
    narrow = IndexedGPT2Dataset(member.docs, member.ends, 8, 256, 257, "train")
    holding = [i for i in range(len(member)) if 257 in member[i]["text"].tolist()]
    assert holding and len(holding) < len(member)
    for i in range(len(member)):
        if i in holding:
            with pytest.raises(DataError, match="holds token id 257, beyond the tokenizer's 257 ids"):
                narrow[i]
        else:
            np.testing.assert_array_equal(narrow[i]["text"], member[i]["text"])
