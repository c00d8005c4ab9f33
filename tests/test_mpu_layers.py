"""Tests of mpu/layers.py against serial torch references built from the same seed.

Each test spawns one world of 4 and loops over model-parallel sizes 1, 2 and 4 (4x1, 2x2, 1x4).
The serial reference draws the full ``(out, in)`` fp32 weight with ``torch.manual_seed(seed)`` and
the same init, so the gathered parallel weight must equal it whatever the model-parallel size.
Inputs and upstream gradients depend on the data-parallel rank: a group that talked across
data-parallel replicas would mix them and fail.

Tolerances: fp32 ``rtol=1e-6, atol=1e-6`` where a partitioned product is compared with the full
one (matmul blocking and the all-reduce may add in another order: a few ulps on values of order
1); exact where a value is only copied or sliced.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn import init

import mpu
from tests.distributed import run_distributed

SIZES = (1, 2, 4)
WORLD = 4
SEED = 1234
EXACT = {"rtol": 0, "atol": 0}
FP32 = {"rtol": 1e-6, "atol": 1e-6}


def _draw(salt, shape):
    """A tensor that is the same across a model-parallel group and differs across replicas."""
    gen = torch.Generator().manual_seed(100 * salt + mpu.get_data_parallel_rank())
    return torch.randn(shape, generator=gen)


def _serial_weight(shape):
    torch.manual_seed(SEED)
    weight = torch.empty(shape)
    init.xavier_normal_(weight)
    return weight.requires_grad_()


def _shard(full, dim, stride=1):
    """This rank's slice of ``full``: of each of the ``stride`` parts, the rank-th of mp pieces."""
    mp, rank = mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()
    return torch.cat([part.chunk(mp, dim)[rank] for part in full.chunk(stride, dim)], dim)


def _unshard(local, dim, stride=1):
    """The full tensor rebuilt from every rank's ``local`` slice (inverse of ``_shard``)."""
    mp = mpu.get_model_parallel_world_size()
    pieces = [torch.empty_like(local) for _ in range(mp)]
    dist.all_gather(pieces, local.detach().contiguous(), group=mpu.get_model_parallel_group())
    parts = [[p.chunk(stride, dim)[s] for p in pieces] for s in range(stride)]
    return torch.cat([torch.cat(part, dim) for part in parts], dim)


def _check_tags(param, model_parallel, partition_dim, stride):
    assert (param.model_parallel, param.partition_dim, param.partition_stride) == (
        model_parallel,
        partition_dim,
        stride,
    )


def _over_sizes(check):
    done = []
    for mp in SIZES:
        mpu.initialize_model_parallel(mp)
        check()
        done.append(mp)
        mpu.destroy_model_parallel()
    return done


def _column_case(gather_output, stride):
    batch, in_size, out_size = 3, 5, 8 * stride  # out divisible by stride * 4
    torch.manual_seed(SEED)
    layer = mpu.ColumnParallelLinear(in_size, out_size, gather_output=gather_output, stride=stride)
    _check_tags(layer.weight, True, 0, stride)
    _check_tags(layer.bias, True, 0, stride)
    weight = _serial_weight((out_size, in_size))
    torch.testing.assert_close(_unshard(layer.weight, 0, stride), weight.detach(), **EXACT)

    bias = _draw(1, (out_size,)).requires_grad_()
    with torch.no_grad():
        layer.bias.copy_(_shard(bias.detach(), 0, stride))
    x_ref = _draw(2, (batch, in_size)).requires_grad_()
    x = _draw(2, (batch, in_size)).requires_grad_()
    grad_out = _draw(3, (batch, out_size))

    y_ref = F.linear(x_ref, weight, bias)
    y_ref.backward(grad_out)
    y = layer(x)
    if gather_output:
        torch.testing.assert_close(y, y_ref.detach(), **FP32)
        y.backward(grad_out)
    else:
        torch.testing.assert_close(y, _shard(y_ref.detach(), -1, stride), **FP32)
        y.backward(_shard(grad_out, -1, stride))
    torch.testing.assert_close(x.grad, x_ref.grad, **FP32)
    torch.testing.assert_close(layer.weight.grad, _shard(weight.grad, 0, stride), **FP32)
    torch.testing.assert_close(layer.bias.grad, _shard(bias.grad, 0, stride), **FP32)


def _column_parallel():
    for gather_output in (True, False):
        for stride in (1, 3):  # 3: a fused [Q; K; V] projection
            _column_case(gather_output, stride)


def _row_case(input_is_parallel, stride):
    batch, in_size, out_size = 3, 8 * stride, 5
    torch.manual_seed(SEED)
    layer = mpu.RowParallelLinear(in_size, out_size, input_is_parallel=input_is_parallel, stride=stride)
    _check_tags(layer.weight, True, 1, stride)
    _check_tags(layer.bias, False, -1, 1)
    weight = _serial_weight((out_size, in_size))
    torch.testing.assert_close(_unshard(layer.weight, 1, stride), weight.detach(), **EXACT)

    bias = _draw(1, (out_size,)).requires_grad_()
    with torch.no_grad():
        layer.bias.copy_(bias)
    x_ref = _draw(2, (batch, in_size)).requires_grad_()
    grad_out = _draw(3, (batch, out_size))
    y_ref = F.linear(x_ref, weight, bias)
    y_ref.backward(grad_out)

    if input_is_parallel:
        x = _shard(_draw(2, (batch, in_size)), -1, stride).requires_grad_()
        x_grad_ref = _shard(x_ref.grad, -1, stride)
    else:
        x = _draw(2, (batch, in_size)).requires_grad_()
        x_grad_ref = x_ref.grad
    y = layer(x)
    torch.testing.assert_close(y, y_ref.detach(), **FP32)
    y.backward(grad_out)
    torch.testing.assert_close(x.grad, x_grad_ref, **FP32)
    torch.testing.assert_close(layer.weight.grad, _shard(weight.grad, 1, stride), **FP32)
    torch.testing.assert_close(layer.bias.grad, bias.grad, **FP32)


def _row_parallel():
    for input_is_parallel in (True, False):
        for stride in (1, 3):  # 3: the input is the output of a fused column layer of stride 3
            _row_case(input_is_parallel, stride)


def _vocab_parallel_embedding():
    vocab, dim = 16, 6
    torch.manual_seed(SEED)
    layer = mpu.VocabParallelEmbedding(vocab, dim)
    _check_tags(layer.weight, True, 0, 1)
    weight = _serial_weight((vocab, dim))
    torch.testing.assert_close(_unshard(layer.weight, 0), weight.detach(), **EXACT)

    gen = torch.Generator().manual_seed(7 + mpu.get_data_parallel_rank())
    # Every id once (so every rank's range is hit), then repeats that accumulate gradient.
    ids = torch.cat([torch.randperm(vocab, generator=gen), torch.randint(0, vocab, (8,), generator=gen)])
    ids = ids.view(3, 8)
    assert sorted(set(ids.flatten().tolist())) == list(range(vocab))
    grad_out = _draw(3, (3, 8, dim))

    y_ref = F.embedding(ids, weight)
    y_ref.backward(grad_out)
    y = layer(ids)
    # Out-of-range rows are exact zeros, so the all-reduce adds each value to zeros only.
    torch.testing.assert_close(y, y_ref.detach(), **EXACT)
    y.backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, _shard(weight.grad, 0), **FP32)


def _parallel_embedding():
    vocab, dim = 10, 8
    torch.manual_seed(SEED)
    layer = mpu.ParallelEmbedding(vocab, dim)
    _check_tags(layer.weight, True, 1, 1)
    weight = _serial_weight((vocab, dim))
    torch.testing.assert_close(_unshard(layer.weight, 1), weight.detach(), **EXACT)

    gen = torch.Generator().manual_seed(7 + mpu.get_data_parallel_rank())
    ids = torch.cat([torch.randperm(vocab, generator=gen), torch.randint(0, vocab, (2,), generator=gen)])
    ids = ids.view(3, 4)
    grad_out = _draw(3, (3, 4, dim))

    y_ref = F.embedding(ids, weight)
    y_ref.backward(grad_out)
    y = layer(ids)
    torch.testing.assert_close(y, y_ref.detach(), **EXACT)
    y.backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, _shard(weight.grad, 1), **FP32)


def _master_weight_kept_for_test():
    mpu.initialize_model_parallel(2)
    torch.manual_seed(SEED)
    layer = mpu.ColumnParallelLinear(4, 6, keep_master_weight_for_test=True)
    torch.testing.assert_close(layer.master_weight, _serial_weight((6, 4)).detach(), **EXACT)
    mpu.destroy_model_parallel()


def _run_column():
    done = _over_sizes(_column_parallel)
    _master_weight_kept_for_test()
    return done


def test_column_parallel_linear_matches_serial():
    assert run_distributed(_run_column, WORLD) == [list(SIZES)] * WORLD


def test_row_parallel_linear_matches_serial():
    assert run_distributed(_over_sizes, WORLD, _row_parallel) == [list(SIZES)] * WORLD


def test_vocab_parallel_embedding_matches_serial():
    assert run_distributed(_over_sizes, WORLD, _vocab_parallel_embedding) == [list(SIZES)] * WORLD


def test_parallel_embedding_matches_serial():
    assert run_distributed(_over_sizes, WORLD, _parallel_embedding) == [list(SIZES)] * WORLD


def test_linear_equals_f_linear_for_every_row_count():
    """``mpu.linear`` multiplies ``W X^T`` for 4 to 48 rows under inference mode: the same values as
    ``F.linear``; otherwise (with autograd, or in a no-grad forward such as activation checkpointing's, where
    a strided result would change the order dropout draws its mask in) it is ``F.linear`` itself."""
    gen = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(48, 40, generator=gen), torch.randn(48, generator=gen)
    for rows in (1, 2, 3, 4, 5, 8, 17, 48, 49, 200):
        x = torch.randn(rows, 1, 40, generator=gen)
        for b in (None, bias):
            with torch.inference_mode():
                got = mpu.linear(x, weight, b)
            assert got.shape == (rows, 1, 48)
            torch.testing.assert_close(got, F.linear(x, weight, b), **FP32)
            with torch.no_grad():
                assert mpu.linear(x, weight, b).is_contiguous()
    x = torch.randn(8, 40, generator=gen)
    w = weight.clone().requires_grad_()
    mpu.linear(x, w, bias).square().sum().backward()
    expected = w.detach().clone().requires_grad_()
    F.linear(x, expected, bias).square().sum().backward()
    torch.testing.assert_close(w.grad, expected.grad, **EXACT)
