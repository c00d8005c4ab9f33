"""Tests of mpu/mappings.py: the four conjugate mappings, forward and backward.

Every rank draws its tensors from a generator seeded by its global rank, so each rank can rebuild
what every other rank sent and the sums and gathers are checked against values computed locally.
"""

import torch
import torch.distributed as dist

import mpu
from tests.distributed import run_distributed

SIZES = (1, 2, 4)
WORLD = 4
K = 3  # last-dimension width of one rank's slice


def _draw(global_rank, salt, shape):
    gen = torch.Generator().manual_seed(1000 * salt + global_rank)
    return torch.randn(shape, generator=gen)


def _group_ranks(mp):
    first = dist.get_rank() - dist.get_rank() % mp
    return list(range(first, first + mp))


def _check_copy(members, rank):
    x = _draw(rank, 1, (2, K)).requires_grad_()
    y = mpu.copy_to_model_parallel_region(x)
    torch.testing.assert_close(y, _draw(rank, 1, (2, K)), rtol=0, atol=0)
    y.backward(_draw(rank, 2, (2, K)))
    expected = sum(_draw(q, 2, (2, K)) for q in members)
    # All-reduce may add in another order than this sum: a few ulps on values of order 1.
    torch.testing.assert_close(x.grad, expected, rtol=1e-6, atol=1e-6)


def _check_reduce(members, rank, group=None):
    x = _draw(rank, 3, (2, K)).requires_grad_()
    y = mpu.reduce_from_model_parallel_region(x, group)
    expected = sum(_draw(q, 3, (2, K)) for q in members)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x, _draw(rank, 3, (2, K)), rtol=0, atol=0)  # input left untouched
    y.backward(_draw(rank, 4, (2, K)))
    torch.testing.assert_close(x.grad, _draw(rank, 4, (2, K)), rtol=0, atol=0)


def _check_scatter(members, rank, mp_rank):
    x = _draw(rank, 5, (2, K * len(members))).requires_grad_()
    y = mpu.scatter_to_model_parallel_region(x)
    expected = _draw(rank, 5, (2, K * len(members)))[:, K * mp_rank : K * (mp_rank + 1)]
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.backward(_draw(rank, 6, (2, K)))
    torch.testing.assert_close(x.grad, torch.cat([_draw(q, 6, (2, K)) for q in members], -1), rtol=0, atol=0)


def _check_gather(members, rank, mp_rank):
    x = _draw(rank, 7, (2, K)).requires_grad_()
    y = mpu.gather_from_model_parallel_region(x)
    torch.testing.assert_close(y, torch.cat([_draw(q, 7, (2, K)) for q in members], -1), rtol=0, atol=0)
    y.backward(_draw(rank, 8, (2, K * len(members))))
    expected = _draw(rank, 8, (2, K * len(members)))[:, K * mp_rank : K * (mp_rank + 1)]
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def _check_identity_at_size_one(rank):
    for mapping in (
        mpu.copy_to_model_parallel_region,
        mpu.reduce_from_model_parallel_region,
        mpu.scatter_to_model_parallel_region,
        mpu.gather_from_model_parallel_region,
    ):
        x = _draw(rank, 9, (2, K)).requires_grad_()
        y = mapping(x)
        torch.testing.assert_close(y, _draw(rank, 9, (2, K)), rtol=0, atol=0)
        y.backward(_draw(rank, 10, (2, K)))
        torch.testing.assert_close(x.grad, _draw(rank, 10, (2, K)), rtol=0, atol=0)


def _all_mappings():
    rank = dist.get_rank()
    checked = []
    for mp in SIZES:
        mpu.initialize_model_parallel(mp)
        members = _group_ranks(mp)
        mp_rank = mpu.get_model_parallel_rank()
        _check_copy(members, rank)
        _check_reduce(members, rank)
        _check_scatter(members, rank, mp_rank)
        _check_gather(members, rank, mp_rank)
        # An explicit group overrides the model-parallel default.
        dp_members = list(range(rank % mp, WORLD, mp))
        _check_reduce(dp_members, rank, group=mpu.get_data_parallel_group())
        if mp == 1:
            _check_identity_at_size_one(rank)
        mpu.destroy_model_parallel()
        checked.append(mp)
    return checked


def test_mappings_forward_and_backward_at_sizes_1_2_4():
    assert run_distributed(_all_mappings, WORLD) == [list(SIZES)] * WORLD
