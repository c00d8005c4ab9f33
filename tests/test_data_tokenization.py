"""Tokenizers: GPT-2 byte-level BPE on standard files, lookup in the cache folder, errors.

The BERT-side tokenizers are tested in test_bert_tokenizers.py."""

from __future__ import annotations

import os

import pytest

from data_utils.errors import DataError
from data_utils.tokenization import BertWordPieceTokenizer, make_tokenizer
from tests.helpers import REAL_CACHE, gpt2_byte_chars, write_tiny_gpt2


def test_tiny_gpt2_encodes_with_its_merges(tmp_path):
    vocab, merges = write_tiny_gpt2(str(tmp_path))
    tok = make_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    byte_id = {c: i for i, c in enumerate(gpt2_byte_chars())}
    assert tok.encode(" the") == [258]  # Ġ t -> Ġt (256), h e -> he (257), Ġt he -> Ġthe (258)
    # he ll o Ġw or l d, with the byte tokens at GPT-2's ids ('o' is 78 there too)
    assert tok.encode("hello world") == [257, 259, 78, 260, 261, byte_id["l"], byte_id["d"]]
    assert tok.vocab_size == 263 and tok.eod == 262 and tok.name == "GPT2BPETokenizer"
    text = "héllo, wörld!\n\tthe end"
    assert tok.decode(tok.encode(text)) == text


def test_cache_dir_lookup_uses_documented_names(tmp_path):
    write_tiny_gpt2(str(tmp_path), "gpt2-vocab.json", "gpt2-merges.txt")
    tok = make_tokenizer("GPT2BPETokenizer", cache_dir=str(tmp_path))
    assert tok.encode(" the") == [258]


def test_identity_follows_file_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_tokenizer("GPT2BPETokenizer", *write_tiny_gpt2(str(tmp_path / "a")))
    b = make_tokenizer("GPT2BPETokenizer", *write_tiny_gpt2(str(tmp_path / "b"), merges=[("h", "e")]))
    a2 = make_tokenizer("GPT2BPETokenizer", *write_tiny_gpt2(str(tmp_path / "b")))
    assert a.identity != b.identity
    assert a.identity == a2.identity


def test_missing_files_name_the_paths_and_the_fetch_command(tmp_path):
    with pytest.raises(DataError) as err:
        make_tokenizer("GPT2BPETokenizer", cache_dir=str(tmp_path))
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "gpt2-vocab.json") in msg
    assert "python tools/fetch_sample_data.py --cache-dir DIR" in msg and "\n" not in msg
    with pytest.raises(DataError, match="nothing"):
        make_tokenizer("GPT2BPETokenizer")
    vocab, _ = write_tiny_gpt2(str(tmp_path))
    with pytest.raises(DataError, match="no-such-merges.txt"):
        make_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=str(tmp_path / "no-such-merges.txt"))


def test_unreadable_vocab_is_a_data_error(tmp_path):
    vocab, merges = write_tiny_gpt2(str(tmp_path))
    with open(vocab, "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match="cannot read GPT-2 vocabulary"):
        make_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)


def test_unknown_tokenizer_type_lists_known_ones():
    with pytest.raises(DataError) as err:
        make_tokenizer("SentencePieceTokenizerX")
    msg = str(err.value)
    assert msg.startswith("unknown tokenizer type 'SentencePieceTokenizerX'") and "\n" not in msg
    assert msg.count("Tokenizer") == 5  # the unknown name and the four known types
    for known in ("GPT2BPETokenizer", "BertWordPieceTokenizer", "SentencePieceTokenizer,", "CharacterLevelTokenizer"):
        assert known in msg


def test_bert_wordpiece_from_vocab_txt(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s", ","]
    (tmp_path / "bert-uncased-vocab.txt").write_text("\n".join(words) + "\n")
    tok = make_tokenizer("BertWordPieceTokenizer", cache_dir=str(tmp_path))
    assert isinstance(tok, BertWordPieceTokenizer)
    assert tok.encode("Hello, Worlds") == [5, 8, 6, 7]
    assert (tok.eod, tok.cls, tok.mask, tok.pad, tok.vocab_size) == (3, 2, 4, 0, 9)


@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_CACHE, "gpt2-vocab.json")),
                    reason="real GPT-2 files absent; run python tools/fetch_sample_data.py --cache-dir cache")
def test_real_gpt2_vocabulary_matches_openai_ids():
    tok = make_tokenizer("GPT2BPETokenizer", cache_dir=REAL_CACHE)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262] and tok.encode("\n") == [198]
    assert tok.vocab_size == 50257 and tok.eod == 50256
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
