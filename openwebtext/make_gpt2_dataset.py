"""Tokenize loose-json files into npy shards and a sizes file for ``--use-npy-data-loader``.

    python openwebtext/make_gpt2_dataset.py --input A.json [B.json ...] --output-dir DIR \\
        [--sizes-file sizes.txt] [--tokenizer-type GPT2BPETokenizer] [--vocab-file V --merge-file M | --cache-dir C] \\
        [--text-key text] [--workers N] [--overwrite]

One shard per input, ``DIR/<input name less its extension>.npy``: a plain 1-D integer array (uint16
when the vocabulary fits in 16 bits, else int32) of every document's tokens back to back, each followed
by the end-of-document id, so ``np.load(path, mmap_mode="r")`` reads it without pickle. Blank lines are
skipped; an empty text still contributes its end-of-document id. ``DIR/sizes.txt`` is the json object
``{shard file name: number of tokens}`` (end-of-document ids included) that ``data_utils.npy_dataset``
reads. Megatron-LM 2019's version of this script wrote pickled object arrays instead; the loader reads
those too (with ``--trust-pickle``).

Every output is written under a temporary name and renamed into place once all inputs are tokenized, so
a failed run leaves nothing behind; existing outputs are refused unless ``--overwrite`` (``--force``).
``--workers N`` tokenizes chunks of documents in N processes (the output is the same for any N).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic import remove_orphans, temporary_path  # noqa: E402
from data_utils.corpora import batched_texts, read_loose_json  # noqa: E402
from data_utils.errors import DataError  # noqa: E402
from data_utils.lazy_loader import encode_texts  # noqa: E402
from data_utils.tokenization import TOKENIZER_TYPES, Tokenizer, make_tokenizer  # noqa: E402
from initialize import leave_ctrl_c_to_the_parent, run_cli  # noqa: E402

CHUNK_DOCS, CHUNK_CHARS = 1024, 8 << 20  # documents per tokenizer call, at most
_worker_tokenizer: Tokenizer | None = None  # each --workers process builds its own


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 2**16), else int32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def shard_name(input_path: str) -> str:
    """The shard file name for an input: its base name less the last extension, plus ``.npy``."""
    stem, _ = os.path.splitext(os.path.basename(input_path))
    return f"{stem or os.path.basename(input_path)}.npy"


def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """``texts`` tokenized back to back, each followed by ``tokenizer.eod``, as one ``dtype`` array."""
    eod = np.array([tokenizer.eod], dtype=dtype)
    parts = [part for doc in encode_texts(tokenizer, texts, dtype) for part in (doc, eod)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _init_worker(tokenizer_kwargs: dict[str, Any]) -> None:
    global _worker_tokenizer
    leave_ctrl_c_to_the_parent()
    _worker_tokenizer = make_tokenizer(**tokenizer_kwargs)


def _encode_in_worker(texts: list[str], dtype: str) -> np.ndarray:
    return encode_documents(_worker_tokenizer, texts, np.dtype(dtype))


def text_chunks(path: str, text_key: str, on_bytes) -> Iterator[list[str]]:
    """Lists of document texts of ``path``, in file order, of at most CHUNK_DOCS documents or about CHUNK_CHARS."""
    return batched_texts(read_loose_json(path, text_key, on_bytes=on_bytes), CHUNK_DOCS, CHUNK_CHARS)


def _npy_header(dtype: np.dtype, length: int) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (length,)})
    return header.getvalue()


def write_shard(path: str, chunks: Iterator[tuple[np.ndarray, int]], dtype: np.dtype) -> tuple[int, int]:
    """Stream ``(tokens, documents)`` chunks into the 1-D ``.npy`` file ``path``; (documents, tokens) written.

    The header is written for length 0 and rewritten at the end; numpy pads a 1-D header to a fixed size
    (room for the length to grow), so the data never moves.
    """
    docs = tokens = 0
    with open(path, "wb") as f:
        first = _npy_header(dtype, 0)
        f.write(first)
        for chunk, count in chunks:
            chunk.tofile(f)
            docs, tokens = docs + count, tokens + chunk.size
        final = _npy_header(dtype, tokens)
        if len(final) != len(first):
            raise RuntimeError(f"npy header of {path} changed size ({len(first)} -> {len(final)} bytes)")
        f.seek(0)
        f.write(final)
    return docs, tokens


def encoded_chunks(path: str, text_key: str, tokenizer: Tokenizer, dtype: np.dtype, pool: Any, workers: int,
                   on_bytes) -> Iterator[tuple[np.ndarray, int]]:
    """``(tokens, documents)`` per chunk of ``path``, in order; in ``pool`` with at most 2 chunks per worker queued."""
    pending: deque = deque()
    for texts in text_chunks(path, text_key, on_bytes):
        if pool is None:
            yield encode_documents(tokenizer, texts, dtype), len(texts)
            continue
        pending.append((pool.apply_async(_encode_in_worker, (texts, dtype.str)), len(texts)))
        if len(pending) >= 2 * workers:
            result, count = pending.popleft()
            yield result.get(), count
    while pending:
        result, count = pending.popleft()
        yield result.get(), count


def check_outputs(inputs: list[str], output_dir: str, sizes_file: str, force: bool) -> list[str]:
    """The shard path of each input; ``DataError`` for a missing input, a repeated shard name or an existing output."""
    missing = [p for p in inputs if not os.path.isfile(p)]
    if missing:
        raise DataError(f"--input {missing[0]}: no such file")
    shards = [os.path.join(output_dir, shard_name(p)) for p in inputs]
    seen: dict[str, str] = {}
    for src, shard in zip(inputs, shards):
        if shard in seen:
            raise DataError(f"--input {seen[shard]} and {src} would both write {shard}; rename one of them or "
                            "tokenize them into different --output-dir folders")
        seen[shard] = src
    sizes_path = os.path.join(output_dir, sizes_file)
    if sizes_path in seen:
        raise DataError(f"--sizes-file {sizes_file} is also the shard of --input {seen[sizes_path]}; name it otherwise")
    if not force:
        for out in [*shards, sizes_path]:
            if os.path.exists(out):
                raise DataError(f"{out} already exists; pass --overwrite to replace it, or choose another --output-dir")
    return shards


def make_dataset(inputs: list[str], output_dir: str, sizes_file: str, tokenizer_kwargs: dict[str, Any],
                 text_key: str = "text", workers: int = 1, force: bool = False) -> dict[str, tuple[int, int]]:
    """Tokenize ``inputs`` into ``output_dir``; (documents, tokens) per shard file name."""
    from tqdm import tqdm

    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    shards = check_outputs(inputs, output_dir, sizes_file, force)
    tokenizer = make_tokenizer(**tokenizer_kwargs)
    dtype = shard_dtype(tokenizer.vocab_size)
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise DataError(f"--output-dir {output_dir}: cannot create the folder ({exc.strerror})") from None
    remove_orphans(output_dir)  # what a killed run left
    sizes_path = os.path.join(output_dir, sizes_file)
    temps = {out: temporary_path(out) for out in [*shards, sizes_path]}
    counts: dict[str, tuple[int, int]] = {}
    pool = None
    if workers > 1:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (tokenizer_kwargs,))
    try:
        total = sum(os.path.getsize(p) for p in inputs)
        with tqdm(total=total, unit="B", unit_scale=True, mininterval=1.0, desc="tokenizing") as bar:
            for src, shard in zip(inputs, shards):
                bar.set_postfix_str(os.path.basename(src))
                chunks = encoded_chunks(src, text_key, tokenizer, dtype, pool, workers, bar.update)
                counts[os.path.basename(shard)] = write_shard(temps[shard], chunks, dtype)
                if counts[os.path.basename(shard)][1] == 0:
                    raise DataError(f"corpus {src} is empty: there is nothing to tokenize; check the file (and "
                                    "--text-key)")
        with open(temps[sizes_path], "w", encoding="utf-8") as f:
            json.dump({name: tokens for name, (_, tokens) in counts.items()}, f, indent=1)
            f.write("\n")
        for out, tmp in temps.items():  # the sizes file last: it names only shards already in place
            os.replace(tmp, out)
    finally:
        if pool is not None:
            pool.terminate()
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="loose json files, one shard each")
    parser.add_argument("--output-dir", required=True, help="folder for the shards and the sizes file")
    parser.add_argument("--sizes-file", default="sizes.txt", help="name of the sizes file in --output-dir")
    parser.add_argument("--tokenizer-type", default="GPT2BPETokenizer", choices=TOKENIZER_TYPES)
    parser.add_argument("--vocab-file", default=None, help="vocabulary (default: the one in --cache-dir)")
    parser.add_argument("--merge-file", default=None, help="GPT-2 merges (default: the one in --cache-dir)")
    parser.add_argument("--cache-dir", default=None, help="where tools/fetch_sample_data.py put the vocabulary")
    parser.add_argument("--tokenizer-model-type", default=None, help="BERT model type (cased or uncased)")
    parser.add_argument("--tokenizer-path", default=None, help="SentencePiece model (trained on --input if absent)")
    parser.add_argument("--text-key", default="text", help="key of the document text (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    parser.add_argument("--overwrite", "--force", dest="force", action="store_true",
                        help="overwrite existing shards and sizes file")
    args = parser.parse_args(argv)
    tokenizer_kwargs = {"tokenizer_type": args.tokenizer_type, "vocab_file": args.vocab_file,
                        "merge_file": args.merge_file, "cache_dir": args.cache_dir,
                        "model_type": args.tokenizer_model_type, "tokenizer_path": args.tokenizer_path,
                        "train_files": args.input, "text_key": args.text_key}
    start = time.monotonic()
    counts: dict = {}
    status = run_cli(lambda: counts.update(make_dataset(args.input, args.output_dir, args.sizes_file,
                                                        tokenizer_kwargs, args.text_key, args.workers, args.force)),
                     lambda exc: f"cannot write in --output-dir {args.output_dir}: {exc.strerror or exc}")
    if status:
        return status
    for name, (docs, tokens) in counts.items():
        print(f"  {name}: {docs} documents, {tokens} tokens")
    docs, tokens = (sum(c[k] for c in counts.values()) for k in (0, 1))
    shards = f"{len(counts)} shard{'s' * (len(counts) != 1)}"
    print(f"wrote {shards} ({docs} documents, {tokens} tokens) and {args.sizes_file} to {args.output_dir} in "
          f"{time.monotonic() - start:.1f}s")
    print(f"flags: --use-npy-data-loader --train-data-path {args.output_dir} --input-data-sizes-file {args.sizes_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
