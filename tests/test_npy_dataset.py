"""The 2019 npy data path: openwebtext/make_gpt2_dataset.py writes shards + sizes, NpyShardsDataset reads them."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_utils import npy_dataset
from data_utils.errors import DataError
from data_utils.npy_dataset import NpyShardsDataset, build_npy_datasets
from data_utils.tokenization import GPT2BPETokenizer
from tests.cli import assert_one_line_error
from tests.helpers import REPO, ByteTokenizer, write_jsonl, write_tiny_gpt2

SCRIPT = os.path.join(REPO, "openwebtext", "make_gpt2_dataset.py")
TEXTS_A = [f"the world {i}: " + "hello there. " * (i % 4) for i in range(30)] + ["", "tail"]
TEXTS_B = ["Ünïcode ünd the wörld " * 3, "short", "the the the"]


def load_script():
    spec = importlib.util.spec_from_file_location("make_gpt2_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_gpt2_dataset"] = module  # --workers pickles its worker function by module name
    spec.loader.exec_module(module)
    return module


def run_script(argv: list[str], capsys) -> tuple[int, str, str]:
    code = load_script().main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def corpus(tmp_path):
    """Two loose-json inputs (one with a blank line) and a tiny GPT-2 vocabulary."""
    vocab, merges = write_tiny_gpt2(str(tmp_path))
    a = write_jsonl(tmp_path / "a.json", TEXTS_A)
    with open(a, "a", encoding="utf-8") as f:
        f.write("\n")
    b = write_jsonl(tmp_path / "b.jsonl", TEXTS_B)
    return {"a": a, "b": b, "vocab": vocab, "merges": merges, "tmp": tmp_path}


def make_args(corpus, out, *extra: str) -> list[str]:
    return ["--input", corpus["a"], corpus["b"], "--output-dir", str(out), "--vocab-file", corpus["vocab"],
            "--merge-file", corpus["merges"], *extra]


def expected_stream(texts: list[str], tok) -> list[int]:
    """Each document's ids (one encode call per document) followed by eod, back to back."""
    return [i for text in texts for i in [*tok.encode(text), tok.eod]]


def windows(stream, seq_length: int) -> list[list[int]]:
    count = (len(stream) - 1) // seq_length
    return [list(stream[j * seq_length:j * seq_length + seq_length + 1]) for j in range(count)]


def write_split(folder, shards: dict[str, np.ndarray], sizes: dict | None = None, allow_pickle: bool = False) -> str:
    os.makedirs(folder, exist_ok=True)
    for name, array in shards.items():
        np.save(os.path.join(folder, name), array, allow_pickle=allow_pickle)
    with open(os.path.join(folder, "sizes.txt"), "w") as f:
        json.dump(sizes if sizes is not None else {n: int(np.hstack(a).size) for n, a in shards.items()}, f)
    return str(folder)


# --- openwebtext/make_gpt2_dataset.py -----------------------------------------------------------------------------

def test_make_gpt2_dataset_writes_plain_shards_and_sizes(corpus, capsys):
    out = corpus["tmp"] / "npy"
    code, stdout, err = run_script(make_args(corpus, out), capsys)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["a.npy", "b.npy", "sizes.txt"]  # no temporary left
    tok = GPT2BPETokenizer(corpus["vocab"], corpus["merges"])
    expected = {"a.npy": expected_stream(TEXTS_A, tok), "b.npy": expected_stream(TEXTS_B, tok)}
    with open(out / "sizes.txt") as f:
        assert json.load(f) == {name: len(stream) for name, stream in expected.items()}
    for name, stream in expected.items():
        shard = np.load(out / name, mmap_mode="r", allow_pickle=False)
        assert shard.dtype == np.uint16 and shard.ndim == 1
        assert shard.tolist() == stream
    assert f"a.npy: {len(TEXTS_A)} documents, {len(expected['a.npy'])} tokens" in stdout
    assert f"wrote 2 shards ({len(TEXTS_A) + len(TEXTS_B)} documents" in stdout


def test_make_gpt2_dataset_refuses_to_overwrite_without_force(corpus, capsys):
    out = corpus["tmp"] / "npy"
    assert run_script(make_args(corpus, out), capsys)[0] == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    write_jsonl(corpus["b"], ["different text now"])
    code, _, err = run_script(make_args(corpus, out), capsys)
    assert_one_line_error(code, err, str(out / "a.npy"), "--overwrite")
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    code, _, err = run_script(make_args(corpus, out, "--force"), capsys)
    assert code == 0, err
    tok = GPT2BPETokenizer(corpus["vocab"], corpus["merges"])
    assert np.load(out / "b.npy").tolist() == expected_stream(["different text now"], tok)
    assert sorted(os.listdir(out)) == ["a.npy", "b.npy", "sizes.txt"]


def test_make_gpt2_dataset_bad_input_leaves_nothing(corpus, capsys):
    with open(corpus["b"], "a", encoding="utf-8") as f:
        f.write('{"text": "unterminated}\n')
    out = corpus["tmp"] / "npy"
    code, _, err = run_script(make_args(corpus, out), capsys)
    assert_one_line_error(code, err, f"{corpus['b']}:{len(TEXTS_B) + 1}", "not valid JSON")
    assert os.listdir(out) == []  # a.npy was complete, but nothing is renamed into place before the end
    code, _, err = run_script(["--input", str(corpus["tmp"] / "nope.json"), "--output-dir", str(out),
                               "--vocab-file", corpus["vocab"], "--merge-file", corpus["merges"]], capsys)
    assert_one_line_error(code, err, "nope.json", "no such file")
    os.makedirs(corpus["tmp"] / "sub")
    other = write_jsonl(corpus["tmp"] / "sub" / "a.json", ["x"])
    code, _, err = run_script(["--input", corpus["a"], other, "--output-dir", str(out)], capsys)
    assert_one_line_error(code, err, "would both write", "a.npy")


def test_make_gpt2_dataset_wide_vocabulary_writes_int32(corpus, capsys, monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "make_tokenizer", lambda **kw: ByteTokenizer(vocab_size=70000))
    out = corpus["tmp"] / "wide"
    counts = script.make_dataset([corpus["b"]], str(out), "sizes.txt", {}, workers=1)
    shard = np.load(out / "b.npy", mmap_mode="r")
    assert shard.dtype == np.int32
    assert shard.tolist() == expected_stream(TEXTS_B, ByteTokenizer())
    assert counts == {"b.npy": (len(TEXTS_B), len(shard))}
    dataset = NpyShardsDataset(str(out), "sizes.txt", 8)
    assert [s["text"].tolist() for s in dataset] == windows(shard.tolist(), 8)


def test_make_gpt2_dataset_workers_give_the_same_bytes(corpus, capsys, monkeypatch):
    serial, parallel = corpus["tmp"] / "serial", corpus["tmp"] / "parallel"
    script = load_script()
    monkeypatch.setattr(script, "CHUNK_DOCS", 4)  # several chunks per file, so order across workers matters
    kwargs = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": corpus["vocab"], "merge_file": corpus["merges"]}
    script.make_dataset([corpus["a"], corpus["b"]], str(serial), "sizes.txt", kwargs, workers=1)
    script.make_dataset([corpus["a"], corpus["b"]], str(parallel), "sizes.txt", kwargs, workers=3)
    for name in ("a.npy", "b.npy", "sizes.txt"):
        assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name


def test_make_gpt2_dataset_command_line(corpus):
    out = corpus["tmp"] / "cli"
    run = subprocess.run([sys.executable, SCRIPT, *make_args(corpus, out, "--workers", "2", "--sizes-file", "n.json")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"--train-data-path {out} --input-data-sizes-file n.json" in run.stdout
    train, valid, test = build_npy_datasets(str(out), None, None, "n.json", 16)
    assert valid is None and test is None
    tok = GPT2BPETokenizer(corpus["vocab"], corpus["merges"])
    assert [s["text"].tolist() for s in train] == \
        windows(expected_stream(TEXTS_A, tok), 16) + windows(expected_stream(TEXTS_B, tok), 16)


# --- NpyShardsDataset ---------------------------------------------------------------------------------------------

def test_samples_are_the_windows_of_each_shard_in_name_order(tmp_path):
    rng = np.random.default_rng(0)
    streams = {"z.npy": rng.integers(0, 50000, 103), "a.npy": rng.integers(0, 50000, 10),
               "m.npy": rng.integers(0, 50000, 45), "short.npy": rng.integers(0, 50000, 5)}
    folder = write_split(tmp_path / "train", {n: s.astype(np.uint16) for n, s in streams.items()})
    dataset = NpyShardsDataset(folder, "sizes.txt", 9)
    expected = [w for name in sorted(streams) for w in windows(streams[name].tolist(), 9)]
    assert len(dataset) == len(expected) == 1 + 4 + 11  # (n - 1) // 9 per shard: a, m (not 45 // 9), short, z
    got = [dataset[i]["text"] for i in range(len(dataset))]
    assert all(t.dtype == np.int64 and t.shape == (10,) for t in got)
    assert [t.tolist() for t in got] == expected
    assert dataset[-1]["text"].tolist() == expected[-1]
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_dataset_pickles_by_path_for_data_loader_workers(tmp_path):
    stream = np.arange(2000, dtype=np.uint16)
    folder = write_split(tmp_path / "train", {"s.npy": stream})
    dataset = NpyShardsDataset(folder, "sizes.txt", 31)
    first = dataset[5]["text"]
    blob = pickle.dumps(dataset)
    assert len(blob) < 2000  # paths and offsets only: the 4000-byte shard is not in it
    copy = pickle.loads(blob)
    assert copy._maps == [None] and np.array_equal(copy[5]["text"], first)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    batches = list(loader)
    assert torch.equal(torch.cat([b["text"] for b in batches]),
                       torch.tensor(windows(stream.tolist(), 31), dtype=torch.int64))


def test_2019_object_array_shards_need_trust_and_are_flattened_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    docs = [np.append(rng.integers(0, 50256, n), 50256).astype(np.uint16) for n in (7, 0, 30, 12, 3)]
    old = np.empty(len(docs), dtype=object)
    old[:] = docs
    folder = write_split(tmp_path / "train", {"old.npy": old, "new.npy": np.arange(25, dtype=np.uint16)},
                         allow_pickle=True)
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match="old.npy is a pickled 2019 object array.*--trust-pickle") as err:
        NpyShardsDataset(folder, "sizes.txt", 8, cache_dir=cache)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="--cache-dir"):
        NpyShardsDataset(folder, "sizes.txt", 8, trust_pickle=True)

    loads = []
    real = npy_dataset.load_object_shard
    monkeypatch.setattr(npy_dataset, "load_object_shard", lambda path: loads.append(path) or real(path))
    dataset = NpyShardsDataset(folder, "sizes.txt", 8, cache_dir=cache, trust_pickle=True)
    expected = windows(list(range(25)), 8) + windows(np.concatenate(docs).tolist(), 8)  # new.npy < old.npy
    assert [s["text"].tolist() for s in dataset] == expected
    flat_files = os.listdir(os.path.join(cache, "npy_flat"))
    assert len(loads) == 1 and len(flat_files) == 1 and flat_files[0].startswith("old.")
    assert np.load(os.path.join(cache, "npy_flat", flat_files[0]), allow_pickle=False).tolist() == \
        np.concatenate(docs).tolist()

    again = NpyShardsDataset(folder, "sizes.txt", 8, cache_dir=cache, trust_pickle=True)
    assert len(loads) == 1  # the flat copy was reused: the pickle was not loaded again
    assert [s["text"].tolist() for s in again] == expected

    docs[0][0] = 7  # an edited shard gets a fresh flat copy
    old[:] = docs
    np.save(os.path.join(folder, "old.npy"), old, allow_pickle=True)
    os.utime(os.path.join(folder, "old.npy"), ns=(1, 1))
    edited = NpyShardsDataset(folder, "sizes.txt", 8, cache_dir=cache, trust_pickle=True)
    assert len(loads) == 2 and edited[len(windows(list(range(25)), 8))]["text"][0] == 7


def _shard_fixes(tmp_path):
    """(name, make(folder), fragments of the message) for each bad npy input."""
    good = np.arange(40, dtype=np.uint16)

    def sizes_text(text):
        return lambda d: (write_split(d, {"s.npy": good}), open(os.path.join(d, "sizes.txt"), "w").write(text))

    return [
        ("missing folder", lambda d: None, ["--train-data-path", "no such folder"]),
        ("missing sizes", lambda d: np.save(os.path.join(os.makedirs(d) or d, "s.npy"), good),
         ["sizes.txt does not exist", "--input-data-sizes-file"]),
        ("sizes not json", sizes_text('{"s.npy": 40,'), ["sizes.txt:1: not valid JSON"]),
        ("sizes a list", sizes_text('["s.npy", 40]'), ["sizes.txt holds a json list"]),
        ("negative size", sizes_text('{"s.npy": -1}'), ["'s.npy' has size -1"]),
        ("text size", sizes_text('{"s.npy": "40"}'), ["'s.npy' has size '40'"]),
        ("bool size", sizes_text('{"s.npy": true}'), ["'s.npy' has size True"]),
        ("shard missing", lambda d: write_split(d, {"s.npy": good}, {"s.npy": 40, "gone.npy": 3}),
         ["gone.npy, listed in", "does not exist"]),
        ("size mismatch", lambda d: write_split(d, {"s.npy": good}, {"s.npy": 41}),
         ["s.npy holds 40 tokens but", "says 41"]),
        ("2-D shard", lambda d: write_split(d, {"s.npy": good.reshape(4, 10)}, {"s.npy": 40}),
         ["s.npy holds a (4, 10) uint16 array", "1-D integer"]),
        ("float shard", lambda d: write_split(d, {"s.npy": good.astype(np.float32)}),
         ["s.npy holds a (40,) float32 array"]),
        ("not npy", lambda d: (write_split(d, {"s.npy": good}),
                               open(os.path.join(d, "s.npy"), "wb").write(b"PK\x03\x04 not numpy")),
         ["s.npy is not a readable .npy file"]),
        ("truncated shard", lambda d: (write_split(d, {"s.npy": good}),
                                       os.truncate(os.path.join(d, "s.npy"), 128 + 79)),
         ["s.npy is cut short: 207 bytes", "(40,) uint16 array (208 bytes)"]),
        ("no sample", lambda d: write_split(d, {"s.npy": good[:16], "t.npy": good[:5]}),
         ["train split", "21 tokens in 2 shards", "17 one sample needs"]),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_npy_inputs_fail_with_one_line(tmp_path, case):
    name, make, fragments = _shard_fixes(tmp_path)[case]
    folder = str(tmp_path / "train")
    make(folder)
    with pytest.raises(DataError) as err:
        NpyShardsDataset(folder, "sizes.txt", 16)
    message = str(err.value)
    assert "\n" not in message, name
    for fragment in fragments:
        assert fragment in message, (name, message)


def test_build_npy_datasets_names_the_split_at_fault(tmp_path):
    train = write_split(tmp_path / "train", {"s.npy": np.arange(50, dtype=np.uint16)})
    test = write_split(tmp_path / "test", {"t.npy": np.arange(20, dtype=np.uint16)})
    datasets = build_npy_datasets(train, None, test, "sizes.txt", 4)
    assert [None if d is None else len(d) for d in datasets] == [12, None, 4]
    assert datasets[2][0]["text"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match=r"^--val-data-path .*nowhere: no such folder"):
        build_npy_datasets(train, str(tmp_path / "nowhere"), None, "sizes.txt", 4)
