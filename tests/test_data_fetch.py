"""tools/fetch_sample_data.py offline: rank table -> GPT-2 files, corpus cutting; real outputs if present."""

from __future__ import annotations

import base64
import importlib.util
import json
import os

import pytest

from data_utils.tokenization import make_tokenizer
from tests.test_data_common import REAL_CACHE, REPO, gpt2_byte_chars

spec = importlib.util.spec_from_file_location("fetch_sample_data", os.path.join(REPO, "tools", "fetch_sample_data.py"))
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)


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
