"""What the data path hands the model, and when a token cache may be reused (issue 15, class 5).

Guards: GPT2 samples hold exactly the real tokenizer's ids with its real end-of-document id between
documents (a GPT-2 BPE vocabulary whose ``<|endoftext|>`` is neither 0 nor the last id, so neither a
placeholder nor ``vocab_size - 1`` passes), in memory and through the lazy cache, and the GPT2 forward
step restarts positions and attention at that id. A tokenizer's ``identity``, which keys the lazy
token cache, changes when any file it reads changes: the GPT-2 merges (with the vocabulary byte for
byte the same) as well as the vocabulary, the BERT WordPiece vocabulary rewritten in place, the
SentencePiece model (with its ``.vocab`` untouched); and a lazy corpus is re-tokenized, not served
stale, after the merges change in place.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_utils import build_gpt2_datasets
from data_utils.lazy_loader import cache_folder, load_corpus
from data_utils.tokenization import GPT2_EOD_TOKEN, make_tokenizer
from tests.helpers import (
    SMALL_WORDPIECE_VOCAB,
    TINY_MERGES,
    gpt2_byte_chars,
    write_jsonl,
    write_syllable_corpus,
    write_wordpiece_vocab,
)

EOD = 256  # right after the byte tokens, before the merges: not 0 and not vocab_size - 1
TEXTS = ["the cat", "hello world", "", "or the", "the world the world", "he"]


def write_gpt2_files(folder, merges=TINY_MERGES, vocab_merges=TINY_MERGES, swap=None) -> tuple[str, str]:
    """A GPT-2 vocab.json/merges.txt pair with ``<|endoftext|>`` at id 256 and the merged tokens after it.

    ``merges`` go to merges.txt; the vocabulary holds the tokens of ``vocab_merges`` (so the merges can
    change while vocab.json stays byte for byte the same); ``swap`` exchanges the ids of two tokens.
    """
    os.makedirs(folder, exist_ok=True)
    tokens = gpt2_byte_chars() + [GPT2_EOD_TOKEN] + [a + b for a, b in vocab_merges]
    ids = {tok: i for i, tok in enumerate(tokens)}
    if swap is not None:
        a, b = swap
        ids[a], ids[b] = ids[b], ids[a]
    vocab, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab, "w", encoding="utf-8") as f:
        json.dump(ids, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab, merges_path


@pytest.mark.parametrize("lazy", [False, True])
def test_gpt2_samples_hold_the_real_ids_and_the_real_end_of_document_id(tmp_path, lazy):
    tok = make_tokenizer("GPT2BPETokenizer", *write_gpt2_files(str(tmp_path / "tok")))
    assert tok.eod == EOD and tok.vocab_size == 263
    corpus = write_jsonl(str(tmp_path / "corpus.json"), TEXTS)
    train, valid, test = build_gpt2_datasets([corpus], None, None, "1", 4, tok, lazy, str(tmp_path / "cache"), 3)
    assert valid is None and test is None
    stream = [i for text in TEXTS for i in [*tok.encode(text), EOD]]
    assert tok.encode("the cat") == [83, 258, 220, 66, 64, 83]  # t he Ġ c a t: byte and merged ids
    assert len(train) == (len(stream) - 1) // 4
    for i in range(len(train)):
        assert train[i]["text"].tolist() == stream[i * 4:i * 4 + 5], i
    assert stream.count(EOD) == len(TEXTS)
    joined = tok.decode([t for i in range(len(train)) for t in train[i]["text"].tolist()[:4]])
    assert joined.startswith("the cat<|endoftext|>hello world<|endoftext|><|endoftext|>or the")


def test_gpt2_forward_step_restarts_documents_at_the_tokenizers_end_of_document_id(single_process_group, tmp_path):
    import pretrain_gpt2

    tok = make_tokenizer("GPT2BPETokenizer", *write_gpt2_files(str(tmp_path / "tok")))
    args = SimpleNamespace(reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    forward_step = pretrain_gpt2.forward_step_provider(args, tok, torch.device("cpu"))
    text = torch.tensor([[258, 66, EOD, 259, 78, 262, EOD, 66, 64]])  # 262 is the last id: not the eod
    seen = {}

    def logits_of(tokens):
        logits = torch.zeros(*tokens.shape, 264)
        logits[0, :, 0] = torch.arange(tokens.shape[1], dtype=torch.float32)  # a different loss at each position
        return logits

    def model(tokens, position_ids, attention_mask):
        seen.update(positions=position_ids.tolist(), mask=attention_mask)
        return logits_of(tokens)

    loss, _ = forward_step({"text": text}, model)
    assert seen["positions"] == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert not seen["mask"][0, 0, 3, 2] and seen["mask"][0, 0, 2, 1] and not seen["mask"][0, 0, 7, 5]
    logits = logits_of(text[:, :-1])
    per_token = torch.nn.functional.cross_entropy(logits[0], text[0, 1:], reduction="none")
    keep = text[0, :-1] != EOD
    torch.testing.assert_close(loss, per_token[keep].mean())  # the loss skips the eod positions only


def test_gpt2_identity_changes_with_the_merges_alone_and_with_the_vocabulary_alone(tmp_path):
    base = make_tokenizer("GPT2BPETokenizer", *write_gpt2_files(str(tmp_path / "base")))
    fewer = write_gpt2_files(str(tmp_path / "fewer"), merges=TINY_MERGES[:-1])  # no "o r" merge
    swapped = write_gpt2_files(str(tmp_path / "swapped"), swap=("Ġthe", "ll"))
    copy = write_gpt2_files(str(tmp_path / "copy"))
    with open(fewer[0], "rb") as a, open(os.path.join(tmp_path, "base", "vocab.json"), "rb") as b:
        assert a.read() == b.read()  # only merges.txt differs
    with open(swapped[1], "rb") as a, open(os.path.join(tmp_path, "base", "merges.txt"), "rb") as b:
        assert a.read() == b.read()  # only vocab.json differs
    fewer_tok, swapped_tok = make_tokenizer("GPT2BPETokenizer", *fewer), make_tokenizer("GPT2BPETokenizer", *swapped)
    # Each change really changes the ids, so a cache keyed on the old identity would be stale.
    assert fewer_tok.encode("world") != base.encode("world")
    assert swapped_tok.encode("the hello") != base.encode("the hello")
    identities = {base.identity, fewer_tok.identity, swapped_tok.identity}
    assert len(identities) == 3
    assert make_tokenizer("GPT2BPETokenizer", *copy).identity == base.identity  # the contents, not the paths


def test_lazy_cache_is_rebuilt_when_the_merges_change_in_place(tmp_path):
    folder = str(tmp_path / "tok")
    files = write_gpt2_files(folder)
    corpus = write_jsonl(str(tmp_path / "corpus.json"), TEXTS)
    cache = str(tmp_path / "cache")
    first = make_tokenizer("GPT2BPETokenizer", *files)
    old = load_corpus(corpus, first, True, cache)
    assert [old[i].tolist() for i in range(len(TEXTS))] == [first.encode(t) for t in TEXTS]
    write_gpt2_files(folder, merges=TINY_MERGES[:-1])  # the same paths, the same vocab.json bytes
    second = make_tokenizer("GPT2BPETokenizer", *files)
    assert cache_folder(corpus, second, cache) != cache_folder(corpus, first, cache)
    new = load_corpus(corpus, second, True, cache)
    assert [new[i].tolist() for i in range(len(TEXTS))] == [second.encode(t) for t in TEXTS]
    assert new[3].tolist() != old[3].tolist()  # "or the": the stale cache would still hold the "or" token


def test_wordpiece_identity_changes_when_the_vocabulary_is_rewritten_in_place(tmp_path):
    path = write_wordpiece_vocab(tmp_path / "vocab.txt")
    before = make_tokenizer("BertWordPieceTokenizer", vocab_file=path)
    write_wordpiece_vocab(tmp_path / "vocab.txt", [*SMALL_WORDPIECE_VOCAB[:5], SMALL_WORDPIECE_VOCAB[6],
                                                   SMALL_WORDPIECE_VOCAB[5], *SMALL_WORDPIECE_VOCAB[7:]])
    after = make_tokenizer("BertWordPieceTokenizer", vocab_file=path)
    assert after.encode("hello world") != before.encode("hello world")  # hello and world swapped ids
    assert after.identity != before.identity


def test_sentencepiece_identity_follows_the_model_file(tmp_path):
    corpus = write_syllable_corpus(tmp_path / "corpus.json")
    a = make_tokenizer("SentencePieceTokenizer", tokenizer_path=str(tmp_path / "a.model"), vocab_size=60,
                       train_files=[corpus], model_type="char")
    b = make_tokenizer("SentencePieceTokenizer", tokenizer_path=str(tmp_path / "b.model"), vocab_size=80,
                       train_files=[corpus], model_type="bpe")
    shutil.copyfile(tmp_path / "a.model", tmp_path / "c.model")
    shutil.copyfile(tmp_path / "a.vocab", tmp_path / "c.vocab")
    c = make_tokenizer("SentencePieceTokenizer", tokenizer_path=str(tmp_path / "c.model"))
    assert c.identity == a.identity
    shutil.copyfile(tmp_path / "b.model", tmp_path / "c.model")  # the model replaced, its .vocab left as it was
    replaced = make_tokenizer("SentencePieceTokenizer", tokenizer_path=str(tmp_path / "c.model"))
    assert replaced.encode("kato rimen") == b.encode("kato rimen") != a.encode("kato rimen")
    assert replaced.identity != c.identity
    assert np.array_equal(np.fromfile(tmp_path / "c.vocab", dtype=np.uint8), np.fromfile(tmp_path / "a.vocab",
                                                                                          dtype=np.uint8))
