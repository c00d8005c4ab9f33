"""Training from indexed datasets: --data-path parsing, document splits, GPT2/BERT samples, weighted blends,
their index caches and the vocabulary checks."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest

from data_utils import DataError, build_bert_datasets, build_gpt2_datasets
from data_utils.blending import (
    BlendedDataset,
    IndexedGPT2Dataset,
    bert_member,
    blend_indices,
    build_indexed_datasets,
    gpt2_member,
    parse_data_path,
)
from data_utils.datasets import assign_splits, parse_split
from data_utils.sentences import split_sentences
from tests.cli import assert_one_line_error
from tests.distributed import run_distributed
from tests.helpers import (
    REPO,
    ByteTokenizer,
    IdTokenizer,
    bert_args,
    bert_losses,
    gpt2_args,
    gpt2_blends,
    gpt2_losses,
    numbered_texts,
    train_bert,
    train_gpt2,
    write_gpt2_corpus,
    write_gpt2_prefix,
    write_indexed,
    write_jsonl,
)


@pytest.mark.parametrize("values, expected", [
    (["a"], [(None, "a")]),
    (["0.7", "a", "0.3", "b.bin"], [(0.7, "a"), (0.3, "b")]),
    (["2", "a.idx", "6", "b"], [(0.25, "a"), (0.75, "b")]),
    (["a", "b.bin"], [(None, "a"), (None, "b")]),
])
def test_parse_data_path(values, expected):
    got = parse_data_path(values)
    assert [p for _, p in got] == [p for _, p in expected]
    assert [w is None for w, _ in got] == [w is None for w, _ in expected]
    if expected[0][0] is not None:
        np.testing.assert_allclose([w for w, _ in got], [w for w, _ in expected])


def test_prefixes_without_weights_blend_by_size(tmp_path):
    a = write_gpt2_prefix(tmp_path, numbered_texts(30, "a"), "a")
    b = write_gpt2_prefix(tmp_path, numbered_texts(90, "b"), "b")
    train, _, _ = gpt2_blends([a, b], tmp_path, samples=(4000, 0, 0))
    tokens = [sum(len(t) + 1 for t in numbered_texts(n, tag)) for n, tag in ((30, "a"), (90, "b"))]
    assert np.mean(train.dataset_index == 0) == pytest.approx(tokens[0] / sum(tokens), abs=0.001)


@pytest.mark.parametrize("values, message", [
    (["0.7", "a", "b"], "are not pairs"),
    (["a", "0.5", "b", "0.5"], "'a' should be the weight of '0.5'"),
    ([], "at least one PREFIX"),
    (["-0.3", "a", "1.3", "b"], "the weight of 'a' is -0.3; weights must be positive"),
    (["0", "a", "1", "b"], "the weight of 'a' is 0"),
    (["nan", "a", "1", "b"], "weights must be positive"),
])
def test_parse_data_path_errors(values, message):
    with pytest.raises(DataError, match=message):
        parse_data_path(values)


def test_blend_proportions_hold_at_every_prefix_and_extend_exactly():
    d, s = blend_indices([0.7, 0.3], [50, 4000], 10_000, seed=1, split=0)
    counts = np.cumsum(d == 0)
    at = np.arange(1, 10_001)
    assert np.abs(counts - 0.7 * at).max() <= 1.0  # within one sample of the weights after any number of samples
    assert abs((d == 0).mean() - 0.7) < 0.02
    d2, s2 = blend_indices([0.7, 0.3], [50, 4000], 4_000, seed=1, split=0)
    np.testing.assert_array_equal(d2, d[:4000])  # a longer blend starts with the shorter one: resume with more iters
    np.testing.assert_array_equal(s2, s[:4000])
    # dataset 0 (50 samples) repeats: each run of 50 draws is one permutation, a new one per epoch
    first = s[d == 0]
    for e in range(3):
        assert sorted(first[50 * e:50 * (e + 1)].tolist()) == list(range(50))
    assert first[:50].tolist() != first[50:100].tolist()
    d3, s3 = blend_indices([0.7, 0.3], [50, 4000], 10_000, seed=2, split=0)
    np.testing.assert_array_equal(d3, d)  # the interleave depends on the weights only
    assert (s3 != s).any()  # the order within each dataset on the seed
    _, ordered = blend_indices([0.7, 0.3], [50, 4000], 1000, seed=1, split=0, shuffle=False)
    assert ordered[d[:1000] == 1].tolist() == list(range(int((d[:1000] == 1).sum())))


def test_three_way_blend_and_dataset_index():
    d, s = blend_indices([1, 2, 7], [10, 10, 10], 1000, seed=0, split=1)
    np.testing.assert_allclose(np.bincount(d, minlength=3) / 1000, [0.1, 0.2, 0.7], atol=0.002)
    ds = BlendedDataset([[f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)], [f"c{i}" for i in range(10)]],
                        d, s)
    assert ds[0] == ["a", "b", "c"][d[0]] + str(s[0]) and len(ds) == 1000


@pytest.mark.parametrize("append_eod", [True, False])
def test_gpt2_samples_equal_the_json_path_split_for_split(tmp_path, append_eod):
    texts = numbered_texts(80, "d")
    prefix = write_gpt2_prefix(tmp_path, texts, "corpus", append_eod)
    json_path = write_jsonl(tmp_path / "corpus.json", texts)
    tok = ByteTokenizer()
    expected = build_gpt2_datasets([json_path], None, None, "80,10,10", 8, tok, False, None, seed=3)
    got = gpt2_blends([prefix], tmp_path, split="80,10,10", samples=[2 * len(e) for e in expected], shuffle=False)
    for name, e, g in zip(("train", "valid", "test"), expected, got, strict=True):
        assert len(g.datasets[0]) == len(e), name
        member = g.datasets[0]
        for i in range(len(e)):
            np.testing.assert_array_equal(member[i]["text"], e[i]["text"])
        np.testing.assert_array_equal(g[0]["text"], e[0]["text"])  # no shuffle: the blend walks it in order
        assert g[len(e)]["text"].tolist() == e[0]["text"].tolist()  # then the next epoch


def test_blend_of_two_prefixes_draws_by_weight_and_is_cached(tmp_path, monkeypatch):
    a = write_gpt2_prefix(tmp_path, numbered_texts(60, "a"), "a")
    b = write_gpt2_prefix(tmp_path, [t.upper() for t in numbered_texts(60, "b")], "b")
    train, _, _ = gpt2_blends(["0.7", a, "0.3", b], tmp_path, samples=(10_000, 0, 0))
    assert [m.docs.ds.prefix for m in train.datasets] == [a, b]
    assert np.mean(train.dataset_index == 0) == pytest.approx(0.7, abs=0.001)
    stream_a = b"".join(t.encode() + b"|" for t in numbered_texts(60, "a"))
    for i in range(0, 200, 7):  # a sample drawn from a.bin is a window of a's stream (eod shown as '|')
        text = bytes(t if t < 256 else ord("|") for t in train[i]["text"])
        assert (text in stream_a) == (train.dataset_index[i] == 0), i
    cache = tmp_path / "index-cache"  # beside the data
    assert any(p.name.startswith("a.blend.train.") for p in cache.iterdir())
    import data_utils.blending as blending

    monkeypatch.setattr(blending, "blend_indices", lambda *a, **k: pytest.fail("rebuilt a cached blend"))
    monkeypatch.setattr(blending, "assign_corpus_splits", lambda *a, **k: pytest.fail("re-split a cached dataset"))
    again, _, _ = gpt2_blends(["0.7", a, "0.3", b], tmp_path, samples=(10_000, 0, 0))
    np.testing.assert_array_equal(again.sample_index, train.sample_index)
    assert isinstance(again.sample_index, np.memmap)  # mapped, not read whole


def test_data_cache_path_and_a_changed_dataset_gets_new_indices(tmp_path):
    a = write_gpt2_prefix(tmp_path, numbered_texts(40, "a"), "a")
    elsewhere = tmp_path / "indices"
    gpt2_blends([a], tmp_path, data_cache_path=str(elsewhere))
    before = set(os.listdir(elsewhere))
    assert before and not (tmp_path / "index-cache").exists()
    write_gpt2_prefix(tmp_path, numbered_texts(41, "a"), "a")  # rewritten: other size
    train, _, _ = gpt2_blends([a], tmp_path, data_cache_path=str(elsewhere))
    assert set(os.listdir(elsewhere)) > before
    assert len(train.datasets[0].docs) == 41


def test_valid_data_given_as_json_takes_its_share_back(tmp_path):
    a = write_gpt2_prefix(tmp_path, numbered_texts(100, "a"), "a")
    train, valid, test = gpt2_blends([a], tmp_path, split="80,20,0", samples=(50, 10, 10), valid_given=True)
    assert valid is None and test is None and len(train.datasets[0].docs) == 100


def test_wrong_vocabulary_is_one_line(tmp_path):
    prefix = write_indexed(str(tmp_path / "big"), [[[1, 2, 3, 9000]]] * 4)
    with pytest.raises(DataError, match="holds token id 9000, beyond the tokenizer's 257 ids"):
        gpt2_blends([prefix], tmp_path)


def test_bert_pairs_from_a_sentence_level_index_equal_the_json_path(tmp_path):
    tok = IdTokenizer()
    texts = ["\n".join(" ".join(f"w{10 + d * 50 + s * 7 + j}" for j in range(1 + (d * s) % 6))
                       for s in range(2 + d % 5)) for d in range(30)]
    json_path = write_jsonl(tmp_path / "sents.json", texts)
    docs = [[tok.encode(s) for s in split_sentences(t, presplit=True)] for t in texts]
    prefix = write_indexed(str(tmp_path / "sents"), [[s for s in d if s] for d in docs])
    expected = build_bert_datasets([json_path], None, None, "80,10,10", 24, 4, tok, False, None, seed=9,
                                   presplit_sentences=True)
    got = build_indexed_datasets([prefix], "80,10,10", 9, (10**5,) * 3, bert_member(24, 4, tok, 9), tok, gpt2=False,
                                 shuffle=False, cache_dir=str(tmp_path))
    for e, g in zip(expected, got, strict=True):
        member = g.datasets[0]
        assert len(member) == len(e)
        for i in range(0, len(e), 3):
            for key, value in e[i].items():
                np.testing.assert_array_equal(member[i][key], value, err_msg=key)


def test_bert_refuses_document_level_data(tmp_path):
    tok = IdTokenizer()
    prefix = write_indexed(str(tmp_path / "docs"), [[[5, 6, 7]], [[8, 9]]])
    with pytest.raises(DataError, match="--split-sentences"):
        build_indexed_datasets([prefix], "1", 9, (10, 0, 0), bert_member(24, 4, tok, 9), tok, gpt2=False,
                               cache_dir=str(tmp_path))


def test_pretrain_gpt2_from_a_blend_trains_resumes_exactly_and_refuses_bad_blends(tmp_path):
    import subprocess
    import sys

    import data_utils

    corpus = write_gpt2_corpus(tmp_path)
    args = gpt2_args(tmp_path)
    vocab, merges = args[args.index("--vocab-file") + 1], args[args.index("--merge-file") + 1]
    tok = data_utils.make_tokenizer("GPT2BPETokenizer", vocab, merges, str(tmp_path / "cache"))
    texts = list(data_utils.read_loose_json(corpus))
    prefixes = []
    for name, part in (("a", texts[:100]), ("b", texts[100:])):
        docs = [[tok.encode(t) + [tok.eod]] for t in part]
        prefixes.append(write_indexed(str(tmp_path / name), docs))
    blend = f"0.7 {prefixes[0]} 0.3 {prefixes[1]}"

    def argv(**extra):
        return gpt2_args(tmp_path, **{"--train-data": None, "--data-path": blend, "--resume-dataloader": True,
                                       **extra})

    def split_blend(a):  # --data-path takes several values
        i = a.index("--data-path")
        return a[:i + 1] + a[i + 1].split() + a[i + 2:]

    unbroken = str(tmp_path / "unbroken")
    run_distributed(train_gpt2, 1, split_blend(argv(**{"--log-dir": unbroken})))
    ckpt, resumed = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    run_distributed(train_gpt2, 1, split_blend(argv(**{"--save": ckpt, "--exit-interval": 10, "--log-dir": resumed})))
    run_distributed(train_gpt2, 1, split_blend(argv(**{"--save": ckpt, "--load": ckpt, "--log-dir": resumed})))
    expected, got = gpt2_losses(unbroken), gpt2_losses(resumed)
    assert sorted(got) == list(range(1, 21)) and got == expected
    assert expected[20] < expected[1]
    data_parallel = str(tmp_path / "dp2")  # the same global samples at data-parallel 2: the same losses
    run_distributed(train_gpt2, 2, split_blend(argv(**{"--log-dir": data_parallel, "--batch-size": 2})))
    for iteration, value in expected.items():
        assert gpt2_losses(data_parallel)[iteration] == pytest.approx(value, abs=1e-4), iteration
    bad = split_blend(gpt2_args(tmp_path, **{"--train-data": None, "--data-path": f"-1 {prefixes[0]} 2 {prefixes[1]}",
                                             "--train-iters": 2}))
    proc = subprocess.run([sys.executable, "pretrain_gpt2.py", *bad], cwd=REPO, capture_output=True, text=True)
    assert_one_line_error(proc.returncode, proc.stderr, "weights must be positive")
    os.remove(prefixes[1] + ".idx")
    proc = subprocess.run([sys.executable, "pretrain_gpt2.py", *split_blend(argv())], cwd=REPO, capture_output=True,
                          text=True)
    assert_one_line_error(proc.returncode, proc.stderr, "b.idx")


def _pretrain_gpt2(argv: list[str]) -> dict:
    import pretrain_gpt2
    from arguments import get_args

    results = pretrain_gpt2.run(get_args(argv))
    return {"valid": {k: float(v) for k, v in results["valid"].items()}}


REAL_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cache")


@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_CACHE, "shakespeare.json")),
                    reason="needs the real sample corpus and GPT-2 vocabulary (tools/fetch_sample_data.py)")
def test_the_sample_corpus_preprocessed_reads_back_token_for_token_and_trains(tmp_path):
    from data_utils import IndexedDataset, make_tokenizer
    from data_utils.lazy_loader import load_corpus
    from tools.preprocess_data import preprocess

    corpus = os.path.join(REAL_CACHE, "shakespeare.json")
    kwargs = {"tokenizer_type": "GPT2BPETokenizer", "cache_dir": REAL_CACHE}
    preprocess([corpus], kwargs, str(tmp_path / "shakespeare"), append_eod=True, workers=2, progress=False)
    ds = IndexedDataset(str(tmp_path / "shakespeare_text_document"))
    tok = make_tokenizer(**kwargs)
    direct = load_corpus(corpus, tok, lazy=True, cache_dir=str(tmp_path / "cache"))
    assert ds.num_documents == len(direct) and ds.dtype == np.uint16
    for d in range(len(direct)):
        np.testing.assert_array_equal(ds.document(d), np.append(direct[d], tok.eod))
    argv = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "64",
            "--max-position-embeddings", "64", "--batch-size", "2", "--train-iters", "3", "--eval-iters", "1",
            "--eval-interval", "3", "--data-path", str(tmp_path / "shakespeare_text_document"), "--split", "98,1,1",
            "--cache-dir", REAL_CACHE, "--data-cache-path", str(tmp_path / "indices"), "--num-workers", "0"]
    results = run_distributed(_pretrain_gpt2, 1, argv)[0]
    assert np.isfinite(results["valid"]["lm_loss"])


def test_pretrain_bert_from_a_sentence_level_blend_trains_and_resumes_exactly(tmp_path):
    from tools.preprocess_data import preprocess

    argv = bert_args(tmp_path)
    corpus, vocab = argv[argv.index("--train-data") + 1], argv[argv.index("--vocab-file") + 1]
    kwargs = {"tokenizer_type": "BertWordPieceTokenizer", "vocab_file": vocab, "cache_dir": str(tmp_path / "cache")}
    preprocess([corpus], kwargs, str(tmp_path / "a"), presplit=True, progress=False)
    preprocess([corpus], kwargs, str(tmp_path / "b"), presplit=True, progress=False)
    blend = ["0.6", str(tmp_path / "a_text_sentence"), "0.4", str(tmp_path / "b_text_sentence")]
    common = {"--train-data": None, "--data-path": blend, "--resume-dataloader": True}
    unbroken = str(tmp_path / "unbroken")
    run_distributed(train_bert, 1, bert_args(tmp_path, **common, **{"--log-dir": unbroken}))
    ckpt, resumed = str(tmp_path / "ckpt"), str(tmp_path / "resumed")
    run_distributed(train_bert, 1, bert_args(tmp_path, **common, **{"--save": ckpt, "--exit-interval": 10,
                                                                    "--log-dir": resumed}))
    run_distributed(train_bert, 1, bert_args(tmp_path, **common, **{"--save": ckpt, "--load": ckpt,
                                                                    "--log-dir": resumed}))
    expected, got = bert_losses(unbroken), bert_losses(resumed)
    assert sorted(got) == list(range(1, 21)) and got == expected


def test_trailing_eod_is_found_by_a_sample_and_a_mixed_sample_checks_every_document(tmp_path, monkeypatch):
    import data_utils.blending as blending
    from data_utils import IndexedDataset

    tok = ByteTokenizer()
    docs = [[tok.encode(t) + [tok.eod]] for t in numbered_texts(50, "a")] + [[[]]]
    ds = IndexedDataset(write_indexed(str(tmp_path / "all"), docs))
    lengths = blending._document_lengths(ds)
    np.testing.assert_array_equal(blending._ends_with(ds, lengths, tok.eod, sample=5), lengths > 0)
    mixed = [[tok.encode(t) + ([tok.eod] if i != 37 else [])] for i, t in enumerate(numbered_texts(50, "a"))]
    ds = IndexedDataset(write_indexed(str(tmp_path / "mixed"), mixed))
    lengths = blending._document_lengths(ds)
    expected = np.arange(50) != 37
    np.testing.assert_array_equal(blending._ends_with(ds, lengths, tok.eod, sample=50), expected)  # sample sees it
    got = blending._ends_with(ds, lengths, tok.eod, sample=5)  # a sample of 5 misses doc 37: all are taken to end
    np.testing.assert_array_equal(got, np.ones(50, dtype=bool))
    np.testing.assert_array_equal(blending._ends_with(ds, lengths, 7, sample=5), np.zeros(50, dtype=bool))


def test_the_training_loop_reads_a_presampled_blend_in_its_own_order(single_process_group):
    import argparse

    from restore import TrainState
    from training import build_data_iterators

    blend = BlendedDataset([[{"text": np.array([i])} for i in range(10)]], np.zeros(40, dtype=np.int16),
                           np.arange(40) % 10)
    args = argparse.Namespace(micro_batch_size=4, eval_batch_size=None, seed=1, num_workers=0, shuffle=True,
                              eval_iters=0)
    state = TrainState()
    train, _, _ = build_data_iterators(args, (blend, None, None), state)
    first = [next(train)["text"].flatten().tolist() for _ in range(3)]
    assert first == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]  # not reshuffled by the sampler
    plain = [{"text": np.array([i])} for i in range(40)]
    train, _, _ = build_data_iterators(args, (plain, None, None), state)
    assert next(train)["text"].flatten().tolist() != [0, 1, 2, 3]  # an ordinary dataset is shuffled


# --- the blend's key order and its per-(split, dataset) shuffles ------------------------------------------------------
# Rules the tests above left open, each found by injecting a bug that they missed.

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


# --- eod handling of indexed documents, the index caches and the vocabulary checks ------------------------------------
# Rules the tests above left open, each found by injecting a bug that they missed.

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
