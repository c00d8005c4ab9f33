"""Serial tests of mpu/utils.py: exact division, last-dimension splits and vocabulary ranges."""

import pytest
import torch

from mpu import VocabUtility, divide, ensure_divisibility, split_tensor_along_last_dim


def test_divide_returns_the_exact_quotient():
    assert divide(12, 4) == 3
    assert divide(7, 7) == 1


@pytest.mark.parametrize(("numerator", "denominator"), [(7, 2), (3, 0), (4, -2)])
def test_divide_and_ensure_divisibility_reject_inexact_division(numerator, denominator):
    message = f"{numerator} is not divisible by {denominator}"
    with pytest.raises(ValueError, match=message):
        ensure_divisibility(numerator, denominator)
    with pytest.raises(ValueError, match=message):
        divide(numerator, denominator)


def test_ensure_divisibility_accepts_exact_division():
    assert ensure_divisibility(12, 3) is None


def _tensor_2x12():
    return torch.arange(1, 25, dtype=torch.float32).view(2, 12)


def test_split_along_last_dim_gives_views_by_default():
    tensor = _tensor_2x12()
    chunks = split_tensor_along_last_dim(tensor, 3)
    assert len(chunks) == 3
    for i, chunk in enumerate(chunks):
        assert chunk.shape == (2, 4)
        torch.testing.assert_close(chunk, tensor[:, 4 * i : 4 * (i + 1)], rtol=0, atol=0)
        assert chunk.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        assert not chunk.is_contiguous()
    chunks[1][0, 0] = -1.0  # a view writes through to the original
    assert tensor[0, 4].item() == -1.0


def test_split_along_last_dim_copies_when_asked_for_contiguous_chunks():
    tensor = _tensor_2x12()
    chunks = split_tensor_along_last_dim(tensor, 4, contiguous_split_chunks=True)
    assert len(chunks) == 4
    for i, chunk in enumerate(chunks):
        assert chunk.shape == (2, 3)
        assert chunk.is_contiguous()
        torch.testing.assert_close(chunk, tensor[:, 3 * i : 3 * (i + 1)], rtol=0, atol=0)
    chunks[2][1, 0] = -1.0  # a copy leaves the original alone
    assert tensor[1, 6].item() == 19.0


def test_split_along_last_dim_rejects_an_uneven_split():
    with pytest.raises(ValueError, match="12 is not divisible by 5"):
        split_tensor_along_last_dim(_tensor_2x12(), 5)


def test_vocab_ranges_tile_the_vocabulary_in_rank_order():
    ranges = [VocabUtility.vocab_range_from_global_vocab_size(12, rank, 4) for rank in range(4)]
    assert ranges == [(0, 3), (3, 6), (6, 9), (9, 12)]


def test_vocab_range_from_per_partition_size():
    ranges = [VocabUtility.vocab_range_from_per_partition_vocab_size(5, rank, 3) for rank in range(3)]
    assert ranges == [(0, 5), (5, 10), (10, 15)]


def test_vocab_range_of_a_single_partition_is_the_whole_vocabulary():
    assert VocabUtility.vocab_range_from_global_vocab_size(7, 0, 1) == (0, 7)


def test_vocab_range_rejects_a_vocabulary_that_does_not_divide():
    with pytest.raises(ValueError, match="10 is not divisible by 4"):
        VocabUtility.vocab_range_from_global_vocab_size(10, 0, 4)
