"""The lazy cache: built once, reused, rebuilt on change, atomic, built by one rank only."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from data_utils.errors import DataError
from data_utils.lazy_loader import InMemoryCorpus, LazyCorpus, cache_folder, load_corpus
from tests.distributed import run_distributed
from tests.helpers import ByteTokenizer, write_jsonl

TEXTS = ["first document", "", "third, with ünïcode", "x" * 300]


def file_mtimes(folder: str) -> dict[str, int]:
    return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}


def test_lazy_cache_built_once_and_reused(tmp_path):
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    tok = ByteTokenizer()
    corpus = load_corpus(src, tok, lazy=True, cache_dir=str(tmp_path / "cache"))
    assert isinstance(corpus, LazyCorpus) and tok.calls == len(TEXTS)
    assert [bytes(corpus[i].tolist()).decode() for i in range(len(corpus))] == TEXTS
    assert isinstance(corpus.tokens, np.memmap) and corpus.tokens.dtype == np.uint16
    before = file_mtimes(corpus.folder)
    again = load_corpus(src, tok, lazy=True, cache_dir=str(tmp_path / "cache"))
    assert tok.calls == len(TEXTS)  # nothing tokenized the second time
    assert again.folder == corpus.folder and file_mtimes(again.folder) == before
    assert sorted(os.listdir(tmp_path / "cache" / "tokenized")) == [os.path.basename(corpus.folder)]


def test_lazy_matches_in_memory(tmp_path):
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    lazy = load_corpus(src, ByteTokenizer(), lazy=True, cache_dir=str(tmp_path))
    memory = load_corpus(src, ByteTokenizer(), lazy=False)
    assert isinstance(memory, InMemoryCorpus)
    assert lazy.lengths.tolist() == memory.lengths.tolist() == [len(t.encode()) for t in TEXTS]
    assert lazy.num_tokens == memory.num_tokens
    for i in range(len(TEXTS)):
        np.testing.assert_array_equal(lazy[i], memory[i])


def test_changed_source_or_tokenizer_rebuilds(tmp_path):
    cache = str(tmp_path / "cache")
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    first = load_corpus(src, ByteTokenizer(), lazy=True, cache_dir=cache)
    write_jsonl(tmp_path / "c.json", TEXTS + ["appended"])
    tok = ByteTokenizer()
    grown = load_corpus(src, tok, lazy=True, cache_dir=cache)
    assert tok.calls == len(TEXTS) + 1 and grown.folder != first.folder
    assert bytes(grown[len(TEXTS)].tolist()) == b"appended"
    same_size = TEXTS[:-1] + ["y" * 300, "appended"]  # same bytes count, new content and mtime
    write_jsonl(tmp_path / "c.json", same_size)
    stat = os.stat(src)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    edited = load_corpus(src, ByteTokenizer(), lazy=True, cache_dir=cache)
    assert edited.folder not in (first.folder, grown.folder) and bytes(edited[3].tolist()) == b"y" * 300
    other_tok = load_corpus(src, ByteTokenizer(tag="v2"), lazy=True, cache_dir=cache)
    assert other_tok.folder != edited.folder


def test_wide_vocabulary_uses_uint32(tmp_path):
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    corpus = load_corpus(src, ByteTokenizer(vocab_size=70000), lazy=True, cache_dir=str(tmp_path))
    assert corpus.tokens.dtype == np.uint32
    assert bytes(corpus[2].tolist()).decode() == TEXTS[2]


def test_failed_build_leaves_no_cache(tmp_path):
    src = tmp_path / "c.json"
    src.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"c.json:2: not valid JSON"):
        load_corpus(str(src), ByteTokenizer(), lazy=True, cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache" / "tokenized") == []


def test_lazy_needs_cache_dir_and_existing_source(tmp_path):
    for lazy in (True, False):
        with pytest.raises(DataError, match="c.json: no such file"):
            load_corpus(str(tmp_path / "c.json"), ByteTokenizer(), lazy=lazy, cache_dir=str(tmp_path))
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    with pytest.raises(DataError, match="--cache-dir"):
        load_corpus(src, ByteTokenizer(), lazy=True, cache_dir=None)


class AppendingTokenizer(ByteTokenizer):
    """Appends to the corpus while it is being tokenized, as a still-running writer would."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def encode(self, text: str) -> list[int]:
        with open(self.path, "a") as f:
            f.write('{"text": "late"}\n')
        return super().encode(text)


def test_source_changing_during_build_is_not_cached(tmp_path):
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    with pytest.raises(DataError, match="changed while it was being tokenized"):
        load_corpus(src, AppendingTokenizer(src), lazy=True, cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache" / "tokenized") == []


def test_pickled_lazy_corpus_reopens_the_map(tmp_path):
    src = write_jsonl(tmp_path / "c.json", ["a" * 5000])
    corpus = load_corpus(src, ByteTokenizer(), lazy=True, cache_dir=str(tmp_path))
    assert corpus[0].size == 5000
    blob = pickle.dumps(corpus)
    assert len(blob) < 2000  # the tokens stay on disk
    np.testing.assert_array_equal(pickle.loads(blob)[0], corpus[0])


def _load_on_rank(src: str, cache: str):
    import torch.distributed as dist

    tok = ByteTokenizer()
    try:
        corpus = load_corpus(src, tok, lazy=True, cache_dir=cache)
    except DataError as exc:
        return dist.get_rank(), "error", str(exc)
    return dist.get_rank(), tok.calls, corpus.folder, corpus.lengths.tolist()


def test_first_rank_builds_while_the_other_waits(tmp_path):
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    cache = str(tmp_path / "cache")
    results = run_distributed(_load_on_rank, 2, src, cache)
    folder = cache_folder(src, ByteTokenizer(), cache)
    lengths = [len(t.encode()) for t in TEXTS]
    assert results == [(0, len(TEXTS), folder, lengths), (1, 0, folder, lengths)]

    bad = tmp_path / "bad.json"
    bad.write_text('{"txt": "x"}\n')
    results = run_distributed(_load_on_rank, 2, str(bad), cache)
    assert results[0][1:] == ("error", f"{bad}:1: no key 'text' (keys present: 'txt'); pass --text-key with the "
                                       "right key")
    assert results[1][1] == "error" and results[1][2].startswith("rank 0 failed to build the cache: ")
