"""BERT sentence pairs: sentence splitting, sentence corpora, the sampling rule, the builder, the presplit script.

Test corpora give every token a unique id, so each token of a sample tells which document and
position it came from: segments can be checked to be runs of sentences, B to follow A, and so on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest

from data_utils import build_bert_datasets, make_data_loader, parse_split
from data_utils.bert_dataset import BertSentencePairDataset, trimmed_lengths
from data_utils.datasets import assign_splits
from data_utils.errors import DataError
from data_utils.lazy_loader import SentenceCorpus, cache_folder, load_sentence_corpus
from data_utils.samplers import collate
from data_utils.sentences import make_punkt_splitter, split_sentences, splitter_identity
from data_utils.tokenization import BertWordPieceTokenizer
from tests.helpers import CLS, MASK, PAD, REPO, SEP, UNK, ByteTokenizer, IdTokenizer, write_jsonl

FIRST_ID = 10
SCRIPT = os.path.join(REPO, "scripts", "presplit_sentences_json.py")


class Truth:
    """Documents of unique ids: ``docs[d][s]`` is sentence ``s`` of document ``d``; ``where[id] = (d, position)``."""

    def __init__(self, sentence_lengths: Sequence[Sequence[int]]) -> None:
        next_id = FIRST_ID
        self.docs, self.where, self.starts = [], {}, []
        for d, lengths in enumerate(sentence_lengths):
            doc, starts, pos = [], set(), 0
            for length in lengths:
                ids = list(range(next_id, next_id + length))
                next_id += length
                starts.add(pos)
                for t in ids:
                    self.where[t] = (d, pos)
                    pos += 1
                doc.append(ids)
            starts.add(pos)
            self.docs.append(doc)
            self.starts.append(starts)  # positions where a sentence starts, and the document's end
        self.num_ids = next_id

    def corpus(self) -> SentenceCorpus:
        return SentenceCorpus.from_documents(self.docs)

    def run(self, segment: np.ndarray) -> tuple[int, int, int]:
        """(document, first position, last position) of a segment, which must be consecutive tokens of one document."""
        places = [self.where[int(t)] for t in segment]
        docs = {d for d, _ in places}
        assert len(docs) == 1, f"segment spans documents {docs}"
        positions = [p for _, p in places]
        assert positions == list(range(positions[0], positions[0] + len(positions))), positions
        return places[0][0], positions[0], positions[-1]


def unmasked(sample: dict[str, np.ndarray]) -> np.ndarray:
    """The input ids with every predicted position given back its label."""
    original = sample["text"].copy()
    hit = sample["mask"] == 1
    original[hit] = sample["mask_labels"][hit]
    return original


def segments(sample: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A and B of a sample, read from its unmasked ids (corpus ids never equal [SEP])."""
    original = unmasked(sample)
    seps = np.flatnonzero(original == SEP)
    assert len(seps) == 2, seps
    return original[1:seps[0]], original[seps[0] + 1:seps[1]]


def varied_truth(seed: int = 0, docs: int = 60) -> Truth:
    """Documents of 0-9 sentences of 1-12 tokens: some empty, some of one sentence."""
    rng = np.random.default_rng(seed)
    return Truth([[int(n) for n in rng.integers(1, 13, size=rng.integers(0, 10))] for _ in range(docs)])


def dataset(truth: Truth, seq_length: int = 32, max_preds: int | None = None, seed: int = 7,
            vocab_size: int = 100_000, stream: int = 0) -> BertSentencePairDataset:
    return BertSentencePairDataset(truth.corpus(), seq_length, max_preds, IdTokenizer(vocab_size), seed, stream)


def many(truth: Truth, count: int, **kwargs) -> list[dict[str, np.ndarray]]:
    """``count`` samples: every index of seeds 0, 1, ... until there are enough."""
    out: list[dict[str, np.ndarray]] = []
    seed = 0
    while len(out) < count:
        ds = dataset(truth, seed=seed, **kwargs)
        out += [ds[i] for i in range(min(len(ds), count - len(out)))]
        seed += 1
    return out


# --- sentence splitting -------------------------------------------------------------------------------------------

def test_punkt_split_with_abbreviations_and_lines():
    text = "Mr. Smith met Dr. Jones at 3 p.m. on Jan. 5, e.g. at home. They talked!  Was it late?\nNew line here"
    assert split_sentences(text) == ["Mr. Smith met Dr. Jones at 3 p.m. on Jan. 5, e.g. at home.", "They talked!",
                                     "Was it late?", "New line here"]
    assert split_sentences("  one. two\n\n  three  \n") == ["one.", "two", "three"]
    assert split_sentences("") == [] and split_sentences(" \n\t\n") == []


def test_presplit_is_one_sentence_per_nonempty_line():
    text = " First line. Still the first.\n\n   \nSecond line  \n"
    assert split_sentences(text, presplit=True) == ["First line. Still the first.", "Second line"]
    assert split_sentences(text) == ["First line.", "Still the first.", "Second line"]
    assert splitter_identity(True) != splitter_identity(False)


def test_punkt_needs_no_nltk_data(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # nowhere to find punkt data
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    assert make_punkt_splitter().tokenize("The cat sat. The dog ran.") == ["The cat sat.", "The dog ran."]


# --- sentence corpora ----------------------------------------------------------------------------------------------

TEXTS = ["w10 w11. w12 w13 w14!\nw15 w16.", "", "... !!", "w17 w18 w19 w20. Mr. w21 w22.", "w23"]


def test_sentence_corpus_layout_drops_empty_sentences(tmp_path):
    src = write_jsonl(tmp_path / "c.json", ["w10 w11\n...\n\n w12 ", "...", "w13"])
    corpus = load_sentence_corpus(src, IdTokenizer(), lazy=False, presplit=True)
    assert corpus.num_sentences.tolist() == [2, 0, 1] and corpus.lengths.tolist() == [3, 0, 1]
    assert [[s.tolist() for s in corpus[d]] for d in range(3)] == [[[10, 11], [12]], [], [[13]]]
    assert corpus.span(0, 0, 2).tolist() == [10, 11, 12] and corpus.sentence_lengths(0).tolist() == [2, 1]


@pytest.mark.parametrize("presplit, expected", [
    (True, [[[10, 11, 12, 13, 14], [15, 16]], [], [], [[17, 18, 19, 20, 21, 22]], [[23]]]),
    (False, [[[10, 11], [12, 13, 14], [15, 16]], [], [], [[17, 18, 19, 20], [21, 22]], [[23]]]),
])
def test_lazy_sentence_corpus_matches_in_memory(tmp_path, presplit, expected):
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    lazy = load_sentence_corpus(src, IdTokenizer(), lazy=True, cache_dir=str(tmp_path), presplit=presplit)
    memory = load_sentence_corpus(src, IdTokenizer(), lazy=False, presplit=presplit)
    for corpus in (lazy, memory):
        assert [[s.tolist() for s in corpus[d]] for d in range(len(corpus))] == expected
    assert isinstance(lazy.tokens, np.memmap) and lazy.tokens.dtype == np.uint32  # vocabulary over 2**16
    np.testing.assert_array_equal(lazy.sentence_offsets, memory.sentence_offsets)
    np.testing.assert_array_equal(lazy.doc_offsets, memory.doc_offsets)


def test_switching_presplit_gets_its_own_cache_and_reuses_it(tmp_path):
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    cache = str(tmp_path / "cache")
    tok = IdTokenizer()
    lines = load_sentence_corpus(src, tok, lazy=True, cache_dir=cache, presplit=True)
    calls = tok.calls
    punkt = load_sentence_corpus(src, tok, lazy=True, cache_dir=cache, presplit=False)
    assert punkt.folder != lines.folder and tok.calls > calls
    assert punkt.num_sentences.tolist() == [3, 0, 0, 2, 1] and lines.num_sentences.tolist() == [2, 0, 0, 1, 1]
    calls = tok.calls
    again = load_sentence_corpus(src, tok, lazy=True, cache_dir=cache, presplit=True)
    assert tok.calls == calls and again.folder == lines.folder  # reused, nothing tokenized
    assert again.folder == cache_folder(src, tok, cache, sentences=splitter_identity(True))
    assert cache_folder(src, tok, cache) not in (lines.folder, punkt.folder)  # GPT2's cache is another one
    assert sorted(os.listdir(os.path.join(cache, "tokenized"))) == sorted(
        os.path.basename(f) for f in (lines.folder, punkt.folder))


def test_failed_sentence_build_leaves_no_cache(tmp_path):
    src = tmp_path / "c.json"
    src.write_text('{"text": "w10."}\n{"body": "w11."}\n')
    with pytest.raises(DataError, match=r"c.json:2: no key 'text'"):
        load_sentence_corpus(str(src), IdTokenizer(), lazy=True, cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache" / "tokenized") == []


# --- the sampling rule ---------------------------------------------------------------------------------------------

def test_layout_types_padding_and_dtypes():
    seq = 32
    seen_padding = 0
    for sample in many(varied_truth(), 1500, seq_length=seq):
        assert set(sample) == {"text", "types", "is_random", "mask", "mask_labels", "pad_mask"}
        assert all(v.dtype == np.int64 for v in sample.values()) and sample["is_random"].shape == ()
        assert all(sample[k].shape == (seq,) for k in sample if k != "is_random")
        original = unmasked(sample)
        sep_a, sep_b = np.flatnonzero(original == SEP)
        assert sample["text"][0] == CLS and sample["text"][sep_a] == SEP and sample["text"][sep_b] == SEP
        expected_types = np.zeros(seq, dtype=np.int64)
        expected_types[sep_a + 1:sep_b + 1] = 1
        np.testing.assert_array_equal(sample["types"], expected_types)
        expected_pad = (np.arange(seq) > sep_b).astype(np.int64)
        np.testing.assert_array_equal(sample["pad_mask"], expected_pad)
        assert (sample["text"][sep_b + 1:] == PAD).all()
        seen_padding += int(expected_pad.sum() > 0)
    assert seen_padding > 100  # the checks above did see padded samples


def test_segments_are_runs_of_sentences_and_b_follows_a():
    truth = varied_truth()
    counts = {0: 0, 1: 0}
    for sample in many(truth, 2000):
        a, b = segments(sample)
        assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= 32 - 3
        doc_a, _, last_a = truth.run(a)
        doc_b, first_b, _ = truth.run(b)
        is_random = int(sample["is_random"])
        counts[is_random] += 1
        if len(truth.docs[doc_a]) == 1:
            assert is_random == 1
        if is_random:
            assert doc_b != doc_a
        else:  # B starts after A, across a sentence boundary (the gap is what truncation dropped)
            assert doc_b == doc_a and first_b > last_a
            assert any(last_a < p <= first_b for p in truth.starts[doc_a])
    assert counts[0] > 300 and counts[1] > 300


def test_next_sentence_is_random_about_half_the_time():
    truth = Truth([[2 + (d + s) % 3 for s in range(30)] for d in range(40)])  # chunk of one: P = 1/30
    rate = np.mean([int(s["is_random"]) for s in many(truth, 3000)])
    assert 0.47 < rate < 0.56, rate  # expected 0.5 + 0.5 / 30


def test_a_document_by_length_b_document_uniform():
    truth = Truth([[5] * (d + 1) for d in range(20)])  # document d holds 5 (d + 1) tokens
    a_long, b_long = [], []
    for sample in many(truth, 3000):
        a, b = segments(sample)
        a_long.append(truth.run(a)[0] >= 10)
        if int(sample["is_random"]):
            b_long.append(truth.run(b)[0] >= 10)
    assert abs(np.mean(a_long) - 155 / 210) < 0.03  # in proportion to length: documents 10-19 hold 155 of 210
    assert abs(np.mean(b_long) - 0.5) < 0.05 and len(b_long) > 1000  # uniform over the other documents


@pytest.mark.parametrize("max_preds", [None, 2, 100])
def test_number_and_places_of_predictions(max_preds):
    lengths_seen = set()
    for sample in many(varied_truth(), 1500, max_preds=max_preds):
        original = unmasked(sample)
        n = int((sample["pad_mask"] == 0).sum())  # [CLS] A [SEP] B [SEP]: Google and 2019 count the specials
        lengths_seen.add(n - 3)
        expected = max(1, round(0.15 * n)) if max_preds is None else min(max_preds, max(1, round(0.15 * n)))
        assert int(sample["mask"].sum()) == expected, (n, max_preds)
        predicted = np.flatnonzero(sample["mask"])
        assert not np.isin(original[predicted], [CLS, SEP, PAD]).any() and 0 not in predicted
        assert (sample["mask_labels"][sample["mask"] == 0] == -1).all()
        np.testing.assert_array_equal(sample["text"][sample["mask"] == 0], original[sample["mask"] == 0])
    assert len(lengths_seen) > 10 and {2, 10, 29} <= lengths_seen  # round(0.75) = 1; round(1.95) = 2; round(4.8) = 5


@pytest.mark.parametrize("seq_length, expected", [(32, 5), (128, 19), (512, 77)])
def test_a_full_sequence_masks_the_2019_number_of_positions(seq_length, expected):
    # Every sentence overfills the budget, so all but the 1% short targets hold seq_length tokens with the
    # specials: round(0.15 x seq_length) predictions (Google's 19 of 128; from A and B alone it would be
    # 4, 19 and 76).
    truth = Truth([[seq_length + 8] * 3 for _ in range(6)])
    full = [s for s in many(truth, 40, seq_length=seq_length) if s["pad_mask"].sum() == 0]
    assert len(full) >= 35
    for sample in full:
        assert int(sample["mask"].sum()) == expected


def test_random_replacements_are_text_tokens_never_special_ones():
    vocab = 12  # the specials are 0, 2, 3 and 4 (UNK, 1, is a token text can hold): a third of the vocabulary
    truth = Truth([[3] * 6 for _ in range(10)])
    swapped = []
    for sample in many(truth, 3000, vocab_size=vocab):
        hit = sample["mask"] == 1
        inputs, labels = sample["text"][hit], sample["mask_labels"][hit]
        swapped.append(inputs[(inputs != MASK) & (inputs != labels)])
    swapped = np.concatenate(swapped)
    assert len(swapped) > 200
    assert not np.isin(swapped, [PAD, CLS, SEP, MASK]).any()
    assert set(np.unique(swapped)) == {UNK, *range(5, vocab)}  # uniform over the text ids: all of them drawn


def test_mask_random_keep_proportions():
    vocab = 2000
    truth = Truth([[5] * 8 for _ in range(40)])  # ids 10..1609 < vocab
    labels, inputs = [], []
    for sample in many(truth, 3000, vocab_size=vocab):
        hit = sample["mask"] == 1
        labels.append(sample["mask_labels"][hit])
        inputs.append(sample["text"][hit])
    labels, inputs = np.concatenate(labels), np.concatenate(inputs)
    assert len(labels) > 10000
    masked, kept = np.mean(inputs == MASK), np.mean(inputs == labels)
    swapped = inputs[(inputs != MASK) & (inputs != labels)]
    assert abs(masked - 0.8) < 0.015 and abs(kept - 0.1) < 0.012 and abs(len(swapped) / len(labels) - 0.1) < 0.012
    assert swapped.min() >= 0 and swapped.max() < vocab
    assert swapped.min() < vocab * 0.02 and swapped.max() > vocab * 0.98  # uniform over [0, vocab), not the corpus
    assert np.mean(swapped >= truth.num_ids) > 0.15


def test_short_targets_and_truncation_from_both_ends():
    truth = Truth([[40, 40, 40] for _ in range(30)])  # every sentence overfills the budget of 29
    short, fronts = [], []
    for sample in many(truth, 5000):
        a, b = segments(sample)
        assert int(sample["is_random"]) == 1  # a one-sentence chunk always takes a random B
        doc_a, first_a, _ = truth.run(a)
        truth.run(b)
        n = len(a) + len(b)
        if n < 29:
            short.append(n)
        else:  # the longer segment (B on a tie) loses a token at a time: 40 + 40 -> 15 + 14
            assert (len(a), len(b)) == (15, 14)
            fronts.append(first_a % 40)  # tokens A lost at its front, of the 25 it lost
    assert 20 <= len(short) <= 85 and min(short) <= 8 and max(short) >= 20, short  # p = 0.01 * 27/28
    fronts = np.array(fronts)
    assert abs(fronts.mean() - 12.5) < 0.3 and 1.5 < fronts.std() < 3.5  # Binomial(25, 1/2)


def test_trimmed_lengths_match_googles_loop():
    for la in range(1, 30):
        for lb in range(1, 30):
            for budget in (2, 3, 7, 12, 29):
                a, b = la, lb
                while a + b > budget:
                    if a > b:
                        a -= 1
                    else:
                        b -= 1
                assert trimmed_lengths(la, lb, budget) == (a, b), (la, lb, budget)


def test_single_document_always_takes_the_following_sentences():
    for lengths in ([3, 5, 2, 4, 6, 1], [40, 40, 40]):
        truth = Truth([[], lengths, []])
        starts = []
        for sample in many(truth, 200):
            a, b = segments(sample)
            assert int(sample["is_random"]) == 0
            _, first_a, last_a = truth.run(a)
            _, first_b, _ = truth.run(b)
            assert first_b > last_a and any(last_a < p <= first_b for p in truth.starts[1])
            starts.append(first_a)
        assert len(set(starts)) > 5  # A does start in many places
    with pytest.raises(DataError, match="the train split has a single document with a single sentence"):
        dataset(Truth([[], [7]]))


def test_determinism_seeds_and_streams():
    truth = varied_truth()
    first = [dataset(truth)[i] for i in range(40)]
    again = dataset(truth)
    for i in reversed(range(40)):  # any order, a new object: the same samples
        for key in first[i]:
            np.testing.assert_array_equal(again[i][key], first[i][key])
    for other in (dataset(truth, seed=8), dataset(truth, stream=1)):
        differ = sum(not np.array_equal(other[i]["text"], first[i]["text"]) for i in range(40))
        assert differ >= 36


def test_length_rule_and_errors():
    truth = varied_truth()
    assert len(dataset(truth, seq_length=32)) == truth.corpus().num_tokens // 29
    assert len(dataset(Truth([[2, 1]]), seq_length=32)) == 1
    with pytest.raises(IndexError):
        dataset(Truth([[2, 1]]))[1]
    with pytest.raises(DataError, match="the valid split has 2 documents but not one sentence"):
        BertSentencePairDataset(Truth([[], []]).corpus(), 32, None, IdTokenizer(), 1, name="valid")
    with pytest.raises(DataError, match="--seq-length 4"):
        dataset(truth, seq_length=4)
    with pytest.raises(DataError, match="--max-preds-per-seq"):
        dataset(truth, max_preds=0)
    with pytest.raises(DataError, match=r"ByteTokenizer has no \[CLS\], \[SEP\], \[MASK\], \[PAD\] id"):
        BertSentencePairDataset(truth.corpus(), 32, None, ByteTokenizer(), 1)


# --- building datasets ---------------------------------------------------------------------------------------------

def write_truth(path, truth: Truth, offset: int = 0) -> str:
    """Loose json of ``truth``'s documents, one sentence per line (ids shifted by ``offset``)."""
    return write_jsonl(path, ["\n".join(" ".join(f"w{t + offset}" for t in s) + "." for s in doc)
                              for doc in truth.docs])


@pytest.mark.parametrize("lazy", [False, True])
def test_build_splits_like_gpt2_and_streams_differ(tmp_path, lazy):
    truth = varied_truth(docs=80)
    src = write_truth(tmp_path / "a.json", truth)
    tok = IdTokenizer()
    train, valid, test = build_bert_datasets([src], None, None, "70,20,10", 32, 5, tok, lazy, str(tmp_path), 11,
                                             presplit_sentences=True)
    which = assign_splits(80, parse_split("70,20,10"), 11)
    for s, ds in enumerate((train, valid, test)):
        (corpus, idx), = ds.docs.parts
        np.testing.assert_array_equal(idx, np.flatnonzero(which == s))
        assert [[sent.tolist() for sent in corpus[d]] for d in idx] == [truth.docs[d] for d in idx]
        assert ds.stream == s and ds.max_preds_per_seq == 5
    same, other, _ = build_bert_datasets([src], [src], None, "1", 32, 5, tok, lazy, str(tmp_path), 11,
                                         presplit_sentences=True)
    assert len(same.docs) == len(other.docs) == 80
    assert sum(not np.array_equal(same[i]["text"], other[i]["text"]) for i in range(30)) >= 27


def test_build_overrides_empty_splits_and_errors(tmp_path):
    a = write_truth(tmp_path / "a.json", varied_truth(docs=30))
    v = write_truth(tmp_path / "v.json", Truth([[3, 4], [5]]), offset=5000)
    tok = IdTokenizer()
    train, valid, test = build_bert_datasets([a], [v], None, "1", 32, None, tok, False, None, 1,
                                             presplit_sentences=True)
    assert len(train.docs) == 30 and len(valid.docs) == 2 and test is None
    assert len(valid) == 1 and (np.concatenate(segments(valid[0])) >= 5000 + FIRST_ID).all()  # from v.json
    empty = write_jsonl(tmp_path / "e.json", ["", "..."])
    with pytest.raises(DataError, match="e.json holds only blank lines or empty texts"):
        build_bert_datasets([a], None, [empty], "1", 32, None, tok, False, None, 1)
    byte_tok = ByteTokenizer()
    with pytest.raises(DataError, match="ByteTokenizer has no"):
        build_bert_datasets([a], None, None, "1", 32, None, byte_tok, True, str(tmp_path), 1)
    assert byte_tok.calls == 0  # refused before tokenizing anything


def test_lazy_and_in_memory_give_identical_samples_and_workers_agree(tmp_path):
    src = write_truth(tmp_path / "a.json", varied_truth(docs=40))
    built = [build_bert_datasets([src], None, None, "1", 32, 4, IdTokenizer(), lazy, str(tmp_path), 2)[0]
             for lazy in (False, True)]
    memory, lazy = built
    assert len(memory) == len(lazy) > 20
    for i in range(len(memory)):
        for key, value in memory[i].items():
            np.testing.assert_array_equal(lazy[i][key], value)
    batches = make_data_loader(lazy, batch_size=4, dp_rank=0, dp_size=1, seed=0, shuffle=False, num_workers=2)
    for k, batch in zip(range(3), batches):
        expected = collate([memory[i] for i in range(4 * k, 4 * k + 4)])
        assert batch["is_random"].shape == (4,) and batch["text"].shape == (4, 32)
        for key, value in expected.items():
            assert (batch[key] == value).all(), key


def test_real_wordpiece_tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    words = "the cat sat on a mat dog ran far away birds sang".split()
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words]) + "\n")
    tok = BertWordPieceTokenizer(str(vocab))
    text = "The cat sat on a mat. The dog ran far away. Birds sang."
    src = write_jsonl(tmp_path / "c.json", [text, "A dog sat. The cat ran."])
    train, _, _ = build_bert_datasets([src], None, None, "1", 16, None, tok, True, str(tmp_path), 3)
    docs = [tok.encode(text), tok.encode("A dog sat. The cat ran.")]
    assert UNK not in docs[0] + docs[1] and len(docs[0]) == 16  # every word known; "." is a token

    def inside(segment: np.ndarray) -> bool:
        n = len(segment)
        return any(doc[k:k + n] == segment.tolist() for doc in docs for k in range(len(doc) - n + 1))

    for seed in range(20):
        sample = BertSentencePairDataset(train.docs, 16, None, tok, seed)[0]
        original = unmasked(sample)
        sep_a, sep_b = np.flatnonzero(original == tok.sep)
        assert sample["text"][0] == tok.cls and sample["text"][sep_b] == tok.sep
        assert inside(original[1:sep_a]) and inside(original[sep_a + 1:sep_b])
        assert (original[sep_b + 1:] == tok.pad).all() and sample["pad_mask"][sep_b + 1:].all()


# --- scripts/presplit_sentences_json.py ----------------------------------------------------------------------------

def load_script():
    spec = importlib.util.spec_from_file_location("presplit_sentences_json", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_presplit_script_end_to_end(tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"text": "Mr. w10 w11. w12!\nw13 w14", "title": "t", "n": 1}) + "\n\n"
                   + json.dumps({"text": "", "n": 2}) + "\n")
    out = tmp_path / "out.json"
    run = subprocess.run([sys.executable, "scripts/presplit_sentences_json.py", str(src), str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out}: 2 documents, 3 sentences" in run.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [{"text": "Mr. w10 w11.\nw12!\nw13 w14", "title": "t", "n": 1}, {"text": "", "n": 2}]
    original = split_sentences(json.loads(src.read_text().splitlines()[0])["text"])
    assert split_sentences(records[0]["text"], presplit=True) == original
    assert sorted(os.listdir(tmp_path)) == ["in.json", "out.json"]  # no temporary file left

    src.write_text('{"text": "w1."}\n{"text": w2}\n')
    run = subprocess.run([sys.executable, SCRIPT, str(src), str(tmp_path / "bad_out.json")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {src}:2: not valid JSON")
    assert sorted(os.listdir(tmp_path)) == ["in.json", "out.json"]


def test_presplit_script_errors(tmp_path, capsys):
    script = load_script()
    src = tmp_path / "in.json"
    src.write_text('{"text": "w1. w2."}\n{"body": "w3."}\n')
    before = src.read_text()
    assert script.main([str(src), str(src)]) == 1
    assert "is INPUT; write to another file" in capsys.readouterr().err and src.read_text() == before
    assert script.main([str(src), str(tmp_path / "out.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: {src}:2: no key 'text' (keys present: 'body'); pass --text-key with the " \
                  "right key"
    assert script.main([str(src), str(tmp_path / "out.json"), "--text-key", "body"]) == 1
    assert f"{src}:1: no key 'body'" in capsys.readouterr().err
    assert script.main([str(tmp_path / "missing.json"), str(tmp_path / "out.json")]) == 1
    assert "cannot open" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in.json"]
