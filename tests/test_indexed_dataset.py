"""data_utils/indexed_dataset.py: Megatron-Core's .bin/.idx format, read and written.

The writer and the reader are checked against bytes laid out by hand from the format (so a bug shared by
both cannot hide) and against a reference reader written here with ``struct`` and numpy; damaged or
foreign files must stop with one line naming the file.
"""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from data_utils.errors import DataError
from data_utils.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)

# Two documents: [5, 6, 7] + [8] (two sentences), then [65535]; uint16 (code 8).
HAND_IDX = (
    b"MMIDIDX\x00\x00"
    + b"\x01\x00\x00\x00\x00\x00\x00\x00"  # version 1
    + b"\x08"  # uint16
    + b"\x03\x00\x00\x00\x00\x00\x00\x00"  # 3 sequences
    + b"\x03\x00\x00\x00\x00\x00\x00\x00"  # 3 document indices (2 documents + 1)
    + b"\x03\x00\x00\x00" + b"\x01\x00\x00\x00" + b"\x01\x00\x00\x00"  # lengths int32
    + b"\x00" * 8 + b"\x06" + b"\x00" * 7 + b"\x08" + b"\x00" * 7  # pointers int64: 0, 6, 8
    + b"\x00" * 8 + b"\x02" + b"\x00" * 7 + b"\x03" + b"\x00" * 7  # document indices: 0, 2, 3
)
HAND_BIN = b"\x05\x00\x06\x00\x07\x00\x08\x00\xff\xff"
REFERENCE_DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def reference_read(prefix: str) -> dict:
    """The format read straight from its byte layout: header fields, the three arrays and every sequence."""
    with open(prefix + ".idx", "rb") as f:
        raw = f.read()
    with open(prefix + ".bin", "rb") as f:
        data = f.read()
    magic, version, code, count, docs = raw[:9], *struct.unpack_from("<QBQQ", raw, 9)
    assert len(raw) == 34 + 12 * count + 8 * docs
    lengths = np.frombuffer(raw, "<i4", count, 34)
    pointers = np.frombuffer(raw, "<i8", count, 34 + 4 * count)
    document_indices = np.frombuffer(raw, "<i8", docs, 34 + 12 * count)
    dtype = np.dtype(REFERENCE_DTYPES[code])
    sequences = [np.frombuffer(data, dtype, n, p).tolist() for n, p in zip(lengths, pointers)]
    assert sum(lengths) * dtype.itemsize == len(data)
    return {"magic": magic, "version": version, "code": code, "lengths": lengths.tolist(),
            "pointers": pointers.tolist(), "document_indices": document_indices.tolist(), "sequences": sequences}


def write_pair(prefix, idx: bytes, data: bytes) -> str:
    with open(f"{prefix}.idx", "wb") as f:
        f.write(idx)
    with open(f"{prefix}.bin", "wb") as f:
        f.write(data)
    return str(prefix)


def build(prefix, documents, dtype) -> str:
    """A dataset of ``documents`` (lists of sequences), half through add_document, half through add_item."""
    prefix = str(prefix)
    with IndexedDatasetBuilder(data_file_path(prefix), dtype) as builder:
        for d, doc in enumerate(documents):
            if d % 2:
                for seq in doc:
                    builder.add_item(np.array(seq, dtype=np.int64))
                builder.end_document()
            else:
                flat = [t for seq in doc for t in seq]
                builder.add_document(np.array(flat, dtype=np.int64), [len(s) for s in doc])
        builder.finalize(index_file_path(prefix))
    return prefix


DOCS_SMALL = [[[5, 6, 7], [8]], [[1]], [[2, 3], [], [4]], [[9, 10, 11, 12]]]


def test_the_dtype_codes_and_the_dtype_choice_are_megatron_cores():
    assert {code: dt.name for code, dt in DTYPE_CODES.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}
    assert best_dtype(50257) == np.uint16 and best_dtype(30522) == np.uint16
    assert best_dtype(65499) == np.uint16 and best_dtype(65500) == np.int32  # Megatron-Core: < 65500
    assert best_dtype(128256) == np.int32 and best_dtype(None) == np.int32
    assert data_file_path("a/b") == "a/b.bin" and index_file_path("a/b") == "a/b.idx"


def test_a_pair_laid_out_by_hand_reads_and_the_builder_writes_the_same_bytes(tmp_path):
    prefix = write_pair(tmp_path / "hand", HAND_IDX, HAND_BIN)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and len(ds) == 3 and ds.num_documents == 2 and ds.num_tokens == 5
    assert [ds[i].tolist() for i in range(3)] == [[5, 6, 7], [8], [65535]]
    assert ds.document(0).tolist() == [5, 6, 7, 8] and ds.document(1).tolist() == [65535]
    assert ds.sequence_lengths.dtype == np.int32 and ds.sequence_pointers.tolist() == [0, 6, 8]
    assert ds.document_indices.dtype == np.int64 and ds.document_indices.tolist() == [0, 2, 3]

    with IndexedDatasetBuilder(str(tmp_path / "built.bin"), np.uint16) as builder:
        builder.add_document([5, 6, 7, 8], [3, 1])
        builder.add_item([65535])
        builder.end_document()
        builder.finalize(str(tmp_path / "built.idx"))
    assert (tmp_path / "built.idx").read_bytes() == HAND_IDX
    assert (tmp_path / "built.bin").read_bytes() == HAND_BIN


@pytest.mark.parametrize("dtype, high", [(np.uint16, 65535), (np.int32, 1_000_000)])
def test_round_trip_matches_the_reference_reader(tmp_path, dtype, high):
    rng = np.random.default_rng(7)
    docs = [[rng.integers(0, high, size=int(rng.integers(0, 9))).tolist() for _ in range(int(rng.integers(1, 4)))]
            for _ in range(25)]
    prefix = build(tmp_path / "rt", docs, dtype)
    ref = reference_read(prefix)
    assert ref["magic"] == b"MMIDIDX\x00\x00" and ref["version"] == 1
    assert DTYPE_CODES[ref["code"]] == np.dtype(dtype)
    flat = [seq for doc in docs for seq in doc]
    assert ref["sequences"] == flat
    assert ref["document_indices"] == np.concatenate([[0], np.cumsum([len(d) for d in docs])]).tolist()

    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype) and len(ds) == len(flat) and ds.num_documents == len(docs)
    assert ds.sequence_lengths.tolist() == ref["lengths"] and ds.sequence_pointers.tolist() == ref["pointers"]
    assert ds.document_indices.tolist() == ref["document_indices"]
    assert [ds[i].tolist() for i in range(len(ds))] == flat
    assert [ds.document(d).tolist() for d in range(len(docs))] == [[t for s in doc for t in s] for doc in docs]
    assert ds.num_tokens == sum(len(s) for s in flat) and ds[0].dtype == np.dtype(dtype)


def test_get_document_and_views(tmp_path):
    ds = IndexedDataset(build(tmp_path / "v", DOCS_SMALL, np.uint16))
    assert ds.get(0).tolist() == [5, 6, 7] and ds.get(0, 1).tolist() == [6, 7] and ds.get(0, 1, 1).tolist() == [6]
    assert ds.get(6, 2, 2).tolist() == [11, 12] and ds[-1].tolist() == [9, 10, 11, 12]
    assert ds.document(-1).tolist() == [9, 10, 11, 12] and ds.document(2).tolist() == [2, 3, 4]
    with pytest.raises(IndexError):
        ds.get(0, 2, 2)
    with pytest.raises(IndexError):
        ds.document(4)
    doc = ds.document(3)
    assert np.shares_memory(doc, ds[6]) and not doc.flags.writeable  # a view of the read-only map
    assert ds.tokens.tolist() == [5, 6, 7, 8, 1, 2, 3, 4, 9, 10, 11, 12] and np.shares_memory(ds.tokens, doc)


def test_a_document_without_sequences_and_an_empty_dataset(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "e.bin"), np.uint16) as builder:
        builder.end_document()
        builder.add_document([4], [1])
        builder.finalize(str(tmp_path / "e.idx"))
    ds = IndexedDataset(str(tmp_path / "e"))
    assert ds.num_documents == 2 and ds.document(0).tolist() == [] and ds.document(1).tolist() == [4]
    with IndexedDatasetBuilder(str(tmp_path / "none.bin"), np.int32) as builder:
        builder.finalize(str(tmp_path / "none.idx"))
    empty = IndexedDataset(str(tmp_path / "none"))
    assert len(empty) == 0 and empty.num_documents == 0 and empty.num_tokens == 0


def test_it_pickles_by_prefix_and_maps_again(tmp_path):
    prefix = build(tmp_path / "p", DOCS_SMALL * 50, np.int32)
    ds = IndexedDataset(prefix)
    blob = pickle.dumps(ds)
    assert len(blob) < 200  # the prefix, not the tokens
    again = pickle.loads(blob)
    assert again.prefix == prefix and [again.document(d).tolist() for d in range(again.num_documents)] == \
        [ds.document(d).tolist() for d in range(ds.num_documents)]


def test_add_index_merges_byte_for_byte(tmp_path):
    first, second = DOCS_SMALL, [[[20, 21]], [[22], [23, 24]]]
    a, b = build(tmp_path / "a", first, np.uint16), build(tmp_path / "b", second, np.uint16)
    with IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16) as builder:
        builder.add_index(a)
        builder.add_document([30, 31], [1, 1])
        builder.add_index(b)
        builder.finalize(str(tmp_path / "m.idx"))
    whole = build(tmp_path / "whole", [*first, [[30], [31]], *second], np.uint16)
    # build() alternates add_document/add_item by position; the bytes do not depend on which is used
    assert (tmp_path / "m.idx").read_bytes() == (tmp_path / "whole.idx").read_bytes()
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "whole.bin").read_bytes()
    merged = IndexedDataset(str(tmp_path / "m"))
    assert merged.num_documents == len(first) + 1 + len(second)
    assert merged.document(4).tolist() == [30, 31] and merged.document(6).tolist() == [22, 23, 24]
    assert IndexedDataset(whole).num_tokens == merged.num_tokens


def test_add_index_refuses_another_dtype(tmp_path):
    other = build(tmp_path / "o", DOCS_SMALL, np.int32)
    with IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16) as builder, pytest.raises(DataError) as err:
        builder.add_index(other)
    assert "o.idx" in str(err.value) and "int32" in str(err.value) and "\n" not in str(err.value)


def test_builder_leaves_nothing_when_it_fails_and_refuses_an_open_document(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16) as builder:
        builder.add_document([1, 2], [2])
        assert os.listdir(tmp_path) and not os.path.exists(tmp_path / "x.bin")  # only temporaries so far
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with IndexedDatasetBuilder(str(tmp_path / "y.bin"), np.uint16) as builder:
        builder.add_item([1])
        with pytest.raises(ValueError, match="end_document"):
            builder.finalize(str(tmp_path / "y.idx"))
    assert os.listdir(tmp_path) == []
    with IndexedDatasetBuilder(str(tmp_path / "z.bin"), np.uint16) as builder, pytest.raises(ValueError):
        builder.add_document([1, 70000], [2])  # does not fit in uint16


def test_finalize_replaces_an_existing_pair(tmp_path):
    build(tmp_path / "r", DOCS_SMALL, np.uint16)
    build(tmp_path / "r", [[[1, 2]]], np.uint16)
    ds = IndexedDataset(str(tmp_path / "r"))
    assert ds.num_documents == 1 and ds.document(0).tolist() == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["r.bin", "r.idx"]


def _damage(tmp_path, idx: bytes = HAND_IDX, data: bytes = HAND_BIN) -> str:
    return write_pair(tmp_path / "bad", idx, data)


def _patched(offset: int, value: bytes) -> bytes:
    return HAND_IDX[:offset] + value + HAND_IDX[offset + len(value):]


@pytest.mark.parametrize("case, culprit, words", [
    ("no idx", ".idx", ["no such file", "tools/preprocess_data.py"]),
    ("no bin", ".bin", ["no such file", "tools/preprocess_data.py"]),
    ("bin truncated", ".bin", ["truncated", "8 bytes", "10", "copy it again or re-run tools/preprocess_data.py"]),
    ("bin too long", ".bin", ["12 bytes", "10", "do not belong together"]),
    ("foreign header", ".idx", ["not a Megatron indexed dataset index"]),
    ("empty idx", ".idx", ["truncated", "0 bytes"]),
    ("idx truncated", ".idx", ["truncated", "need 94", "copy it again or re-run tools/preprocess_data.py"]),
    ("version 2", ".idx", ["version 2"]),
    ("dtype code 9", ".idx", ["unknown dtype code 9"]),
    ("documents from 1", ".idx", ["start at 1, not 0"]),
    ("documents end early", ".idx", ["end at 2, not at the sequence count 3"]),
    ("documents decrease", ".idx", ["decrease at entry 1"]),
])
def test_damaged_or_foreign_files_stop_with_one_line_naming_the_file(tmp_path, case, culprit, words):
    docs_at = 34 + 12 * 3
    prefix = {
        "no idx": lambda: _damage(tmp_path) and os.remove(tmp_path / "bad.idx") or str(tmp_path / "bad"),
        "no bin": lambda: _damage(tmp_path) and os.remove(tmp_path / "bad.bin") or str(tmp_path / "bad"),
        "bin truncated": lambda: _damage(tmp_path, data=HAND_BIN[:-2]),
        "bin too long": lambda: _damage(tmp_path, data=HAND_BIN + b"\x00\x00"),
        "foreign header": lambda: _damage(tmp_path, idx=b"TNTIDX\x00\x00" + HAND_IDX[8:]),
        "empty idx": lambda: _damage(tmp_path, idx=b""),
        "idx truncated": lambda: _damage(tmp_path, idx=HAND_IDX[:-4]),
        "version 2": lambda: _damage(tmp_path, idx=_patched(9, b"\x02")),
        "dtype code 9": lambda: _damage(tmp_path, idx=_patched(17, b"\x09")),
        "documents from 1": lambda: _damage(tmp_path, idx=_patched(docs_at, b"\x01")),
        "documents end early": lambda: _damage(tmp_path, idx=_patched(docs_at + 16, b"\x02")),
        "documents decrease": lambda: _damage(tmp_path, idx=_patched(docs_at + 8, b"\x05\x00\x00\x00\x00\x00\x00\x80")),
    }[case]()
    with pytest.raises(DataError) as err:
        IndexedDataset(prefix)
    message = str(err.value)
    assert "\n" not in message and message.startswith(os.path.join(str(tmp_path), "bad") + culprit), message
    for word in words:
        assert word in message, message
