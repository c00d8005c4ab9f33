"""Megatron-Core's binary indexed dataset: ``PREFIX.bin`` (tokens) + ``PREFIX.idx`` (index), memory-mapped.

A corpus is tokenized once (``tools/preprocess_data.py``) into two files that Megatron-Core's
``megatron/core/datasets/indexed_dataset.py`` reads and writes byte for byte, so data prepared by either
project trains in the other.

``PREFIX.bin``: every sequence's tokens back to back, in the dataset's dtype, nothing else.

``PREFIX.idx``, little-endian::

    b"MMIDIDX\\x00\\x00"                     9 bytes
    version                   <Q  = 1
    dtype code                <B  1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequence count S          <Q
    document count D          <Q  number of documents + 1
    sequence_lengths          int32[S]   tokens in each sequence
    sequence_pointers         int64[S]   byte offset of each sequence in .bin
    document_indices          int64[D]   0, then after each document the index of the next one's first sequence

Document ``d`` is sequences ``[document_indices[d], document_indices[d + 1])``: one sequence per document
for GPT2-style data, one per sentence for BERT-style data (``--split-sentences``). The arrays start at
byte 34 and are not padded to alignment. Megatron-Core's multimodal variant appends ``int8[S]`` sequence
modes after ``document_indices``; such an index opens here and the modes are ignored.

Checked against Megatron-Core's ``indexed_dataset.py`` (``_INDEX_HEADER``, ``DType``, ``_IndexWriter``,
``_IndexReader``, ``IndexedDatasetBuilder``): the header bytes and field order above; the dtype codes
(float64 is 6 and float32 is 7); ``document count = len(document_indices)``, which starts with 0;
pointers are cumulative ``length * itemsize``; ``add_index`` shifts the appended ``document_indices[1:]``
by the sequences already written; and ``DType.optimal_dtype(vocab_size)`` is uint16 only when
``vocab_size < 65500`` (int32 otherwise, and for an unknown size), which ``best_dtype`` repeats.

Opening checks the pair in time independent of the data's size, except one vectorised pass over
``document_indices`` (8 bytes per document), and raises a one-line ``DataError`` naming the file for a
missing file, a foreign header, an unknown version or dtype, a truncated ``.idx``, a ``.bin`` of another
length than the index describes, or document indices that do not run from 0 up to the sequence count.
``IndexedDatasetBuilder`` streams tokens and index entries to temporary files beside the output, so its
memory stays bounded, and renames them into place only when ``finalize`` completes.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np

from atomic import temporary_path
from data_utils.errors import DataError
from errors import write_error

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEAD = struct.Struct("<9sQBQQ")  # header, version, dtype code, sequence count, document count: 34 bytes
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}
_UINT16_BELOW = 65500  # Megatron-Core's DType.optimal_dtype threshold
_CHUNK = 1 << 22  # entries per vectorised step over index arrays (bounds temporary memory)
_COPY_BYTES = 16 << 20
_REMEDY = "copy it again or re-run tools/preprocess_data.py"


def best_dtype(vocab_size: int | None) -> np.dtype:
    """The token dtype Megatron-Core picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < _UINT16_BELOW else np.int32)


def data_file_path(prefix: str) -> str:
    """``PREFIX.bin``, the tokens."""
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    """``PREFIX.idx``, the index."""
    return prefix + ".idx"


def _first_decrease(values: np.ndarray) -> int | None:
    """The first ``i`` with ``values[i] < values[i - 1]``, or None; vectorised in chunks."""
    for start in range(0, max(len(values) - 1, 0), _CHUNK):
        part = values[start:start + _CHUNK + 1]
        bad = np.flatnonzero(part[1:] < part[:-1])
        if bad.size:
            return start + int(bad[0]) + 1
    return None


def _read_head(idx_path: str, prefix: str) -> tuple[int, np.dtype, int, int]:
    """(file size, dtype, sequence count, document count) from the first 34 bytes of ``idx_path``."""
    try:
        with open(idx_path, "rb") as f:
            head = f.read(_HEAD.size)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(f"{idx_path}: no such file, so {prefix} is not an indexed dataset; tools/preprocess_data.py "
                        "writes PREFIX.bin and PREFIX.idx (check the prefix)") from None
    except OSError as exc:
        raise DataError(f"cannot read {idx_path}: {exc.strerror}") from None
    if head[:len(INDEX_HEADER)] != INDEX_HEADER[:len(head)]:
        raise DataError(f"{idx_path}: not a Megatron indexed dataset index (it starts {head[:9]!r}, expected "
                        f"{INDEX_HEADER!r}); pass the prefix of a pair written by tools/preprocess_data.py")
    if len(head) < _HEAD.size:
        raise DataError(f"{idx_path}: truncated: {size} bytes, shorter than the {_HEAD.size}-byte header; {_REMEDY}")
    _, version, code, sequences, documents = _HEAD.unpack(head)
    if version != INDEX_VERSION:
        raise DataError(f"{idx_path}: index version {version}, only version {INDEX_VERSION} is known; re-run "
                        "tools/preprocess_data.py to write it again")
    if code not in DTYPE_CODES:
        raise DataError(f"{idx_path}: unknown dtype code {code} (known: {', '.join(map(str, DTYPE_CODES))}); the "
                        f"file is damaged: {_REMEDY}")
    need = _HEAD.size + 12 * sequences + 8 * documents
    if size < need:
        raise DataError(f"{idx_path}: truncated: {size} bytes, but its counts ({sequences} sequences, {documents} "
                        f"document indices) need {need}; {_REMEDY}")
    if size not in (need, need + sequences):  # + sequences: Megatron-Core's multimodal int8 modes
        raise DataError(f"{idx_path}: {size} bytes, but its counts ({sequences} sequences, {documents} document "
                        f"indices) need {need}; the file is damaged: {_REMEDY}")
    return size, DTYPE_CODES[code], sequences, documents


class IndexedDataset:
    """A ``.bin``/``.idx`` pair, memory-mapped: ``ds[i]`` is sequence ``i`` and ``ds.document(d)`` document ``d``.

    Nothing is read whole: the index arrays and the tokens are views of read-only maps. Pickling keeps
    only the prefix, so data-loader workers map the files again.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        _, self.dtype, sequences, documents = _read_head(idx_path, self.prefix)
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        offset = _HEAD.size
        self.sequence_lengths = np.frombuffer(index, np.int32, sequences, offset)
        offset += 4 * sequences
        self.sequence_pointers = np.frombuffer(index, np.int64, sequences, offset)
        offset += 8 * sequences
        self.document_indices = np.frombuffer(index, np.int64, documents, offset)
        self._check_documents(idx_path, sequences)
        try:
            bin_size = os.path.getsize(bin_path)
        except FileNotFoundError:
            raise DataError(f"{bin_path}: no such file, but its index {idx_path} exists; tools/preprocess_data.py "
                            "writes both (copy the .bin too, or re-run it)") from None
        self._check_data_size(bin_path, idx_path, bin_size)
        self.num_tokens = bin_size // self.dtype.itemsize
        self._tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r").view(np.ndarray) if bin_size
                        else np.empty(0, self.dtype))

    def _check_documents(self, idx_path: str, sequences: int) -> None:
        docs = self.document_indices
        where = f"{idx_path}: document indices"
        if len(docs) == 0:
            raise DataError(f"{where} are empty (they start with 0 and end at the sequence count); {_REMEDY}")
        if docs[0] != 0:
            raise DataError(f"{where} start at {int(docs[0])}, not 0; the file is damaged: {_REMEDY}")
        if docs[-1] != sequences:
            raise DataError(f"{where} end at {int(docs[-1])}, not at the sequence count {sequences}; the file is "
                            f"damaged: {_REMEDY}")
        bad = _first_decrease(docs)
        if bad is not None:
            raise DataError(f"{where} decrease at entry {bad} ({int(docs[bad - 1])} then {int(docs[bad])}); the "
                            f"file is damaged: {_REMEDY}")

    def _check_data_size(self, bin_path: str, idx_path: str, bin_size: int) -> None:
        itemsize = self.dtype.itemsize
        need = 0
        if len(self.sequence_lengths):
            if self.sequence_pointers[0] != 0:
                raise DataError(f"{idx_path}: the first sequence starts at byte {int(self.sequence_pointers[0])}, "
                                f"not 0; the file is damaged: {_REMEDY}")
            need = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
        if bin_size < need:
            raise DataError(f"{bin_path}: truncated: {bin_size} bytes, but {idx_path} says {need} "
                            f"({need // itemsize} {self.dtype.name} tokens); {_REMEDY}")
        if bin_size > need:
            raise DataError(f"{bin_path}: {bin_size} bytes, but {idx_path} says {need} ({need // itemsize} "
                            f"{self.dtype.name} tokens): the two files do not belong together; {_REMEDY}")

    @staticmethod
    def exists(prefix: str) -> bool:
        """Whether both ``PREFIX.bin`` and ``PREFIX.idx`` exist (nothing is checked beyond that)."""
        return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))

    def __len__(self) -> int:
        """The number of sequences."""
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        """Sequence ``i`` (negative counts from the end), a read-only view of the map."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end when ``length`` is None), a view."""
        size = int(self.sequence_lengths[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) of sequence {i}, which has {size}")
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start:start + length]

    @property
    def tokens(self) -> np.ndarray:
        """Every token of ``.bin`` as one flat read-only view: sequence ``i`` starts at
        ``sequence_pointers[i] // dtype.itemsize`` (for readers that slice across sequences)."""
        return self._tokens

    @property
    def num_documents(self) -> int:
        """The number of documents (one less than ``len(document_indices)``)."""
        return len(self.document_indices) - 1

    def document(self, d: int) -> np.ndarray:
        """Every sequence of document ``d`` back to back, one view (empty for a document without sequences)."""
        n = self.num_documents
        if not -n <= d < n:
            raise IndexError(f"document {d} of {n}")
        d %= n
        first, stop = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if first == stop:
            return self._tokens[:0]
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        end = int(self.sequence_pointers[stop - 1]) // self.dtype.itemsize + int(self.sequence_lengths[stop - 1])
        return self._tokens[start:end]

    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}: {self.num_documents} documents, {len(self)} sequences, "
                f"{self.num_tokens} {self.dtype.name} tokens)")


class IndexedDatasetBuilder:
    """Writes a ``.bin``/``.idx`` pair in Megatron-Core's format, streaming, and atomically.

    Tokens go to a temporary ``.bin`` beside ``bin_path``; sequence lengths and document ends go to two
    more temporaries (so memory stays bounded however large the corpus), from which ``finalize``
    writes the index; then both files are renamed into place (``.bin`` first, so a present ``.idx``
    means a complete pair). Used as a context manager, a builder left without ``finalize`` (an
    exception) removes its temporaries, and a failed write (full disk, read-only folder) leaves as one
    ``errors.WriteError`` naming ``bin_path``; ``discard()`` removes them explicitly.
    """

    def __init__(self, bin_path: str, dtype: Any) -> None:
        self.bin_path, self.dtype = bin_path, np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no code in the format; use one of "
                             f"{', '.join(d.name for d in DTYPE_CODES.values())}")
        self._paths = [temporary_path(bin_path), temporary_path(bin_path + ".lengths"),
                       temporary_path(bin_path + ".documents")]
        self._files: list[BinaryIO] = []
        try:
            for path in self._paths:
                self._files.append(open(path, "wb", buffering=1 << 20))
        except BaseException as err:
            self.__exit__(type(err), err, None)
            raise
        self._data, self._lengths, self._documents = self._files
        self.num_sequences = self.num_documents = self.num_tokens = 0
        self._document_start = 0  # the first sequence not yet in a document

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, kind: type | None, err: BaseException | None, tb: object) -> None:
        self.discard()  # nothing left once finalize has renamed the files
        failure = write_error(err, self.bin_path) if isinstance(err, Exception) else None
        if failure is not None:
            raise failure from None

    def _as_tokens(self, tokens: Any) -> np.ndarray:
        """``tokens`` as a flat contiguous array of the builder's dtype; ValueError for ids that do not fit."""
        array = np.asarray(tokens).reshape(-1)
        if array.dtype != self.dtype:
            if array.size and self.dtype.kind in "iu" and array.dtype.kind in "iu":
                limits = np.iinfo(self.dtype)
                if array.min() < limits.min or array.max() > limits.max:
                    raise ValueError(f"token ids {array.min()}..{array.max()} do not fit in {self.dtype}")
            array = array.astype(self.dtype)
        return np.ascontiguousarray(array)

    def _write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append sequences: ``tokens`` back to back (already ``_as_tokens``), ``lengths`` per sequence."""
        if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("sequence lengths must lie in 0..2**31-1")
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"sequence lengths sum to {int(lengths.sum())}, but {tokens.size} tokens were given")
        self._data.write(memoryview(tokens).cast("B"))
        self._lengths.write(lengths.astype("<i4").tobytes())
        self.num_tokens += tokens.size
        self.num_sequences += lengths.size

    def _end_documents(self, ends: np.ndarray) -> None:
        self._documents.write(ends.astype("<i8").tobytes())
        self.num_documents += ends.size
        if ends.size:
            self._document_start = int(ends[-1])

    def add_item(self, tokens: Any) -> None:
        """Append one sequence to the current document (``end_document`` closes it)."""
        array = self._as_tokens(tokens)
        self._write(array, np.array([array.size], dtype=np.int64))

    def end_document(self) -> None:
        """Close the current document after the sequences given by ``add_item`` since the last one."""
        self._end_documents(np.array([self.num_sequences], dtype=np.int64))

    def add_document(self, tokens: Any, lengths: Sequence[int]) -> None:
        """Append one document: ``tokens`` is its sequences back to back, ``lengths`` their sizes."""
        self.add_documents(tokens, lengths, [len(lengths)])

    def add_documents(self, tokens: Any, lengths: Sequence[int], sequences_per_document: Sequence[int]) -> None:
        """Append several documents at once: ``tokens`` back to back, ``lengths`` per sequence, and how many
        sequences each document has (in order). The bulk form of ``add_document``."""
        self._require_closed("add_document")
        counts = np.asarray(sequences_per_document, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if (counts.size and counts.min() < 0) or int(counts.sum()) != lengths.size:
            raise ValueError(f"sequences_per_document sums to {int(counts.sum())}, but {lengths.size} lengths were "
                             "given")
        self._write(self._as_tokens(tokens), lengths)
        self._end_documents(self.num_sequences - lengths.size + np.cumsum(counts))

    def add_index(self, prefix: str) -> None:
        """Append every document of the dataset at ``prefix`` (for merging per-worker outputs)."""
        self._require_closed("add_index")
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise DataError(f"{index_file_path(prefix)}: its tokens are {other.dtype.name}, but this dataset's are "
                            f"{self.dtype.name}; merge only datasets written with the same tokenizer")
        base = self.num_sequences
        for start in range(0, len(other), _CHUNK):
            self._lengths.write(other.sequence_lengths[start:start + _CHUNK].astype("<i4").tobytes())
        self.num_sequences += len(other)
        for start in range(1, len(other.document_indices), _CHUNK):
            self._end_documents(other.document_indices[start:start + _CHUNK] + base)
        with open(data_file_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._data, _COPY_BYTES)
        self.num_tokens += other.num_tokens

    def _require_closed(self, what: str) -> None:
        if self._document_start != self.num_sequences:
            raise ValueError(f"{what}: {self.num_sequences - self._document_start} sequence(s) from add_item are "
                             "not in a document yet; call end_document() first")

    def finalize(self, idx_path: str) -> None:
        """Write the index to ``idx_path`` and rename both files into place (replacing existing ones)."""
        self._require_closed("finalize")
        tmp_idx = temporary_path(idx_path)
        try:
            for f in self._files:
                f.close()
            with open(tmp_idx, "wb") as out:
                self._write_index(out)
            if os.path.exists(idx_path):  # never pair an old index with the new data, even for a moment
                os.remove(idx_path)
            os.replace(self._paths[0], self.bin_path)
            os.replace(tmp_idx, idx_path)
        finally:
            if os.path.exists(tmp_idx):
                os.remove(tmp_idx)
            self.discard()

    def _write_index(self, out: BinaryIO) -> None:
        out.write(_HEAD.pack(INDEX_HEADER, INDEX_VERSION, _CODE_OF[self.dtype], self.num_sequences,
                             self.num_documents + 1))
        lengths_path, documents_path = self._paths[1], self._paths[2]
        with open(lengths_path, "rb") as f:
            shutil.copyfileobj(f, out, _COPY_BYTES)
        pointer = 0  # byte offset of the next sequence
        for chunk in _read_chunks(lengths_path, np.dtype("<i4")):
            ends = pointer + np.cumsum(chunk, dtype=np.int64) * self.dtype.itemsize
            out.write(np.concatenate(([pointer], ends[:-1])).astype("<i8").tobytes())
            pointer = int(ends[-1])
        out.write(np.zeros(1, dtype="<i8").tobytes())
        with open(documents_path, "rb") as f:
            shutil.copyfileobj(f, out, _COPY_BYTES)

    def discard(self) -> None:
        """Close and delete the temporaries (a no-op for those ``finalize`` renamed), also when closing fails."""
        for f in self._files:
            try:
                f.close()
            except OSError:  # flushing the buffer onto a full disk: the file goes anyway
                pass
        for path in self._paths:
            if os.path.exists(path):
                os.remove(path)


def _read_chunks(path: str, dtype: np.dtype) -> Any:
    """The values of a raw array file, ``_CHUNK`` at a time."""
    with open(path, "rb") as f:
        while True:
            chunk = np.fromfile(f, dtype=dtype, count=_CHUNK)
            if not chunk.size:
                return
            yield chunk
