"""The BERT-side tokenizers: WordPiece (cased/uncased, against transformers), SentencePiece, bytes."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import sentencepiece as spm

from data_utils.errors import DataError
from data_utils.tokenization import (
    SPM_MAX_SENTENCES,
    BertWordPieceTokenizer,
    CharacterLevelTokenizer,
    SentencePieceTokenizer,
    make_tokenizer,
)
from tests.distributed import run_distributed
from tests.helpers import REAL_CACHE, SMALL_WORDPIECE_VOCAB, write_syllable_corpus, write_wordpiece_vocab

REAL_BERT_VOCAB = os.path.join(REAL_CACHE, "bert-uncased-vocab.txt")
MIXED_TEXT = "Héllo, World! Naïve café 東京 unbelievable don't qzxv\tTHE END."


def transformers_ids(vocab_path: str, lower_case: bool, text: str) -> list[int]:
    """Ids from transformers' BertTokenizerFast on the same vocab.txt (no special tokens)."""
    transformers = pytest.importorskip("transformers")
    # transformers 5 ignores BertTokenizerFast(vocab_file=...) (all [UNK]); from_pretrained on a folder reads it
    folder = os.path.join(os.path.dirname(vocab_path), f"hf-{'lower' if lower_case else 'cased'}")
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(vocab_path, os.path.join(folder, "vocab.txt"))
    hf = transformers.BertTokenizerFast.from_pretrained(folder, do_lower_case=lower_case)
    return hf(text, add_special_tokens=False)["input_ids"]


# --- BertWordPieceTokenizer ---------------------------------------------------------------------


def test_wordpiece_uncased_and_cased_ids_match_transformers(tmp_path):
    vocab = write_wordpiece_vocab(tmp_path / "vocab.txt")
    uncased = make_tokenizer("BertWordPieceTokenizer", vocab_file=vocab, model_type="bert-base-uncased")
    cased = make_tokenizer("BertWordPieceTokenizer", vocab_file=vocab, model_type="bert-base-cased")
    # hello , world ! naive cafe 東 京 un ##believ ##able don ' t [UNK] the end .
    assert uncased.encode(MIXED_TEXT) == [5, 27, 6, 28, 7, 8, 20, 21, 22, 23, 24, 25, 30, 26, 1, 9, 10, 29]
    # H ##éllo , World ! Na ##ïve café 東 京 un ##believ ##able don ' t [UNK] THE E ##ND .
    assert cased.encode(MIXED_TEXT) == [11, 12, 27, 13, 28, 14, 15, 16, 20, 21, 22, 23, 24, 25, 30, 26, 1, 17, 18, 19,
                                        29]
    assert uncased.encode(MIXED_TEXT) == transformers_ids(vocab, True, MIXED_TEXT)
    assert cased.encode(MIXED_TEXT) == transformers_ids(vocab, False, MIXED_TEXT)


def test_wordpiece_special_ids_and_identity(tmp_path):
    reordered = ["zzz", *SMALL_WORDPIECE_VOCAB[5:], "[MASK]", "[SEP]", "[CLS]", "[PAD]", "[UNK]"]
    vocab = write_wordpiece_vocab(tmp_path / "vocab.txt", reordered)
    tok = BertWordPieceTokenizer(vocab)
    n = len(SMALL_WORDPIECE_VOCAB)  # the specials now sit at the end, [MASK] first: n - 4 .. n
    assert (tok.pad, tok.cls, tok.sep, tok.mask, tok.eod, tok.vocab_size) == (n - 1, n - 2, n - 3, n - 4, n - 3, n + 1)
    cased = BertWordPieceTokenizer(vocab, lower_case=False)
    other = BertWordPieceTokenizer(write_wordpiece_vocab(tmp_path / "other.txt", [*SMALL_WORDPIECE_VOCAB, "extra"]))
    assert len({tok.identity, cased.identity, other.identity}) == 3
    assert tok.identity == BertWordPieceTokenizer(write_wordpiece_vocab(tmp_path / "copy.txt", reordered)).identity


def test_wordpiece_cache_lookup_prefers_the_model_file_then_the_shared_one(tmp_path):
    write_wordpiece_vocab(tmp_path / "bert-uncased-vocab.txt")
    shared = make_tokenizer("BertWordPieceTokenizer", cache_dir=str(tmp_path), model_type="bert-large-uncased")
    write_wordpiece_vocab(tmp_path / "bert-large-uncased-vocab.txt", [*SMALL_WORDPIECE_VOCAB[:5], "world", "hello"])
    own = make_tokenizer("BertWordPieceTokenizer", cache_dir=str(tmp_path), model_type="bert-large-uncased")
    default = make_tokenizer("BertWordPieceTokenizer", cache_dir=str(tmp_path))
    assert (shared.encode("hello world"), own.encode("hello world"), default.encode("hello world")) == (
        [5, 6], [6, 5], [5, 6])
    write_wordpiece_vocab(tmp_path / "bert-cased-vocab.txt", [*SMALL_WORDPIECE_VOCAB[:5], "Hello", "hello"])
    cased = make_tokenizer("BertWordPieceTokenizer", cache_dir=str(tmp_path), model_type="bert-base-cased-whole-word")
    assert cased.encode("Hello hello") == [5, 6]


def test_wordpiece_from_a_hugging_face_folder_takes_its_vocabulary_and_casing(tmp_path):
    folders = {}
    for lower in (True, False, None):  # None: no tokenizer_config.json, so Hugging Face's default (lower-case)
        folder = tmp_path / f"hf-{lower}"
        folder.mkdir()
        write_wordpiece_vocab(folder / "vocab.txt")
        if lower is not None:
            (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower}))
        folders[lower] = make_tokenizer("BertWordPieceTokenizer", cache_dir=str(tmp_path / "elsewhere"),
                                        model_type=str(folder))
    assert folders[True].encode(MIXED_TEXT) == folders[None].encode(MIXED_TEXT) == \
        [5, 27, 6, 28, 7, 8, 20, 21, 22, 23, 24, 25, 30, 26, 1, 9, 10, 29]
    assert folders[False].encode(MIXED_TEXT)[:3] == [11, 12, 27]  # "H", "##éllo", ","
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty/vocab.txt"):
        make_tokenizer("BertWordPieceTokenizer", model_type=str(tmp_path / "empty"))


def test_wordpiece_missing_vocabulary_is_one_line_naming_paths_and_remedy(tmp_path):
    write_wordpiece_vocab(tmp_path / "bert-uncased-vocab.txt")
    with pytest.raises(DataError) as err:
        make_tokenizer("BertWordPieceTokenizer", cache_dir=str(tmp_path), model_type="bert-base-cased")
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "bert-base-cased-vocab.txt") in msg
    assert os.path.join(str(tmp_path), "bert-cased-vocab.txt") in msg
    assert "--vocab-file" in msg and "python tools/fetch_sample_data.py --cache-dir DIR" in msg and "\n" not in msg
    with pytest.raises(DataError) as err:  # multilingual models do not share the English vocabulary
        make_tokenizer("BertWordPieceTokenizer", cache_dir=str(tmp_path), model_type="bert-base-multilingual-uncased")
    assert "bert-base-multilingual-uncased-vocab.txt" in str(err.value)
    assert "bert-uncased-vocab.txt" not in str(err.value).split("; pass")[0]
    with pytest.raises(DataError, match="'cased' in it"):
        make_tokenizer("BertWordPieceTokenizer", cache_dir=str(tmp_path), model_type="bpe")


@pytest.mark.skipif(not os.path.isfile(REAL_BERT_VOCAB),
                    reason="real BERT vocabulary absent; run python tools/fetch_sample_data.py --cache-dir cache")
@pytest.mark.parametrize("model_type", ["bert-base-uncased", "bert-large-cased"])
def test_real_bert_vocabulary_matches_transformers(model_type, tmp_path):
    tok = make_tokenizer("BertWordPieceTokenizer", vocab_file=REAL_BERT_VOCAB, model_type=model_type)
    assert (tok.pad, tok.cls, tok.sep, tok.mask, tok.eod, tok.vocab_size) == (0, 101, 102, 103, 102, 30522)
    local = shutil.copyfile(REAL_BERT_VOCAB, tmp_path / "vocab.txt")
    ids = tok.encode(MIXED_TEXT)
    assert ids == transformers_ids(str(local), "uncased" in model_type, MIXED_TEXT)
    assert ids.count(100) < len(ids) // 2  # a vocabulary read as all-[UNK] would agree too
    if "uncased" in model_type:
        assert tok.encode("hello world") == [7592, 2088]


# --- SentencePieceTokenizer ---------------------------------------------------------------------

def count_training(monkeypatch) -> list[dict]:
    """Record the keyword arguments and the sentences of every sentencepiece training, then train."""
    calls, real = [], spm.SentencePieceTrainer.train

    def train(**kwargs):
        kwargs["sentence_iterator"] = iter(list(kwargs["sentence_iterator"]))
        calls.append({**kwargs, "sentences": list(kwargs["sentence_iterator"])})
        kwargs["sentence_iterator"] = iter(calls[-1]["sentences"])
        return real(**kwargs)

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", train)
    return calls


def test_sentencepiece_trains_once_then_reuses(tmp_path, monkeypatch, capsys):
    corpus = write_syllable_corpus(tmp_path / "corpus.json")
    calls = count_training(monkeypatch)
    path = str(tmp_path / "spm" / "tok.model")
    tok = make_tokenizer("SentencePieceTokenizer", tokenizer_path=path, vocab_size=200, train_files=[corpus])
    out = capsys.readouterr().out
    assert len(calls) == 1 and out.count("\n") == 1 and "trained" in out and path in out
    assert sorted(os.listdir(tmp_path / "spm")) == ["tok.model", "tok.vocab"]  # no temporary leftovers
    with open(corpus) as f:
        lines = [line.strip() for rec in f for line in json.loads(rec)["text"].splitlines() if line.strip()]
    assert calls[0]["sentences"] == lines and len(lines) == 300
    assert calls[0]["input_sentence_size"] == SPM_MAX_SENTENCES and calls[0]["shuffle_input_sentence"] is True
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 200
    assert (tok.pad, tok.cls, tok.sep, tok.mask, tok.eod) == (0, 2, 3, 4, 3)
    stamp = os.path.getmtime(path)
    again = make_tokenizer("SentencePieceTokenizer", tokenizer_path=path, vocab_size=300, train_files=[corpus])
    reuse = make_tokenizer("SentencePieceTokenizer", tokenizer_path=path)  # no training data needed to reuse
    assert len(calls) == 1 and capsys.readouterr().out == "" and os.path.getmtime(path) == stamp
    assert again.identity == reuse.identity == tok.identity and again.vocab_size == 200
    assert again.encode(lines[0]) == tok.encode(lines[0])


def test_sentencepiece_reserved_tokens_are_single_ids_that_encode_never_makes(tmp_path):
    tok = SentencePieceTokenizer(str(tmp_path / "tok"), [write_syllable_corpus(tmp_path / "c.json")], vocab_size=200)
    assert os.path.isfile(tmp_path / "tok.model") and os.path.isfile(tmp_path / "tok.vocab")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok.model"))
    assert [sp.id_to_piece(i) for i in (tok.pad, tok.cls, tok.sep, tok.mask)] == ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    text = "kato rimen [CLS] sa [SEP]lo [MASK] pe [PAD] dar ZZ 東"
    ids = tok.encode(text)
    assert not {tok.pad, tok.cls, tok.sep, tok.mask} & set(ids) and len(ids) > 8
    plain = "kato rimen sa lo pe dar."
    assert tok.decode(tok.encode(plain)) == plain
    assert tok.decode([tok.cls, *tok.encode(plain), tok.sep, tok.pad, tok.mask]) == plain
    assert tok.encode_batch([plain, text]) == [tok.encode(plain), ids]


@pytest.mark.parametrize("model_type", ["bpe", "unigram", "char", "word"])
def test_sentencepiece_model_types(tmp_path, model_type):
    corpus = write_syllable_corpus(tmp_path / "c.json")
    tok = make_tokenizer("SentencePieceTokenizer", tokenizer_path=str(tmp_path / "t.model"), vocab_size=100,
                         train_files=[corpus], model_type=model_type)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "t.model"))
    pieces = [sp.id_to_piece(i) for i in range(5, sp.get_piece_size())]
    scores = [sp.get_score(i) for i in range(5, sp.get_piece_size())]
    if model_type == "char":
        assert all(len(p) == 1 for p in pieces) and tok.vocab_size < 100
    elif model_type == "word":
        assert len(tok.encode("kato")) <= 2 and any(len(p) >= 6 for p in pieces)  # whole words are pieces
    else:
        assert any(len(p) > 1 for p in pieces) and tok.vocab_size == 100
        integral = all(s == int(s) for s in scores)
        assert integral == (model_type == "bpe")  # BPE scores are merge ranks, unigram ones log-probabilities


def test_sentencepiece_bad_requests_are_one_line_errors_and_leave_no_files(tmp_path):
    corpus = write_syllable_corpus(tmp_path / "c.json")
    folder = tmp_path / "spm"
    folder.mkdir()
    cases = [
        (dict(vocab_size=20), "Vocabulary size is smaller than required_chars.*--vocab-size"),
        (dict(vocab_size=100000), "Vocabulary size too high.*--vocab-size"),
        (dict(vocab_size=5), "vocabulary size above 5"),
        (dict(vocab_size=200, model_type="bert-base-uncased"), "bpe, unigram, char, word"),
        (dict(vocab_size=200, train_files=None), "no training data.*--train-data"),
        (dict(vocab_size=200, train_files=[str(tmp_path / "nope.json")]), "nope.json"),
    ]
    for kwargs, pattern in cases:
        kwargs = {"train_files": [corpus], **kwargs}
        with pytest.raises(DataError, match=pattern) as err:
            make_tokenizer("SentencePieceTokenizer", tokenizer_path=str(folder / "t.model"), **kwargs)
        assert "\n" not in str(err.value) and "t.model" in str(err.value)
        assert os.listdir(folder) == []
    with pytest.raises(DataError, match="got None"):
        SentencePieceTokenizer(str(folder / "t.model"), [corpus], vocab_size=None)


def test_sentencepiece_corpus_errors_keep_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"text": "kato rimen sa"}) + "\n{broken\n")
    with pytest.raises(DataError) as err:
        make_tokenizer("SentencePieceTokenizer", tokenizer_path=str(tmp_path / "t"), vocab_size=50,
                       train_files=[str(bad)])
    assert str(err.value).startswith(f"{bad}:2: not valid JSON")  # read_loose_json's own message, not wrapped
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"text": " \n\n "}) + "\n")
    with pytest.raises(DataError, match="no text in .*empty.json.*--text-key"):
        make_tokenizer("SentencePieceTokenizer", tokenizer_path=str(tmp_path / "t"), vocab_size=50,
                       train_files=[str(empty)])
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "empty.json"]


def test_sentencepiece_corrupt_or_foreign_model_is_a_data_error(tmp_path):
    corpus = write_syllable_corpus(tmp_path / "c.json")
    (tmp_path / "t.model").write_bytes(b"not a model" * 20)
    with pytest.raises(DataError, match="cannot load SentencePiece model .*t.model") as err:
        make_tokenizer("SentencePieceTokenizer", tokenizer_path=str(tmp_path / "t.model"), vocab_size=200,
                       train_files=[corpus])
    assert "\n" not in str(err.value)
    assert (tmp_path / "t.model").read_bytes() == b"not a model" * 20  # never retrained over
    with open(corpus) as f:
        lines = [json.loads(rec)["text"] for rec in f]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=100, minloglevel=2)
    with pytest.raises(DataError, match=r"lacks the reserved pieces \['\[PAD\]', '\[CLS\]', '\[SEP\]', '\[MASK\]'\]"):
        make_tokenizer("SentencePieceTokenizer", tokenizer_path=str(tmp_path / "plain.model"))


def _train_in_group(folder: str, corpus: str) -> list:
    """Per rank, three trainings in one group: (rank, ids of a line, trainings run here, identity) or the
    DataError text for each of: a good request, a vocabulary too large, a model rank 1 cannot see."""
    import torch.distributed as dist

    calls, real = [], spm.SentencePieceTrainer.train
    spm.SentencePieceTrainer.train = lambda **kw: calls.append(1) or real(**kw)
    isfile, hidden = os.path.isfile, os.path.join(folder, "hidden.model")
    if dist.get_rank() == 1:  # as if rank 1 ran on a node without rank 0's folder
        os.path.isfile = lambda p: p != hidden and isfile(p)
    results = []
    for name, vocab_size in (("t", 200), ("too-big", 100000), ("hidden", 200)):
        calls.clear()
        try:
            tok = make_tokenizer("SentencePieceTokenizer", tokenizer_path=os.path.join(folder, f"{name}.model"),
                                 vocab_size=vocab_size, train_files=[corpus])
            results.append((dist.get_rank(), tok.encode("kato rimen sa lo pe dar."), len(calls), tok.identity))
        except DataError as exc:
            results.append("DataError: " + str(exc))
    return results


def test_sentencepiece_rank_0_trains_while_rank_1_waits_and_hears_of_failures(tmp_path):
    corpus = write_syllable_corpus(tmp_path / "c.json")
    rank0, rank1 = run_distributed(_train_in_group, 2, str(tmp_path), corpus, timeout=120)
    (r0, ids0, calls0, id0), (r1, ids1, calls1, id1) = rank0[0], rank1[0]
    assert (r0, r1, calls0, calls1) == (0, 1, 1, 0)
    assert ids0 == ids1 and id0 == id1 and len(ids0) > 3
    assert rank0[1].startswith("DataError: cannot train") and "Vocabulary size too high" in rank0[1]
    assert rank1[1].startswith("DataError: rank 0 failed") and "Vocabulary size too high" in rank1[1]
    assert not os.path.exists(tmp_path / "too-big.model")
    assert rank0[2][0] == 0 and rank0[2][2] == 1
    hidden = str(tmp_path / "hidden.model")
    assert rank1[2] == f"DataError: rank 0 has SentencePiece model {hidden} but rank 1 cannot see it; put " \
                       "--tokenizer-path on a filesystem every node shares"


# --- CharacterLevelTokenizer --------------------------------------------------------------------


def test_character_level_is_utf8_bytes_then_specials():
    tok = make_tokenizer("CharacterLevelTokenizer")
    assert isinstance(tok, CharacterLevelTokenizer)
    assert tok.encode("hé 東") == [104, 195, 169, 32, 230, 157, 177]
    assert (tok.pad, tok.cls, tok.sep, tok.mask, tok.eod, tok.vocab_size) == (256, 257, 258, 259, 258, 260)
    assert tok.decode([tok.cls, *tok.encode("hé 東"), tok.sep, tok.mask, tok.pad]) == "hé 東"
    assert tok.decode(tok.encode("ab")[:1] + [0xE6]) == "a\ufffd"  # a cut multi-byte character is replaced
