import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed


def _rank_sum(scale):
    t = torch.tensor([float(dist.get_rank() + 1)]) * scale
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    return dist.get_rank()


def test_results_come_back_by_rank():
    assert run_distributed(_rank_sum, 2, 10.0) == [30.0, 30.0]


def test_child_exception_fails_with_its_traceback():
    with pytest.raises(AssertionError, match="boom on rank one"):
        run_distributed(_fail_on_rank_one, 2)
