"""Tests of mpu/initialize.py: the model- and data-parallel groups and their getters."""

import pytest
import torch
import torch.distributed as dist

import mpu
from tests.distributed import run_distributed

GETTERS = [
    mpu.get_model_parallel_group,
    mpu.get_data_parallel_group,
    mpu.get_model_parallel_world_size,
    mpu.get_model_parallel_rank,
    mpu.get_model_parallel_src_rank,
    mpu.get_data_parallel_world_size,
    mpu.get_data_parallel_rank,
]


def _members(group):
    """Global ranks of ``group``, in group order, found by an all-gather inside it."""
    size = dist.get_world_size(group=group)
    mine = torch.tensor([dist.get_rank()])
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    return [int(t.item()) for t in gathered]


def _layout():
    return {
        "mp_members": _members(mpu.get_model_parallel_group()),
        "dp_members": _members(mpu.get_data_parallel_group()),
        "mp_rank": mpu.get_model_parallel_rank(),
        "mp_size": mpu.get_model_parallel_world_size(),
        "mp_src": mpu.get_model_parallel_src_rank(),
        "dp_rank": mpu.get_data_parallel_rank(),
        "dp_size": mpu.get_data_parallel_world_size(),
    }


def _groups_of_world_8():
    mpu.initialize_model_parallel(2)
    return _layout()


def _size_errors_and_reinit():
    out = {}
    with pytest.raises(ValueError, match="world size 4 is not divisible by model-parallel size 3"):
        mpu.initialize_model_parallel(3)
    out["initialized_after_bad_size"] = mpu.model_parallel_is_initialized()
    with pytest.raises(ValueError, match="at least 1"):
        mpu.initialize_model_parallel(0)

    mpu.initialize_model_parallel(2)
    out["first"] = _layout()
    with pytest.raises(RuntimeError, match="already initialized"):
        mpu.initialize_model_parallel(2)

    mpu.destroy_model_parallel()
    out["initialized_after_destroy"] = mpu.model_parallel_is_initialized()
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        mpu.get_model_parallel_rank()

    mpu.initialize_model_parallel(4)
    out["second"] = _layout()
    return out


def test_model_parallel_is_not_initialized_in_the_test_process():
    assert mpu.model_parallel_is_initialized() is False


@pytest.mark.parametrize("getter", GETTERS, ids=lambda g: g.__name__)
def test_getter_before_initialization_names_the_fix(getter):
    with pytest.raises(RuntimeError, match=r"initialize_model_parallel\(model_parallel_size\)"):
        getter()


def test_initialize_without_torch_distributed_names_the_fix():
    with pytest.raises(RuntimeError, match="init_process_group"):
        mpu.initialize_model_parallel(1)


def test_world_8_model_parallel_2_layout():
    layouts = run_distributed(_groups_of_world_8, 8)
    for rank, layout in enumerate(layouts):
        first = rank - rank % 2
        assert layout == {
            "mp_members": [first, first + 1],
            "dp_members": [rank % 2 + 2 * i for i in range(4)],
            "mp_rank": rank % 2,
            "mp_size": 2,
            "mp_src": first,
            "dp_rank": rank // 2,
            "dp_size": 4,
        }, f"rank {rank}"
    assert sorted({tuple(lay["mp_members"]) for lay in layouts}) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert sorted({tuple(lay["dp_members"]) for lay in layouts}) == [(0, 2, 4, 6), (1, 3, 5, 7)]


def test_bad_sizes_are_clear_errors_and_destroy_allows_reinit():
    results = run_distributed(_size_errors_and_reinit, 4)
    for rank, out in enumerate(results):
        assert out["initialized_after_bad_size"] is False
        assert out["initialized_after_destroy"] is False
        first = rank - rank % 2
        assert out["first"] == {
            "mp_members": [first, first + 1],
            "dp_members": [rank % 2, rank % 2 + 2],
            "mp_rank": rank % 2,
            "mp_size": 2,
            "mp_src": first,
            "dp_rank": rank // 2,
            "dp_size": 2,
        }, f"rank {rank}"
        assert out["second"] == {
            "mp_members": [0, 1, 2, 3],
            "dp_members": [rank],
            "mp_rank": rank,
            "mp_size": 4,
            "mp_src": 0,
            "dp_rank": 0,
            "dp_size": 1,
        }, f"rank {rank}"
