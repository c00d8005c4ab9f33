"""Batch samplers that split every global batch across data-parallel ranks, and the data loader.

A global batch is ``batch_size * dp_size`` sample indices; data-parallel rank ``r`` takes the
contiguous slice ``[r * batch_size, (r + 1) * batch_size)`` of it. Position is a single number,
``consumed_samples`` (global samples already trained on), so a resumed run continues with exactly
the batches an unbroken run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from data_utils.errors import DataError


def _check_layout(num_samples: int, batch_size: int, dp_rank: int, dp_size: int, consumed_samples: int) -> None:
    if batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"bad batch layout: batch_size={batch_size}, dp_rank={dp_rank}, dp_size={dp_size}")
    if num_samples < 1:
        raise DataError("the dataset has no samples")
    if consumed_samples < 0:
        raise DataError(f"consumed_samples must be >= 0, got {consumed_samples}")


class DistributedBatchSampler:
    """Endless shuffled batches of indices for this data-parallel rank (training).

    The sample order is the concatenation of per-epoch permutations of ``range(num_samples)``,
    epoch ``e`` shuffled by a torch generator seeded with ``seed + e``; global batches are
    consecutive runs of that order, so one may straddle two epochs. Iteration starts at
    ``consumed_samples``; the sampler itself holds no other state. Without ``shuffle`` every epoch
    walks the samples in order (``--no-shuffle``).
    """

    def __init__(self, num_samples: int, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 consumed_samples: int = 0, shuffle: bool = True) -> None:
        _check_layout(num_samples, batch_size, dp_rank, dp_size, consumed_samples)
        self.num_samples, self.batch_size, self.seed, self.shuffle = num_samples, batch_size, seed, shuffle
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch_size = batch_size * dp_size
        self.consumed_samples = consumed_samples
        self._cached: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of ``epoch``."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._cached = (epoch, torch.randperm(self.num_samples, generator=gen).numpy())
        return self._cached[1]

    def global_batch(self, consumed_samples: int) -> np.ndarray:
        """Indices of the global batch that starts after ``consumed_samples`` samples."""
        pieces, pos, left = [], consumed_samples, self.global_batch_size
        while left:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(self.num_samples - offset, left)
            pieces.append(self.permutation(epoch)[offset:offset + take])
            pos, left = pos + take, left - take
        return np.concatenate(pieces)

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.consumed_samples
        lo = self.dp_rank * self.batch_size
        while True:
            yield self.global_batch(consumed)[lo:lo + self.batch_size].tolist()
            consumed += self.global_batch_size


class SequentialBatchSampler:
    """One in-order pass of batches of indices for this rank (evaluation); finite.

    Starts at ``consumed_samples``; a last global batch shorter than ``batch_size * dp_size`` is
    dropped so that every rank runs the same number of equally shaped batches.
    """

    def __init__(self, num_samples: int, batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0) -> None:
        _check_layout(num_samples, batch_size, dp_rank, dp_size, consumed_samples)
        self.num_samples, self.batch_size = num_samples, batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch_size = batch_size * dp_size
        self.consumed_samples = consumed_samples

    def __len__(self) -> int:
        return max(0, self.num_samples - self.consumed_samples) // self.global_batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(len(self)):
            start = self.consumed_samples + k * self.global_batch_size + self.dp_rank * self.batch_size
            yield list(range(start, start + self.batch_size))


def collate(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack each key of the samples into an int64 tensor ``[batch, ...]``."""
    return {key: torch.from_numpy(np.stack([s[key] for s in samples]).astype(np.int64)) for key in samples[0]}


class DataIterator:
    """Batches ``{'text': LongTensor[batch_size, seq_length + 1]}`` with a checkpointable position.

    ``consumed_samples`` counts global samples handed out (not those prefetched by workers), so
    ``state_dict()`` saved after iteration ``k`` resumes at iteration ``k + 1``.
    """

    def __init__(self, loader: torch.utils.data.DataLoader,
                 sampler: DistributedBatchSampler | SequentialBatchSampler) -> None:
        self.loader, self.sampler = loader, sampler
        self.consumed_samples = sampler.consumed_samples
        self._it: Iterator[dict[str, torch.Tensor]] | None = None

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._it = iter(self.loader)
        batch = next(self._it)
        self.consumed_samples += self.sampler.global_batch_size
        return batch

    def __len__(self) -> int:
        """Batches left (evaluation loaders only)."""
        if not isinstance(self.sampler, SequentialBatchSampler):
            raise TypeError("a training data iterator is endless")
        done = (self.consumed_samples - self.sampler.consumed_samples) // self.sampler.global_batch_size
        return len(self.sampler) - done

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restart at ``state['consumed_samples']`` (drops any prefetched batches)."""
        self.sampler.consumed_samples = self.consumed_samples = int(state["consumed_samples"])
        self._it = None


def make_data_loader(dataset: torch.utils.data.Dataset, batch_size: int, dp_rank: int, dp_size: int, seed: int,
                     consumed_samples: int = 0, shuffle: bool = True, num_workers: int = 0,
                     in_order: bool = False) -> DataIterator:
    """This rank's batches of ``dataset``: endless and shuffled (``shuffle``) or one ordered pass.

    ``batch_size`` is per rank; all ranks together consume ``batch_size * dp_size`` samples per step.
    ``in_order`` makes the endless training batches walk each epoch in sample order instead.
    """
    if shuffle:
        sampler: DistributedBatchSampler | SequentialBatchSampler = DistributedBatchSampler(
            len(dataset), batch_size, dp_rank, dp_size, seed, consumed_samples, shuffle=not in_order)
    else:
        sampler = SequentialBatchSampler(len(dataset), batch_size, dp_rank, dp_size, consumed_samples)
    # A generator of its own: otherwise every new iterator draws its worker seed from the global torch
    # stream, and building a loader (after a resume, or for evaluation) would shift the dropout masks.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(seed))
    return DataIterator(loader, sampler)
