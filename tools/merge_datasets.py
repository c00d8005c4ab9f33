"""Merge indexed datasets (``PREFIX.bin``/``PREFIX.idx``) into one, documents in the order given.

    python tools/merge_datasets.py --input data/shard_00_text_document data/shard_01_text_document \\
        --output-prefix data/all_text_document
    python tools/merge_datasets.py --input data/shards/ --output-prefix data/all_text_document

For a corpus tokenized in pieces (several machines each running ``tools/preprocess_data.py`` on its
share of the json files): the result holds every document of every input, in the order the inputs
are named (a folder gives its ``*.idx`` prefixes in sorted name order), and trains exactly like a
dataset written in one go. Token data is copied in large blocks, never loaded whole. All inputs must
hold the same token type (the same tokenizer) and level (documents or sentences); each is opened, and
so checked, before anything is written. The output is written under temporary names and renamed into
place when complete; an existing output is replaced only with ``--overwrite`` (``--force``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic import check_new_file  # noqa: E402
from data_utils.errors import DataError  # noqa: E402
from data_utils.indexed_dataset import (  # noqa: E402
    IndexedDataset,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
)


def input_prefixes(inputs: list[str]) -> list[str]:
    """Prefixes named directly (a trailing ``.bin``/``.idx`` dropped) or found as ``*.idx`` in folders."""
    prefixes = []
    for name in inputs:
        if os.path.isdir(name):
            found = sorted(os.path.join(name, f[:-4]) for f in os.listdir(name)
                           if f.endswith(".idx") and not f.startswith("."))
            if not found:
                raise DataError(f"--input {name}: a folder without any .idx file; name the datasets' prefixes")
            prefixes += found
        else:
            prefixes.append(name.removesuffix(".bin").removesuffix(".idx"))
    return prefixes


def _level(prefix: str, dataset: IndexedDataset) -> str | None:
    """``document`` or ``sentence``: by preprocess_data's name (``..._document``, ``..._sentence``), else
    ``sentence`` when a document holds several sequences; ``None`` when it cannot tell."""
    for level in ("document", "sentence"):
        if prefix.endswith(f"_{level}"):
            return level
    return "sentence" if len(dataset) > len(dataset.document_indices) - 1 else None


def merge(prefixes: list[str], output_prefix: str, force: bool = False) -> IndexedDataset:
    """Write every document of ``prefixes``, in order, to ``output_prefix``; returns the merged dataset."""
    if not prefixes:
        raise DataError("--input: no datasets to merge")
    out_bin, out_idx = data_file_path(output_prefix), index_file_path(output_prefix)
    folder = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(folder):
        raise DataError(f"--output-prefix {output_prefix}: folder {folder} does not exist; create it first")
    for path in (out_bin, out_idx):
        check_new_file(path, "--output-prefix", force)
    out_real = {os.path.realpath(out_bin), os.path.realpath(out_idx)}
    datasets = [IndexedDataset(prefix) for prefix in prefixes]  # every input checked before writing
    for prefix in prefixes:
        if {os.path.realpath(data_file_path(prefix)), os.path.realpath(index_file_path(prefix))} & out_real:
            raise DataError(f"--output-prefix {output_prefix} is also an input; write the merge elsewhere")
    levels = {prefix: _level(prefix, ds) for prefix, ds in zip(prefixes, datasets)}
    if len(set(levels.values()) - {None}) > 1:
        kinds = ", ".join(f"{prefix} ({level}-level)" for prefix, level in levels.items() if level)
        raise DataError(f"the inputs mix document-level and sentence-level datasets ({kinds}); merge only datasets "
                        "of one level (tools/preprocess_data.py with or without --split-sentences)")
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        kinds = ", ".join(f"{ds.prefix} ({ds.dtype.name})" for ds in datasets)
        raise DataError(f"the inputs hold different token types ({kinds}); merge only datasets written with the "
                        "same tokenizer")
    with IndexedDatasetBuilder(out_bin, datasets[0].dtype) as builder:  # a failed write: one line
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(out_idx)
    return IndexedDataset(output_prefix)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="dataset prefixes (PREFIX.bin/.idx), or folders of them, in the order to merge")
    parser.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    parser.add_argument("--overwrite", "--force", dest="force", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    prefixes = input_prefixes(args.input)
    merged = merge(prefixes, args.output_prefix, args.force)
    print(f"{args.output_prefix}.bin/.idx: {len(prefixes)} datasets, {merged.num_documents} documents, "
          f"{len(merged)} sequences, {merged.num_tokens} {merged.dtype.name} tokens")


if __name__ == "__main__":
    from initialize import run_main

    run_main(main)
