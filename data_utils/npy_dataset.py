"""Megatron-LM 2019's npy shards (``--use-npy-data-loader``): a folder of ``.npy`` token shards and a sizes file.

A split is one folder (``--train-data-path``, ``--val-data-path``, ``--test-data-path``) holding:

- the sizes file (``--input-data-sizes-file``, ``sizes.txt`` by default): a json object
  ``{shard file name: number of tokens in the shard}``; only the shards it lists are read;
- the shards: each a 1-D integer ``.npy`` array, the documents' tokens back to back, each document
  followed by the end-of-document id (``openwebtext/make_gpt2_dataset.py`` writes them: uint16 when the
  vocabulary fits, else int32). They are memory-mapped (``np.load(mmap_mode="r")``), never read whole.

Sampling (as the 2019 loader): shards are taken in sorted name order; a shard of ``n`` tokens gives
``(n - 1) // seq_length`` samples, and its sample ``j`` holds its tokens
``[j * seq_length, j * seq_length + seq_length + 1)`` (consecutive samples share one boundary token;
inputs are ``text[:-1]``, labels ``text[1:]``; the tail that fills no whole sample is unused). Samples
never cross shards. The sampler shuffles samples, so the 2019 loader's seeded shard order is not kept.

The 2019 ``make_gpt2_dataset.py`` saved each shard as a pickled numpy *object* array of per-document
token arrays. Loading a pickle runs code chosen by whoever wrote the file, so such shards are refused
unless ``trust_pickle``; then each is flattened once into a plain 1-D array at
``CACHE_DIR/npy_flat/<name>.<key>.npy`` (``key`` hashes the shard's real path, size and mtime, so an
edited shard gets a fresh copy), written under a temporary name and renamed, and that copy is mapped.
Under torch.distributed the first rank of the group flattens while the others wait.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any

import numpy as np
import torch

from atomic import remove_orphans, temporary_path
from data_utils.coordination import once_per_group
from data_utils.datasets import sample_index, split_lengths
from data_utils.errors import DataError

logger = logging.getLogger(__name__)
FLAT_FOLDER = "npy_flat"
FLAT_FORMAT = 1
TRUST_FLAG = "--trust-pickle"
_SPLIT_FLAGS = {"train": "--train-data-path", "valid": "--val-data-path", "test": "--test-data-path"}
_WRITER = "openwebtext/make_gpt2_dataset.py"


def read_sizes(path: str) -> dict[str, int]:
    """The sizes file at ``path``: shard file name -> tokens; one-line ``DataError`` when missing or malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            sizes = json.load(f)
    except FileNotFoundError:
        raise DataError(f"sizes file {path} does not exist; write the folder with {_WRITER} or name the right "
                        "file with --input-data-sizes-file") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"sizes file {path}:{exc.lineno}: not valid JSON ({exc.msg}); it must be a json object "
                        "{shard file name: number of tokens}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read sizes file {path} ({exc}); check the file") from None
    if not isinstance(sizes, dict):
        raise DataError(f"sizes file {path} holds a json {type(sizes).__name__}, expected an object "
                        "{shard file name: number of tokens}")
    for name, size in sizes.items():
        if type(size) is not int or size < 0:
            raise DataError(f"sizes file {path}: shard {name!r} has size {size!r}, expected a non-negative "
                            "integer number of tokens")
    return sizes


def read_npy_header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the ``.npy`` file at ``path`` from its header; ``DataError`` if it is not one, or is cut short.

    Only the header is read; a plain (non-object) array's file must also be long enough for the data it declares.
    """
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version[0]}.{version[1]} is not supported")
            data_start, size = f.tell(), os.fstat(f.fileno()).st_size
    except (OSError, ValueError) as exc:
        raise DataError(f"shard {path} is not a readable .npy file ({exc}); regenerate it with {_WRITER}") from None
    needed = data_start + int(np.prod(shape)) * dtype.itemsize
    if not dtype.hasobject and size < needed:
        raise DataError(f"shard {path} is cut short: {size} bytes, its header declares a {shape} {dtype} array "
                        f"({needed} bytes); copy it again or regenerate it with {_WRITER}")
    return shape, dtype


def _flat_path(path: str, cache_dir: str) -> str:
    """Where the flattened copy of the object-array shard ``path`` lives, keyed by its path, size and mtime."""
    stat = os.stat(path)
    ident = {"format": FLAT_FORMAT, "source": os.path.realpath(path), "size": stat.st_size,
             "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(path)).removesuffix(".npy")
    return os.path.join(cache_dir, FLAT_FOLDER, f"{stem}.{key}.npy")


def load_object_shard(path: str) -> np.ndarray:
    """A 2019 shard, unpickled (runs code from the file: only for trusted shards)."""
    try:
        return np.load(path, allow_pickle=True)
    except Exception as exc:  # a damaged pickle fails in many ways
        raise DataError(f"shard {path} could not be unpickled ({type(exc).__name__}: {exc}); regenerate it with "
                        f"{_WRITER}") from None


def flatten_object_shard(path: str) -> np.ndarray:
    """The per-document token arrays of a 2019 object-array shard joined into one 1-D integer array."""
    docs = load_object_shard(path)
    parts = []
    for i, doc in enumerate(docs.reshape(-1)):
        doc = np.asarray(doc)
        if doc.ndim != 1 or (doc.size and doc.dtype.kind not in "iu"):
            raise DataError(f"shard {path}: document {i} is a {doc.shape} {doc.dtype} array, expected 1-D "
                            "integer tokens")
        if doc.size:  # an empty list loads as float64, which would widen the whole shard
            parts.append(doc)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def _write_npy_atomically(target: str, array: np.ndarray) -> None:
    """``np.save`` to a temporary name beside ``target``, then one rename."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    remove_orphans(os.path.dirname(target))  # what a killed flatten left
    tmp = temporary_path(target)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _flat_fault(flat: str) -> str | None:
    """What is wrong with a flattened copy (``missing`` when absent), or None when it is a 1-D integer array."""
    if not os.path.isfile(flat):
        return "missing"
    try:
        shape, dtype = read_npy_header(flat)
    except DataError as exc:
        return str(exc)
    return None if len(shape) == 1 and dtype.kind in "iu" else f"holds a {shape} {dtype} array"


def flattened_copy(path: str, cache_dir: str | None, group: Any = None) -> str:
    """The 1-D copy of the object-array shard ``path`` under ``cache_dir``, built once (by the group's first rank)."""
    if cache_dir is None:
        raise DataError(f"shard {path} is a 2019 object array; {TRUST_FLAG} flattens it into --cache-dir, which is "
                        "not set: pass --cache-dir DIR")
    flat = _flat_path(path, cache_dir)
    once_per_group(lambda: _flat_fault(flat) is None,
                    lambda: _write_npy_atomically(flat, flatten_object_shard(path)), group, f"a flat copy of {path}")
    return flat


def _readable_shard(path: str, cache_dir: str | None, trust_pickle: bool, group: Any) -> tuple[str, int]:
    """(the 1-D ``.npy`` to map for shard ``path``, its token count): ``path`` itself, or its flattened copy."""
    shape, dtype = read_npy_header(path)
    if dtype.hasobject:
        if not trust_pickle:
            raise DataError(f"shard {path} is a pickled 2019 object array; loading a pickle runs code from the file: "
                            f"pass {TRUST_FLAG} (with --cache-dir) if you trust it, or regenerate it with {_WRITER}")
        path = flattened_copy(path, cache_dir, group)
        shape, dtype = read_npy_header(path)
    if len(shape) != 1 or dtype.kind not in "iu":
        raise DataError(f"shard {path} holds a {shape} {dtype} array, expected a 1-D integer array of tokens; "
                        f"regenerate it with {_WRITER}")
    return path, int(shape[0])


class NpyShardsDataset(torch.utils.data.Dataset):
    """Windows of ``seq_length + 1`` tokens over each listed shard of ``data_path``; ``{'text': int64 array}``.

    The module docstring gives the layout and the sampling rule. Shards are memory-mapped on first use
    in each process; pickling (data-loader workers) carries the paths, not the maps.
    """

    def __init__(self, data_path: str, sizes_file: str, seq_length: int, cache_dir: str | None = None,
                 trust_pickle: bool = False, name: str = "train", group: Any = None) -> None:
        flag = _SPLIT_FLAGS.get(name, "the data path flag")
        if seq_length < 1:
            raise DataError(f"--seq-length must be positive, got {seq_length}")
        if not os.path.isdir(data_path):
            raise DataError(f"{flag} {data_path}: no such folder; it must hold the .npy shards and the sizes file")
        sizes_path = os.path.join(data_path, sizes_file)
        sizes = read_sizes(sizes_path)
        self.data_path, self.seq_length, self.name = data_path, seq_length, name
        self.shards = sorted(sizes)
        self.paths: list[str] = []
        for shard in self.shards:
            path = os.path.join(data_path, shard)
            if not os.path.isfile(path):
                raise DataError(f"shard {path}, listed in {sizes_path}, does not exist; restore it or remove it from "
                                "the sizes file")
            readable, count = _readable_shard(path, cache_dir, trust_pickle, group)
            if count != sizes[shard]:
                raise DataError(f"shard {path} holds {count} tokens but {sizes_path} says {sizes[shard]}; fix the "
                                f"sizes file (or regenerate the folder with {_WRITER})")
            self.paths.append(readable)
        self.sizes = np.array([sizes[s] for s in self.shards], dtype=np.int64)
        per_shard = np.maximum(self.sizes - 1, 0) // seq_length
        self.starts = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)  # first sample of each shard
        self.num_samples = int(self.starts[-1])
        self.num_tokens = int(self.sizes.sum())
        if self.num_samples == 0:
            raise DataError(f"the {name} split in {data_path} has {self.num_tokens} tokens in {len(self.shards)} "
                            f"shards, and no shard holds the {seq_length + 1} one sample needs (--seq-length "
                            f"{seq_length}); use more data or a shorter --seq-length")
        self._maps: list[np.ndarray | None] = [None] * len(self.paths)

    def __len__(self) -> int:
        return self.num_samples

    def shard(self, k: int) -> np.ndarray:
        """Shard ``k``'s tokens, memory-mapped read-only (opened on first use, per process)."""
        if self._maps[k] is None:
            self._maps[k] = np.load(self.paths[k], mmap_mode="r")
        return self._maps[k]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = sample_index(i, self.num_samples)
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        start = (i - int(self.starts[k])) * self.seq_length
        return {"text": np.array(self.shard(k)[start:start + self.seq_length + 1], dtype=np.int64)}

    def __getstate__(self) -> dict[str, Any]:
        # Data-loader workers reopen the maps by path instead of pickling their contents.
        return {**self.__dict__, "_maps": [None] * len(self.paths)}


def build_npy_datasets(train_path: str | None, val_path: str | None, test_path: str | None, sizes_file: str,
                       seq_length: int, cache_dir: str | None = None, trust_pickle: bool = False, group: Any = None,
                       eval_seq_length: int | None = None
                       ) -> tuple[NpyShardsDataset | None, NpyShardsDataset | None, NpyShardsDataset | None]:
    """(train, valid, test) from the ``--*-data-path`` folders; None where a path is None (or empty).
    Validation and test windows have ``eval_seq_length`` tokens when given."""
    datasets: list[NpyShardsDataset | None] = []
    paths = (("train", train_path), ("valid", val_path), ("test", test_path))
    for (name, path), length in zip(paths, split_lengths(seq_length, eval_seq_length), strict=True):
        dataset = NpyShardsDataset(path, sizes_file, length, cache_dir, trust_pickle, name, group) \
            if path else None
        if dataset is not None:
            logger.info("%s: %d npy shards, %d tokens, %d samples of %d tokens", name, len(dataset.shards),
                        dataset.num_tokens, len(dataset), length + 1)
        datasets.append(dataset)
    return datasets[0], datasets[1], datasets[2]
