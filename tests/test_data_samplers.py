"""Batch samplers: rank slices of each global batch, epochs, exact resume; the data loader."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from data_utils import DataError, GPT2Dataset, SequentialBatchSampler, make_data_loader
from data_utils.datasets import Documents
from data_utils.lazy_loader import load_corpus
from data_utils.samplers import DistributedBatchSampler
from tests.helpers import ByteTokenizer, write_jsonl


def rank_batches(num_samples, batch_size, dp_size, seed, consumed, steps):
    """[step][rank] -> index list, from one sampler per rank."""
    samplers = [DistributedBatchSampler(num_samples, batch_size, r, dp_size, seed, consumed) for r in range(dp_size)]
    per_rank = [list(itertools.islice(iter(s), steps)) for s in samplers]
    return [[per_rank[r][k] for r in range(dp_size)] for k in range(steps)]


def test_rank_slices_partition_each_global_batch():
    n, b, dp = 50, 3, 4  # global batch 12; 50 samples -> the 5th batch straddles epochs 0 and 1
    steps = rank_batches(n, b, dp, seed=11, consumed=0, steps=9)
    reference = DistributedBatchSampler(n, b, 0, dp, seed=11)
    for k, slices in enumerate(steps):
        assert all(len(s) == b for s in slices)
        union = [i for s in slices for i in s]
        assert union == reference.global_batch(k * b * dp).tolist()
        if k != 4:
            assert len(set(union)) == len(union)  # no overlap between ranks
    stream = [i for slices in steps for s in slices for i in s]
    assert sorted(stream[:n]) == list(range(n))  # epoch 0 is a permutation
    assert sorted(stream[n:2 * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]  # reshuffled per epoch
    assert stream[:n] != list(range(n))


def test_resume_from_consumed_samples_equals_unbroken_run():
    n, b, dp = 50, 3, 4
    unbroken = rank_batches(n, b, dp, seed=3, consumed=0, steps=20)
    for stop in (1, 4, 5, 9):  # 4*12=48 resumes right before the epoch boundary
        resumed = rank_batches(n, b, dp, seed=3, consumed=stop * b * dp, steps=20 - stop)
        assert resumed == unbroken[stop:]


def test_seed_changes_order():
    a = rank_batches(100, 4, 2, seed=0, consumed=0, steps=3)
    assert a == rank_batches(100, 4, 2, seed=0, consumed=0, steps=3)
    assert a != rank_batches(100, 4, 2, seed=1, consumed=0, steps=3)


def test_sequential_sampler_is_finite_ordered_and_drops_the_short_tail():
    batches = [list(SequentialBatchSampler(23, 2, r, 3)) for r in range(3)]  # global 6 -> 3 batches, 5 dropped
    assert batches[0] == [[0, 1], [6, 7], [12, 13]]
    assert batches[2] == [[4, 5], [10, 11], [16, 17]]
    assert len(SequentialBatchSampler(23, 2, 1, 3, consumed_samples=12)) == 1
    assert list(SequentialBatchSampler(23, 2, 1, 3, consumed_samples=12)) == [[14, 15]]


def test_bad_layout_is_a_data_error():
    with pytest.raises(DataError, match="dp_rank=2, dp_size=2"):
        DistributedBatchSampler(10, 1, 2, 2, seed=0)
    with pytest.raises(DataError, match="consumed_samples"):
        SequentialBatchSampler(10, 1, 0, 1, consumed_samples=-1)


def _dataset(tmp_path, lazy):
    texts = [f"doc {i}: " + "abc" * i for i in range(40)]
    src = write_jsonl(tmp_path / "c.json", texts)
    corpus = load_corpus(src, ByteTokenizer(), lazy, str(tmp_path))
    return GPT2Dataset(Documents([(corpus, np.arange(len(corpus)))]), seq_length=16, eod=256)


def test_loader_batches_and_resume(tmp_path):
    ds = _dataset(tmp_path, lazy=True)
    it = make_data_loader(ds, batch_size=4, dp_rank=1, dp_size=2, seed=9)
    first = [next(it) for _ in range(6)]
    assert it.state_dict() == {"consumed_samples": 6 * 8}
    batch = first[0]["text"]
    assert batch.dtype == torch.int64 and batch.shape == (4, 17)
    indices = DistributedBatchSampler(len(ds), 4, 1, 2, seed=9).global_batch(0)[4:8]
    torch.testing.assert_close(batch, torch.stack([torch.from_numpy(ds[int(i)]["text"]) for i in indices]))
    resumed = make_data_loader(ds, 4, 1, 2, seed=9, consumed_samples=3 * 8)
    for k in range(3, 6):
        torch.testing.assert_close(next(resumed)["text"], first[k]["text"], rtol=0, atol=0)
    it.load_state_dict({"consumed_samples": 8})
    torch.testing.assert_close(next(it)["text"], first[1]["text"], rtol=0, atol=0)


def test_loader_with_workers_matches_main_process(tmp_path):
    ds = _dataset(tmp_path, lazy=True)
    plain = make_data_loader(ds, 2, 0, 1, seed=1, num_workers=0)
    workers = make_data_loader(ds, 2, 0, 1, seed=1, num_workers=2)
    for _ in range(5):
        torch.testing.assert_close(next(workers)["text"], next(plain)["text"], rtol=0, atol=0)
    assert workers.state_dict() == {"consumed_samples": 10}


def test_eval_loader_is_one_ordered_pass(tmp_path):
    ds = _dataset(tmp_path, lazy=False)
    it = make_data_loader(ds, 3, 0, 1, seed=0, shuffle=False)
    expected = len(ds) // 3
    assert len(it) == expected
    batches = list(it)
    assert len(batches) == expected and len(it) == 0
    torch.testing.assert_close(batches[1]["text"][0], torch.from_numpy(ds[3]["text"]), rtol=0, atol=0)


def test_no_shuffle_walks_every_epoch_in_order_and_resumes():
    n, b, dp = 10, 2, 2
    samplers = [DistributedBatchSampler(n, b, r, dp, seed=5, shuffle=False) for r in range(dp)]
    per_rank = [list(itertools.islice(iter(s), 5)) for s in samplers]
    stream = [i for k in range(5) for r in range(dp) for i in per_rank[r][k]]
    assert stream == list(range(10)) + list(range(10))  # epoch after epoch, in order, split across ranks
    resumed = list(itertools.islice(iter(DistributedBatchSampler(n, b, 1, dp, 5, consumed_samples=8,
                                                                 shuffle=False)), 2))
    assert resumed == per_rank[1][2:4]


# --- the in-order training loader -------------------------------------------------------------------------------------
# Rules the tests above left open, each found by injecting a bug that they missed.

class _Numbers:
    """Sample ``i`` is ``{'text': [i]}``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"text": np.array([i])}


@pytest.mark.parametrize("dp_size", [1, 2])
def test_an_in_order_training_loader_walks_every_epoch_in_sample_order(dp_size):
    # --no-shuffle, and a presampled blend: endless training batches in sample order, epoch after epoch.
    n, batch = 7, 2
    per_rank = []
    for rank in range(dp_size):
        it = make_data_loader(_Numbers(n), batch, rank, dp_size, seed=3, shuffle=True, in_order=True)
        per_rank.append([next(it)["text"][:, 0].tolist() for _ in range(6)])
    stream = [i for step in range(6) for rank in range(dp_size) for i in per_rank[rank][step]]
    assert stream == (list(range(n)) * 4)[:len(stream)]
