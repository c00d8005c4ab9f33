"""Tests of mpu/data.py: broadcasting a batch from each model-parallel source rank to its group."""

import pytest
import torch
import torch.distributed as dist

import mpu
from tests.distributed import run_distributed

WORLD = 4
KEYS = ["text", "scalar", "empty", "labels"]


def _batch(src):
    """The batch that source rank ``src`` holds; each group's source holds a different one."""
    gen = torch.Generator().manual_seed(src)
    return {
        "text": torch.randint(-50_000, 50_000, (2, 5), generator=gen) + 2**60,  # beyond float64 precision
        "scalar": torch.tensor(-7 - src),
        "empty": torch.empty(0, 3, dtype=torch.int64),
        "labels": torch.randint(-100, 100, (3,), generator=gen),
        "unused": torch.arange(4),  # not in KEYS: stays on the source rank
    }


def _check_broadcast():
    src = mpu.get_model_parallel_src_rank()
    is_src = dist.get_rank() == src
    out = mpu.broadcast_data(KEYS, _batch(src) if is_src else None, torch.int64)
    expected = _batch(src)
    assert list(out) == KEYS
    for key in KEYS:
        assert out[key].dtype == torch.int64, key
        assert out[key].shape == expected[key].shape, key
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    return int(out["scalar"])


def _check_errors_on_a_group_of_one():
    batch = {"text": torch.arange(6).view(2, 3), "mask": torch.ones(2, 3)}
    with pytest.raises(TypeError, match="'mask' has dtype torch.float32, expected torch.int64"):
        mpu.broadcast_data(["text", "mask"], batch, torch.int64)
    with pytest.raises(KeyError, match="'loss_mask' missing"):
        mpu.broadcast_data(["text", "loss_mask"], batch, torch.int64)
    with pytest.raises(ValueError, match="source rank must pass the data"):
        mpu.broadcast_data(["text"], None, torch.int64)


def _all_sizes():
    scalars = {}
    for mp in (2, 4):
        mpu.initialize_model_parallel(mp)
        scalars[mp] = _check_broadcast()
        mpu.destroy_model_parallel()
    # A bad batch on the source raises there and, instead of a hang, on the rest of its group.
    mpu.initialize_model_parallel(2)
    bad = {"text": torch.ones(2, 3)}  # float, not int64
    if mpu.get_model_parallel_rank() == 0:
        with pytest.raises(TypeError, match="'text' has dtype torch.float32"):
            mpu.broadcast_data(["text"], bad, torch.int64)
    else:
        with pytest.raises(RuntimeError, match="source rank rejected the batch"):
            mpu.broadcast_data(["text"], None, torch.int64)
    scalars["after_error"] = _check_broadcast()  # the group is still usable
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(1)
    _check_errors_on_a_group_of_one()
    return scalars


def test_broadcast_data_from_each_source_rank():
    results = run_distributed(_all_sizes, WORLD)
    for rank, scalars in enumerate(results):
        expected_mp2 = -7 - (rank - rank % 2)
        assert scalars == {2: expected_mp2, 4: -7, "after_error": expected_mp2}, f"rank {rank}"
