"""tools/merge_datasets.py: shards tokenized apart merge into exactly what one run over all of them writes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from data_utils import DataError, IndexedDataset
from errors import ArgumentError
from tests.cli import assert_one_line_error
from tests.helpers import write_indexed, write_jsonl, write_tiny_gpt2
from tools.merge_datasets import input_prefixes, merge
from tools.preprocess_data import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(n: int, tag: str) -> list[str]:
    return [f"{tag} the world {i} " + "hello " * (i % 5) for i in range(n)]


@pytest.mark.parametrize("sentences", [False, True])
def test_merged_shards_equal_one_preprocessing_run_byte_for_byte(tmp_path, sentences):
    vocab, merges = write_tiny_gpt2(str(tmp_path))
    kwargs = {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": vocab, "merge_file": merges}
    texts = [t + ("\nsecond line" if sentences else "") for t in _texts(30, "a") + _texts(20, "b")]
    shards = [write_jsonl(tmp_path / "s0.json", texts[:18]), write_jsonl(tmp_path / "s1.json", texts[18:])]
    opts = {"presplit": sentences, "append_eod": True, "progress": False}
    for i, shard in enumerate(shards):
        preprocess([shard], kwargs, str(tmp_path / f"shard{i}"), **opts)
    preprocess([write_jsonl(tmp_path / "all.json", texts)], kwargs, str(tmp_path / "whole"), **opts)
    level = "sentence" if sentences else "document"
    merged = merge([str(tmp_path / f"shard{i}_text_{level}") for i in range(2)], str(tmp_path / "merged"))
    assert merged.num_documents == 50
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"whole_text_{level}{ext}").read_bytes()


def test_folder_inputs_are_merged_in_name_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_indexed(str(shards / "b"), [[[3, 4]], [[5]]])
    write_indexed(str(shards / "a"), [[[1], [2]]])
    assert input_prefixes([str(shards)]) == [str(shards / "a"), str(shards / "b")]
    merged = merge(input_prefixes([str(shards), str(shards / "a.idx")]), str(tmp_path / "m"))
    assert [merged.document(d).tolist() for d in range(merged.num_documents)] == [[1, 2], [3, 4], [5], [1, 2]]
    assert merged.document_indices.tolist() == [0, 2, 3, 4, 6]


def test_bad_merges_are_refused_and_leave_nothing(tmp_path):
    a = write_indexed(str(tmp_path / "a"), [[[1, 2]]])
    wide = tmp_path / "wide"
    from data_utils.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(wide) + ".bin", np.int32)
    builder.add_item(np.array([70000]))
    builder.end_document()
    builder.finalize(str(wide) + ".idx")
    with pytest.raises(DataError, match="different token types"):
        merge([a, str(wide)], str(tmp_path / "out"))
    with pytest.raises(DataError, match="is also an input"):
        merge([a], a, force=True)
    merge([a], str(tmp_path / "out"))
    with pytest.raises(ArgumentError, match="already exists; pass --overwrite"):
        merge([a, a], str(tmp_path / "out"))
    assert IndexedDataset(str(tmp_path / "out")).num_documents == 1
    assert merge([a, a], str(tmp_path / "out"), force=True).num_documents == 2
    assert sorted(os.listdir(tmp_path)) == sorted(["a.bin", "a.idx", "wide.bin", "wide.idx", "out.bin", "out.idx"])
    proc = subprocess.run([sys.executable, "tools/merge_datasets.py", "--input", a, str(tmp_path / "missing"),
                           "--output-prefix", str(tmp_path / "new")], cwd=REPO, capture_output=True, text=True)
    assert_one_line_error(proc.returncode, proc.stderr, "missing.idx")
    assert not os.path.exists(tmp_path / "new.bin")
