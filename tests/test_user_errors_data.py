"""User mistakes and accidents on the data path: caches that lie, messages that mislead.

Classes 4 and 5 of issue 14: a damaged token cache is detected and rebuilt (never read as if whole),
temporaries of killed builds and saves are removed by the next run that uses the folder (and only
those whose writer is gone), an empty corpus names its file, the merges and vocabulary errors give
the file's own line, the fetch tool says it left a foreign vocabulary alone, a split share that comes
to no documents warns, and json errors read as sentences.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from atomic import ORPHAN_IDLE_S, is_orphan, remove_orphans, temporary_path
from data_utils.datasets import build_gpt2_datasets
from data_utils.errors import DataError
from data_utils.lazy_loader import cache_fault, load_corpus, load_sentence_corpus
from tests.cli import assert_one_line_error
from tests.helpers import (
    ByteTokenizer,
    file_checksums,
    gpt2_args,
    load_tool,
    run_gpt2_main,
    write_jsonl,
    write_tiny_gpt2,
)

TEXTS = [f"document {i}. " + "It has words. " * (1 + i % 5) for i in range(40)]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("kind", ["documents", "sentences"])
@pytest.mark.parametrize("damage", ["truncate", "grow", "drop_offsets", "corrupt_meta"])
def test_a_damaged_token_cache_is_reported_and_rebuilt(tmp_path, capsys, kind, damage):
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    cache = str(tmp_path / "cache")
    load = (lambda: load_corpus(src, ByteTokenizer(), lazy=True, cache_dir=cache)) if kind == "documents" else \
        (lambda: load_sentence_corpus(src, ByteTokenizer(), lazy=True, cache_dir=cache))
    first = load()
    folder = first.folder
    truth = [np.asarray(first[i]).tolist() if kind == "documents" else [s.tolist() for s in first[i]]
             for i in range(len(first))]
    good = {name: _sha(os.path.join(folder, name)) for name in os.listdir(folder)}
    tokens = os.path.join(folder, "tokens.bin")
    offsets = os.path.join(folder, "offsets.npy" if kind == "documents" else "sentence_offsets.npy")
    if damage == "truncate":  # a copy that stopped early, a disk that filled
        os.truncate(tokens, os.path.getsize(tokens) - 7)
    elif damage == "grow":
        with open(tokens, "ab") as f:
            f.write(b"\0\0")
    elif damage == "drop_offsets":
        os.remove(offsets)
    else:
        with open(os.path.join(folder, "meta.json"), "w") as f:
            f.write("{")
    assert cache_fault(folder) is not None
    capsys.readouterr()
    again = load()
    err = capsys.readouterr().err
    assert f"token cache {folder} is damaged" in err and "rebuilding it" in err
    assert again.folder == folder and cache_fault(folder) is None
    assert {name: _sha(os.path.join(folder, name)) for name in os.listdir(folder)} == good
    rebuilt = [np.asarray(again[i]).tolist() if kind == "documents" else [s.tolist() for s in again[i]]
               for i in range(len(again))]
    assert rebuilt == truth
    assert [n for n in os.listdir(os.path.dirname(folder)) if n.startswith(".")] == []  # nothing left aside


def test_an_intact_cache_is_not_rebuilt(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    first = load_corpus(src, ByteTokenizer(), lazy=True, cache_dir=str(tmp_path))
    stamp = os.stat(os.path.join(first.folder, "tokens.bin")).st_mtime_ns
    capsys.readouterr()
    load_corpus(src, ByteTokenizer(), lazy=True, cache_dir=str(tmp_path))
    assert os.stat(os.path.join(first.folder, "tokens.bin")).st_mtime_ns == stamp
    assert "damaged" not in capsys.readouterr().err


def test_orphaned_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.json", TEXTS)
    cache = tmp_path / "cache"
    tokenized = cache / "tokenized"
    tokenized.mkdir(parents=True)
    here = os.path.basename(temporary_path(str(tokenized / "x"))).split(".")[2]  # this host, as named
    dead = tokenized / f".c.json.0123.{here}.{_dead_pid()}.partial"
    live = tokenized / f".c.json.0123.{here}.{os.getppid()}.partial"  # pytest's parent: alive
    stale_elsewhere = tokenized / ".c.json.0123.othernode.42.partial"
    fresh_elsewhere = tokenized / ".c.json.0123.othernode.43.partial"
    for folder in (dead, live, stale_elsewhere, fresh_elsewhere):
        folder.mkdir()
        (folder / "tokens.bin").write_bytes(b"\0" * 10)
    old = time.time() - ORPHAN_IDLE_S - 60
    for path in (stale_elsewhere, stale_elsewhere / "tokens.bin"):
        os.utime(path, (old, old))
    unrelated = tokenized / ".notes.partial"  # not one of ours: no host and pid
    unrelated.write_text("keep")
    load_corpus(src, ByteTokenizer(), lazy=True, cache_dir=str(cache))
    err = capsys.readouterr().err
    assert not dead.exists() and not stale_elsewhere.exists()
    assert live.exists() and fresh_elsewhere.exists() and unrelated.exists()
    assert f"removed {dead}" in err and f"removed {stale_elsewhere}" in err
    assert not is_orphan(str(live)) and remove_orphans(str(tokenized)) == []


def test_a_killed_save_is_cleaned_by_the_next_run_of_that_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    code, _, err = run_gpt2_main(gpt2_args(tmp_path, **{"--save": str(ckpt), "--train-iters": 2, "--eval-iters": 0}),
                                 capsys)
    assert code == 0, err
    rank_dir = ckpt / "iter_0000002" / "mp_rank_00"
    orphan = rank_dir / os.path.basename(temporary_path(str(rank_dir / "model_optim_rng.pt"))).replace(
        f".{os.getpid()}.", f".{_dead_pid()}.")
    orphan.write_bytes(b"half a checkpoint")
    tracker_orphan = ckpt / os.path.basename(temporary_path(str(ckpt / "latest_checkpointed_iteration.txt"))
                                             ).replace(f".{os.getpid()}.", f".{_dead_pid()}.")
    tracker_orphan.write_text("3")
    code, out, err = run_gpt2_main(gpt2_args(tmp_path, **{"--save": str(ckpt), "--load": str(ckpt), "--train-iters": 3,
                                                          "--eval-iters": 0}), capsys)
    assert code == 0, err
    assert not orphan.exists() and not tracker_orphan.exists()
    assert f"removed {orphan}" in out and "killed" in out
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_an_empty_corpus_names_its_file(tmp_path, capsys):
    empty, blank, texts = tmp_path / "empty.json", tmp_path / "blank.json", tmp_path / "texts.json"
    empty.write_text("")
    blank.write_text("\n  \n\n")
    texts.write_text('{"text": ""}\n{"text": ""}\n')
    for path, what in ((empty, "is empty"), (blank, "holds only blank lines"), (texts, "empty texts")):
        for lazy in (False, True):
            cache = tmp_path / f"cache_{path.stem}_{lazy}"
            argv = gpt2_args(tmp_path, **{"--train-data": str(path), "--train-iters": 1, "--lazy-loader": lazy,
                                          "--cache-dir": str(cache)})
            code, _, err = run_gpt2_main(argv, capsys)
            assert_one_line_error(code, err, f"corpus {path}", what)
            assert "--train-data (and" not in err  # not the misleading "no training data"
    with pytest.raises(DataError, match="valid.json is empty"):
        (tmp_path / "valid.json").write_text("")
        build_gpt2_datasets([write_jsonl(tmp_path / "c.json", TEXTS)], [str(tmp_path / "valid.json")], None, "1",
                            8, ByteTokenizer(), False, None, seed=1)


def test_a_split_share_that_comes_to_no_documents_warns(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.json", TEXTS[:2])  # two documents cannot fill three splits
    train, valid, test = build_gpt2_datasets([src], None, None, "98,1,1", 8, ByteTokenizer(), False, None, seed=1)
    err = capsys.readouterr().err
    assert train is not None and valid is None and test is None
    assert "warning: --split 98,1,1 gives the valid split 1.0% of 2 documents, too few to leave it one" in err
    assert "there is no test data" in err and "--test-data" in err
    six = write_jsonl(tmp_path / "six.json", TEXTS[:6])  # enough: every non-zero share gets a document
    train, valid, test = build_gpt2_datasets([six], None, None, "98,1,1", 8, ByteTokenizer(), False, None, seed=1)
    assert len(valid.docs) == 1 and len(test.docs) == 1 and len(train.docs) == 4
    assert "warning" not in capsys.readouterr().err
    build_gpt2_datasets([src], None, None, "1", 8, ByteTokenizer(), False, None, seed=1)  # no share: no warning
    build_gpt2_datasets([src], [src], [src], "98,1,1", 8, ByteTokenizer(), False, None, seed=1)  # given whole
    assert "warning" not in capsys.readouterr().err


def test_merges_and_vocabulary_errors_give_the_files_own_line(tmp_path):
    from data_utils.tokenization import GPT2BPETokenizer

    vocab, merges = write_tiny_gpt2(str(tmp_path))
    lines = open(merges, encoding="utf-8").read().splitlines()
    assert lines[0].startswith("#version") and len(lines) > 4
    bad = tmp_path / "bad_merges.txt"
    bad.write_text("\n".join(lines[:3] + ["oneword"] + lines[4:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{bad}:4: expected two tokens separated by one space, found 'oneword'"):
        GPT2BPETokenizer(vocab, str(bad))
    foreign = tmp_path / "foreign_merges.txt"
    foreign.write_text("\n".join(lines[:2] + ["Ġ zzzz"] + lines[3:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{foreign}:3: 'zzzz' is not in the vocabulary .*do not belong together"):
        GPT2BPETokenizer(vocab, str(foreign))
    broken = tmp_path / "broken_vocab.json"
    broken.write_text('{"a": 0,\n"b": 1,\n"c"\n}', encoding="utf-8")
    with pytest.raises(DataError, match=rf"cannot read GPT-2 vocabulary {broken}: .*line 4: Expecting .:. delimiter"):
        GPT2BPETokenizer(str(broken), merges)


def test_json_errors_read_as_one_sentence(tmp_path):
    from data_utils.corpora import read_loose_json

    cases = {
        '{"text": "unterminated}\n': ("Unterminated string starting; column 10", " at at", " at;"),
        '{"text": "one",\n': ("the line ends early", "column 1)", "at at"),
        '{"text" "x"}\n': ("Expecting ':' delimiter; column 9", "at at", ""),
    }
    for i, (line, (wanted, *unwanted)) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.json"
        path.write_text('{"text": "fine"}\n' + line)
        with pytest.raises(DataError) as err:
            list(read_loose_json(str(path)))
        message = str(err.value)
        assert message.startswith(f"{path}:2: not valid JSON (") and wanted in message, message
        assert not any(u and u in message for u in unwanted), message


def _fetch(argv, capsys) -> tuple[int, str, str]:
    fetch = load_tool("fetch_sample_data")

    try:
        fetch.main(argv)
        code = 0
    except SystemExit as exit_:
        code = 0 if exit_.code is None else 1 if isinstance(exit_.code, str) else exit_.code
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fetch_tool_leaves_a_foreign_vocabulary_alone_and_says_how_to_replace_it(tmp_path, capsys):
    vocab, merges = write_tiny_gpt2(str(tmp_path), "gpt2-vocab.json", "gpt2-merges.txt")  # not GPT-2's
    before = file_checksums(str(tmp_path))
    code, _, err = _fetch(["--cache-dir", str(tmp_path), "--skip-bert"], capsys)  # fails before any download
    assert_one_line_error(code, err, f"{vocab} and {merges} are already there but are not GPT-2's vocabulary",
                          "left as they are", "--overwrite")
    assert file_checksums(str(tmp_path)) == before
    (tmp_path / "gpt2-merges.txt").write_text("#version: 0.2\nnot a merge line\n")
    code, _, err = _fetch(["--cache-dir", str(tmp_path), "--skip-bert"], capsys)
    assert_one_line_error(code, err, "gpt2-merges.txt:2: expected two tokens", "--overwrite")


def test_fetch_tool_checks_its_directories_first(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = _fetch(["--cache-dir", str(a_file)], capsys)
    assert_one_line_error(code, err, f"--cache-dir {a_file}: is a file, not a directory")
    code, _, err = _fetch(["--cache-dir", str(tmp_path / "ok"), "--out", str(a_file / "sub")], capsys)
    assert_one_line_error(code, err, f"--out {a_file / 'sub'}: cannot create the directory")
    assert a_file.read_text() == "x"
