"""tools/preprocess_data.py: loose json -> Megatron-Core indexed datasets, token for token, whatever the workers.

Documents must equal the project's tokenizer on each text (plus the end-of-document id with
--append-eod), sentences must equal the lazy sentence corpus's, any --workers must give the same bytes,
and a bad input must stop with one line and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_utils.errors import DataError
from data_utils.indexed_dataset import IndexedDataset
from data_utils.lazy_loader import load_sentence_corpus
from data_utils.tokenization import make_tokenizer
from errors import UserError
from tests.cli import assert_one_line_error
from tests.helpers import REPO, write_jsonl, write_tiny_gpt2, write_wordpiece_vocab
from tools import preprocess_data as pp

TEXTS = [
    "the weather is fine, the world is wide",
    "",
    "Hello world.\nA second line with ünïcödé and 東京.",
    "   ",  # GPT-2 has tokens for spaces: not empty
    "",
    *[f"document {i}: " + "the word " * (i % 7) + "ends here." for i in range(40)],
    "x" * 700,  # longer than the small chunks below
    "last one, no newline after it",
]
BERT_TEXTS = [
    "Hello world. The end! Hello again, world.",
    "",
    "The café.\n\nNaive world? The end.",
    "\x07\x08",  # only control characters: no token at all
    "Dr. Hello went to the world. Then the end.",
    *[f"hello {'world ' * (i % 4)}. the end {i}." for i in range(30)],
]


@pytest.fixture
def gpt2(tmp_path) -> dict:
    vocab, merges = write_tiny_gpt2(str(tmp_path))
    return {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": vocab, "merge_file": merges}


@pytest.fixture
def bert(tmp_path) -> dict:
    return {"tokenizer_type": "BertWordPieceTokenizer", "vocab_file": write_wordpiece_vocab(tmp_path / "vocab.txt")}


@pytest.fixture
def folders(tmp_path) -> tuple:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    return tmp_path / "in", tmp_path / "out"


def corpus(folder, texts=TEXTS, name="c.json", trailing_newline=True) -> str:
    path = write_jsonl(folder / name, texts)
    if not trailing_newline:
        with open(path, "rb+") as f:
            f.truncate(os.path.getsize(path) - 1)
    return path


def documents(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds.document(d).tolist() for d in range(ds.num_documents)]


def sequences_by_document(prefix: str) -> list[list[list[int]]]:
    ds = IndexedDataset(prefix)
    bounds = ds.document_indices
    return [[ds[s].tolist() for s in range(bounds[d], bounds[d + 1])] for d in range(ds.num_documents)]


def test_documents_are_the_tokenizer_ids_plus_eod_and_empty_ones_are_skipped(folders, gpt2, capsys, monkeypatch):
    src, out = folders
    path = corpus(src, trailing_newline=False)
    monkeypatch.setattr(pp, "CHUNK_BYTES", 64)  # about a document per chunk, so the log lines come on time
    summary = pp.preprocess([path], gpt2, str(out / "gpt"), append_eod=True, progress=False, log_interval=10)
    tok = make_tokenizer(**gpt2)
    expected = [tok.encode(t) + [tok.eod] for t in TEXTS if tok.encode(t)]
    prefix = str(out / "gpt_text_document")
    assert documents(prefix) == expected
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and len(ds) == ds.num_documents == len(TEXTS) - 2  # one sequence per document
    assert len(expected) == len(TEXTS) - 2
    stats = summary.keys["text"]
    assert (summary.records, stats.documents, stats.empty) == (len(TEXTS), len(TEXTS) - 2, 2)
    assert stats.tokens == ds.num_tokens == sum(map(len, expected)) and summary.bytes == os.path.getsize(path)
    assert capsys.readouterr().out.count("documents/s") == len(TEXTS) // 10
    assert sorted(os.listdir(out)) == ["gpt_text_document.bin", "gpt_text_document.idx"]

    pp.preprocess([path], gpt2, str(out / "plain"), progress=False)
    assert documents(str(out / "plain_text_document")) == [ids[:-1] for ids in expected]


def test_read_chunks_cuts_whole_lines_and_numbers_them(folders, monkeypatch):
    src, _ = folders
    path = corpus(src, trailing_newline=False)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    chunks = list(pp.read_chunks([path], chunk_bytes=100))
    assert len(chunks) > 10 and b"".join(c[2] for c in chunks) == b"\n".join(lines)
    for _, first, data in chunks:
        assert data.split(b"\n")[0] == lines[first - 1]
    assert all(c[2].endswith(b"\n") for c in chunks[:-1]) and (b"\n" + chunks[-1][2]).endswith(b"\n" + lines[-1])
    monkeypatch.setattr(pp, "CHUNK_BYTES", 64)
    assert [c[2] for c in pp.read_chunks([path])] == [c[2] for c in pp.read_chunks([path], 64)]


@pytest.mark.parametrize("split_sentences", [False, True])
def test_any_number_of_workers_writes_the_same_bytes(folders, gpt2, bert, monkeypatch, split_sentences):
    src, out = folders
    path = corpus(src, BERT_TEXTS + TEXTS)
    spec = bert if split_sentences else gpt2
    pp.preprocess([path], spec, str(out / "w0"), split_sentences=split_sentences, append_eod=True, progress=False)
    monkeypatch.setattr(pp, "CHUNK_BYTES", 128)  # many chunks, so the workers interleave
    for workers in (1, 2, 3):
        pp.preprocess([path], spec, str(out / f"w{workers}"), split_sentences=split_sentences, append_eod=True,
                      workers=workers, progress=False)
    level = "sentence" if split_sentences else "document"
    names = [f"w{n}_text_{level}.{ext}" for n in range(4) for ext in ("bin", "idx")]
    assert sorted(os.listdir(out)) == sorted(names)
    for ext in ("bin", "idx"):
        reference = (out / f"w0_text_{level}.{ext}").read_bytes()
        assert all((out / f"w{n}_text_{level}.{ext}").read_bytes() == reference for n in (1, 2, 3))


@pytest.mark.parametrize("presplit", [False, True])
def test_sentences_equal_the_lazy_sentence_corpus(folders, bert, presplit):
    src, out = folders
    path = corpus(src, BERT_TEXTS)
    tok = make_tokenizer(**bert)
    lazy = load_sentence_corpus(path, tok, lazy=False, presplit=presplit)
    expected = [[s.tolist() for s in lazy[d]] for d in range(len(lazy)) if lazy.num_sentences[d]]
    assert len(expected) == len(BERT_TEXTS) - 2 and max(map(len, expected)) >= 2  # several sentences somewhere

    summary = pp.preprocess([path], bert, str(out / "bert"), split_sentences=not presplit, presplit=presplit,
                            workers=2, progress=False)
    prefix = str(out / "bert_text_sentence")
    assert sequences_by_document(prefix) == expected
    assert summary.keys["text"].empty == 2 and summary.keys["text"].sequences == sum(map(len, expected))

    pp.preprocess([path], bert, str(out / "eod"), split_sentences=True, presplit=presplit, append_eod=True,
                  progress=False)
    with_eod = sequences_by_document(str(out / "eod_text_sentence"))
    assert with_eod == [doc[:-1] + [doc[-1] + [tok.sep]] for doc in expected]  # eod ends the last sentence


def test_several_files_globs_and_json_keys(folders, gpt2):
    src, out = folders
    rows = [{"text": t, "title": f"title {i}"} for i, t in enumerate(TEXTS)]
    for name, part in (("b.json", rows[20:]), ("a.json", rows[:20])):
        with open(src / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in part)
    inputs = pp.expand_inputs([str(src / "*.json")])
    assert inputs == [str(src / "a.json"), str(src / "b.json")]
    pp.preprocess(inputs, gpt2, str(out / "two"), json_keys=("text", "title"), progress=False)
    tok = make_tokenizer(**gpt2)
    assert documents(str(out / "two_text_document")) == [tok.encode(t) for t in TEXTS if tok.encode(t)]
    assert documents(str(out / "two_title_document")) == [tok.encode(r["title"]) for r in rows]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_malformed_line_names_file_and_line_and_leaves_nothing(folders, gpt2, monkeypatch, workers):
    src, out = folders
    path = corpus(src)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"text": "fine"}\n\n{"text": "cut short\n')
    bad_line = len(TEXTS) + 3
    monkeypatch.setattr(pp, "CHUNK_BYTES", 256)
    with pytest.raises(DataError) as err:
        pp.preprocess([path], gpt2, str(out / "bad"), workers=workers, progress=False)
    assert str(err.value).startswith(f"{path}:{bad_line}: not valid JSON") and "\n" not in str(err.value)
    assert os.listdir(out) == []


@pytest.mark.parametrize("case, words", [
    ("missing key", ["c.json:1: no key 'body'", "--json-keys"]),
    ("all empty", ["no tokens under key 'text'", "nothing written"]),
    ("no output folder", ["--output-prefix", "does not exist"]),
    ("missing input", ["cannot open corpus", "nope.json", "--input"]),
    ("glob without match", ["matches no file"]),
    ("folder input", ["is a folder"]),
    ("existing output", ["keep_text_document.bin: already exists", "--overwrite"]),
])
def test_user_mistakes_raise_one_line_and_write_nothing(folders, gpt2, case, words):
    src, out = folders
    path = corpus(src, ["", ""] if case == "all empty" else TEXTS)
    flags = ["--vocab-file", gpt2["vocab_file"], "--merge-file", gpt2["merge_file"], "--no-progress"]
    argv = {"missing key": ["--input", path, "--json-keys", "body"],
            "all empty": ["--input", path],
            "no output folder": ["--input", path, "--output-prefix", str(out / "sub" / "x")],
            "missing input": ["--input", str(src / "nope.json")],
            "glob without match": ["--input", str(src / "*.jsonl")],
            "folder input": ["--input", str(src)],
            "existing output": ["--input", path, "--output-prefix", str(out / "keep")]}[case]
    if "--output-prefix" not in argv:
        argv += ["--output-prefix", str(out / "x")]
    if case == "existing output":
        pp.main(argv + flags)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(UserError) as err:  # a DataError, or an ArgumentError for the output
        pp.main(argv + flags)
    for word in words:
        assert word in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    if case == "existing output":
        pp.main(argv + flags + ["--force", "--append-eod"])
        assert documents(str(out / "keep_text_document"))[0][-1] == make_tokenizer(**gpt2).eod


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_command_line_summary_and_errors(folders, gpt2):
    src, out = folders
    path = corpus(src)
    flags = ["--vocab-file", gpt2["vocab_file"], "--merge-file", gpt2["merge_file"], "--output-prefix",
             str(out / "cli"), "--workers", "2"]
    run = _cli("--input", path, *flags)
    assert run.returncode == 0, run.stderr
    for word in (f"{len(TEXTS) - 2} documents (2 empty skipped)", f"{len(TEXTS) - 2} sequences", "tokens",
                 "documents/s", "MB/s"):
        assert word in run.stdout, run.stdout
    made = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert sorted(made) == ["cli_text_document.bin", "cli_text_document.idx"]

    again = _cli("--input", path, *flags)
    assert_one_line_error(again.returncode, again.stderr, "cli_text_document.bin: already exists", "--overwrite")
    with open(path, "a", encoding="utf-8") as f:
        f.write("[1, 2]\n")
    bad = _cli("--input", path, *flags, "--force")
    assert_one_line_error(bad.returncode, bad.stderr, f"{path}:{len(TEXTS) + 1}: expected a json object")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == made  # untouched, no temporaries
