"""BERT pretraining TFRecords, as written by Google BERT's ``create_pretraining_data.py``, read as BERT samples.

A TFRecord file is a run of records ``uint64 length | uint32 masked_crc32c(length) | data[length] |
uint32 masked_crc32c(data)`` (little endian), ``data`` a serialized ``tf.train.Example`` with the int64
features ``input_ids``, ``input_mask``, ``segment_ids`` (``max_seq_length`` values each),
``masked_lm_positions``, ``masked_lm_ids`` (``max_predictions_per_seq`` values each, zero-padded),
``next_sentence_labels`` (one value, 1 when segment B is a random sentence) and the float feature
``masked_lm_weights`` (1.0 for a real prediction, 0.0 for padding).

Record ``i`` becomes the dict of int64 arrays that the loose-json BERT dataset yields::

    text        (s,)  input_ids
    types       (s,)  segment_ids
    is_random   ()    next_sentence_labels[0]
    mask        (s,)  1 at masked_lm_positions[j] for every j with masked_lm_weights[j] > 0, else 0
    mask_labels (s,)  masked_lm_ids[j] at those positions, -1 elsewhere
    pad_mask    (s,)  1 - input_mask (1 on padding)

Positions whose weight is 0 are padding and are never predicted. Training files are dealt out whole
to data-parallel ranks (``shard_tfrecord_files``); each rank's loader then shuffles its own records.
Both CRCs are checked (``crc32c``), so a corrupt or truncated file stops with a ``DataError``.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from data_utils.errors import DataError

try:  # the ``tfrecord`` package brings crc32c and protobuf; only TFRecord users need them
    import crc32c
    from google.protobuf.message import DecodeError
    from tfrecord import example_pb2
except ImportError:  # pragma: no cover - exercised only where the packages are absent
    crc32c = example_pb2 = None
    DecodeError = Exception

_HEADER = 12  # uint64 length, uint32 masked crc32c of those 8 bytes
_FOOTER = 4  # uint32 masked crc32c of the data
_MAX_OPEN_FILES = 32  # file handles kept open per process; more files are reopened as needed
_SEQ, _PREDS = "--seq-length", "--max-preds-per-seq"
# Google's feature name -> (the Feature kind it must hold, the flag that sets its length; None: one value).
FEATURES = {
    "input_ids": ("int64_list", _SEQ),
    "input_mask": ("int64_list", _SEQ),
    "segment_ids": ("int64_list", _SEQ),
    "masked_lm_positions": ("int64_list", _PREDS),
    "masked_lm_ids": ("int64_list", _PREDS),
    "masked_lm_weights": ("float_list", _PREDS),
    "next_sentence_labels": ("int64_list", None),
}


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's checksum: crc32c rotated right by 15 bits plus ``0xA282EAD8``, modulo 2**32."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _require_packages() -> None:
    if crc32c is None or example_pb2 is None:
        raise DataError("reading TFRecords needs the tfrecord package (it brings crc32c): pip install tfrecord")


def index_tfrecord_file(path: str) -> np.ndarray:
    """Byte offsets of every record of ``path``, then the file size: int64 ``(records + 1,)``.

    Reads only the 12-byte length headers (checking their CRC) and jumps over the data, so a file
    whose last record is cut short, or whose length field is corrupt, fails here.
    """
    if not os.path.isfile(path):
        raise DataError(f"TFRecord file {path} does not exist (or is not a file); check the data paths")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"TFRecord file {path} has no records; remove it from the data paths")
    offsets, pos = [], 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        while pos < size:
            where = f"TFRecord file {path}: record {len(offsets)} at byte offset {pos}"
            if size - pos < _HEADER:
                raise DataError(f"{where} is truncated ({size - pos} of {_HEADER} header bytes); re-copy the file")
            length, crc = struct.unpack_from("<QI", mm, pos)
            if masked_crc32c(mm[pos:pos + 8]) != crc:
                raise DataError(f"{where} has a corrupt length header (CRC mismatch); re-copy or regenerate the file")
            end = pos + _HEADER + length + _FOOTER
            if end > size:
                raise DataError(f"{where} is truncated (needs {end - pos} bytes, {size - pos} left); re-copy the file")
            offsets.append(pos)
            pos = end
    offsets.append(size)
    return np.array(offsets, dtype=np.int64)


class TFRecordBertDataset(torch.utils.data.Dataset):
    """The records of ``paths``, in file order, as BERT samples (see the module docstring).

    Construction indexes every file and decodes each file's first record, so a wrong ``seq_length``
    or ``max_preds_per_seq`` fails at once; every record read later is checked the same way. File
    handles are opened lazily in each process (DataLoader workers included) and never pickled.
    ``rank_sharded`` tells the training loop that this dataset holds only this data-parallel rank's
    share of the data.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], seq_length: int, max_preds_per_seq: int,
                 rank_sharded: bool = False) -> None:
        _require_packages()
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        if not self.paths:
            raise DataError("no TFRecord files given; pass at least one file to --train-data/--valid-data/--test-data")
        if seq_length < 1 or max_preds_per_seq < 1:
            raise DataError(f"{_SEQ} ({seq_length}) and {_PREDS} ({max_preds_per_seq}) must be at least 1")
        self.seq_length, self.max_preds_per_seq = seq_length, max_preds_per_seq
        self.rank_sharded = rank_sharded
        self._offsets = [index_tfrecord_file(p) for p in self.paths]
        self._starts = np.cumsum([0] + [len(o) - 1 for o in self._offsets])  # first sample of each file, then len
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()
        for f in range(len(self.paths)):
            self._read(f, 0)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} TFRecord samples")
        index %= len(self)
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._read(f, index - int(self._starts[f]))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # open files stay in the process that opened them
        return state

    def _file(self, f: int):
        """An open handle on file ``f`` for this process (least recently used handles are closed)."""
        if self._pid != os.getpid():  # a forked worker: sharing the parent's handles would share their offsets
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.pop(f, None)
        if handle is None:
            try:
                handle = open(self.paths[f], "rb")  # kept open across reads; closed on eviction
            except OSError as e:
                raise DataError(f"cannot open TFRecord file {self.paths[f]}: {e.strerror}") from None
            if len(self._handles) >= _MAX_OPEN_FILES:
                self._handles.popitem(last=False)[1].close()
        self._handles[f] = handle
        return handle

    def _record_data(self, f: int, k: int, where: str) -> memoryview:
        """The Example bytes of record ``k`` of file ``f``, its CRC checked."""
        start, end = int(self._offsets[f][k]), int(self._offsets[f][k + 1])
        handle = self._file(f)
        handle.seek(start + _HEADER)
        blob = memoryview(handle.read(end - start - _HEADER))
        if len(blob) != end - start - _HEADER:
            raise DataError(f"{where} is truncated (the file shrank after it was indexed); re-copy the file")
        data = blob[:-_FOOTER]
        if masked_crc32c(data) != struct.unpack("<I", blob[-_FOOTER:])[0]:
            raise DataError(f"{where}: data CRC mismatch, the file is corrupt; re-copy or regenerate it")
        return data

    def _read(self, f: int, k: int) -> dict[str, np.ndarray]:
        where = f"TFRecord file {self.paths[f]}: record {k}"
        features = self._features(self._record_data(f, k, where), where)
        return self._sample(features, where)

    def _features(self, data: memoryview, where: str) -> dict[str, np.ndarray]:
        """Google's seven features of one serialized Example, lengths checked against the flags."""
        example = example_pb2.Example()
        try:
            example.ParseFromString(data)
        except DecodeError:
            raise DataError(f"{where} is not a tf.train.Example; is this a BERT pretraining TFRecord?") from None
        feature_map = example.features.feature
        lengths = {_SEQ: self.seq_length, _PREDS: self.max_preds_per_seq, None: 1}
        out = {}
        for name, (kind, flag) in FEATURES.items():
            if name not in feature_map:
                raise DataError(f"{where} has no feature {name!r}; expected the features of create_pretraining_data.py")
            got = feature_map[name].WhichOneof("kind")
            if got != kind:
                raise DataError(f"{where}: feature {name!r} has kind {got}, expected {kind}")
            values = getattr(feature_map[name], kind).value
            if len(values) != lengths[flag]:
                fix = (f"but {flag} is {lengths[flag]}; set {flag} to the length the records were written with"
                       if flag else "expected exactly 1")
                raise DataError(f"{where}: feature {name!r} has {len(values)} values {fix}")
            out[name] = np.array(values, dtype=np.float32 if kind == "float_list" else np.int64)
        return out

    def _sample(self, features: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
        real = features["masked_lm_weights"] > 0  # (p,): weight 0 marks padding predictions
        positions = features["masked_lm_positions"][real]  # (m,)
        if positions.size and (positions.min() < 0 or positions.max() >= self.seq_length):
            raise DataError(f"{where}: masked_lm_positions {positions.tolist()} fall outside [0, {self.seq_length})")
        is_random = features["next_sentence_labels"][0]
        if is_random not in (0, 1):
            raise DataError(f"{where}: next_sentence_labels is {is_random}, expected 0 or 1")
        mask = np.zeros(self.seq_length, dtype=np.int64)
        mask[positions] = 1
        mask_labels = np.full(self.seq_length, -1, dtype=np.int64)
        mask_labels[positions] = features["masked_lm_ids"][real]
        return {
            "text": features["input_ids"],
            "types": features["segment_ids"],
            "is_random": np.array(is_random, dtype=np.int64),
            "mask": mask,
            "mask_labels": mask_labels,
            "pad_mask": 1 - features["input_mask"],
        }


def shard_tfrecord_files(paths: Sequence[str], dp_rank: int, dp_size: int) -> list[str]:
    """Data-parallel rank ``dp_rank``'s whole files: ``paths[dp_rank], paths[dp_rank + dp_size], ...``."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"bad data-parallel layout: dp_rank={dp_rank}, dp_size={dp_size}")
    if len(paths) < dp_size:
        raise DataError(
            f"{len(paths)} TFRecord file(s) for {dp_size} data-parallel ranks: each data-parallel rank reads "
            f"whole files, so give at least {dp_size} files (split the data into more files) or use fewer ranks"
        )
    return [os.fspath(p) for p in paths[dp_rank::dp_size]]


def build_tfrecord_datasets(train_paths: Sequence[str] | None, valid_paths: Sequence[str] | None,
                            test_paths: Sequence[str] | None, seq_length: int, max_preds_per_seq: int,
                            dp_rank: int, dp_size: int, eval_seq_length: int | None = None,
                            eval_max_preds_per_seq: int | None = None) -> tuple[TFRecordBertDataset | None, ...]:
    """(train, valid, test) datasets, ``None`` where no paths are given.

    Training files are sharded by whole files over the data-parallel ranks (``rank_sharded``). Every
    rank reads all the validation and test records and the loader splits their batches by rank, so
    those splits need not have a file per rank and every rank runs the same evaluation batches.
    """
    train = None
    if train_paths:
        train = TFRecordBertDataset(shard_tfrecord_files(list(train_paths), dp_rank, dp_size), seq_length,
                                    max_preds_per_seq, rank_sharded=True)
    length, preds = eval_seq_length or seq_length, eval_max_preds_per_seq or max_preds_per_seq  # held-out records
    valid = TFRecordBertDataset(valid_paths, length, preds) if valid_paths else None
    test = TFRecordBertDataset(test_paths, length, preds) if test_paths else None
    return train, valid, test
