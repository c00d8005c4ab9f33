"""Tests of mpu/grads.py: clipping by the norm of the whole (unpartitioned) model's gradient.

The model is ``Y = RowParallel(tanh(ColumnParallel(X)))`` with biases; the row bias is replicated
over the model-parallel group and must be counted once. The reference is
``torch.nn.utils.clip_grad_norm_`` on the serial model built from the same seed. Inputs depend on
the data-parallel rank, so a norm reduced across replicas would not match.

Tolerance ``rtol=1e-6, atol=1e-6``: the partial sums of squares are added in another order than
torch adds them, a few ulps.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn import init

import mpu
from tests.distributed import run_distributed

WORLD = 4
SIZES = (1, 2, 4)
H, FFN = 4, 8
SEED = 321
FP32 = {"rtol": 1e-6, "atol": 1e-6}


def _serial_weight(shape):
    torch.manual_seed(SEED)
    weight = torch.empty(shape)
    init.xavier_normal_(weight)
    return weight


def _data():
    gen = torch.Generator().manual_seed(40 + mpu.get_data_parallel_rank())
    x = torch.randn(6, H, generator=gen)
    grad_out = torch.randn(6, H, generator=gen)
    b1 = torch.randn(FFN, generator=gen)
    b2 = torch.randn(H, generator=gen)
    return x, grad_out, b1, b2


def _serial_grads():
    """Leaf parameters ``[W1, b1, W2, b2]`` of the serial model, with gradients."""
    x, grad_out, b1, b2 = _data()
    params = [_serial_weight((FFN, H)), b1, _serial_weight((H, FFN)), b2]
    for p in params:
        p.requires_grad_()
    w1, b1, w2, b2 = params
    F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2).backward(grad_out)
    return params


def _parallel_grads():
    x, grad_out, b1, b2 = _data()
    rank, mp = mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()
    torch.manual_seed(SEED)
    column = mpu.ColumnParallelLinear(H, FFN, gather_output=False)
    torch.manual_seed(SEED)
    row = mpu.RowParallelLinear(FFN, H, input_is_parallel=True)
    with torch.no_grad():
        column.bias.copy_(b1.chunk(mp)[rank])
        row.bias.copy_(b2)
    row(torch.tanh(column(x))).backward(grad_out)
    return [column.weight, column.bias, row.weight, row.bias]


def _slices(serial):
    """This rank's part of each serial gradient, in the order of ``_parallel_grads``."""
    rank, mp = mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()
    w1, b1, w2, b2 = (p.grad for p in serial)
    return [w1.chunk(mp, 0)[rank], b1.chunk(mp, 0)[rank], w2.chunk(mp, 1)[rank], b2]


def _check_clip(norm_type):
    serial = _serial_grads()
    full_norm = float(torch.nn.utils.clip_grad_norm_(serial, math.inf, norm_type))  # measures only
    max_norm = 0.5 * full_norm
    ref_norm = torch.nn.utils.clip_grad_norm_(serial, max_norm, norm_type)

    parallel = _parallel_grads()
    before = [p.grad.clone() for p in parallel]
    total = mpu.clip_grad_norm(parallel, max_norm, norm_type)
    torch.testing.assert_close(torch.tensor(total), ref_norm, **FP32)
    for i, (p, expected) in enumerate(zip(parallel, _slices(serial))):
        torch.testing.assert_close(p.grad, expected, **FP32, msg=lambda m, i=i: f"param {i}: {m}")
        assert not torch.allclose(p.grad, before[i]), f"param {i} was not clipped"
    return total


def _check_no_clip():
    serial = _serial_grads()
    ref_norm = torch.nn.utils.clip_grad_norm_(serial, 1e6)
    parallel = _parallel_grads()
    before = [p.grad.clone() for p in parallel]
    total = mpu.clip_grad_norm(parallel, 1e6)
    torch.testing.assert_close(torch.tensor(total), ref_norm, **FP32)
    for i, (p, b) in enumerate(zip(parallel, before)):
        assert torch.equal(p.grad, b), f"param {i} changed although the norm is below max_norm"


def _all_sizes():
    norms = {}
    for mp in SIZES:
        mpu.initialize_model_parallel(mp)
        norms[mp] = (_check_clip(2.0), _check_clip(math.inf))
        _check_no_clip()
        mpu.destroy_model_parallel()
    return dist.get_rank(), norms


def test_clip_grad_norm_matches_torch_on_the_serial_model():
    results = run_distributed(_all_sizes, WORLD)
    assert [rank for rank, _ in results] == list(range(WORLD))
    for rank, norms in results:
        # The same replica (data-parallel rank) has the same norms whatever the model-parallel size.
        replica_of_size_4 = norms[4]
        for mp in SIZES:
            assert norms[mp][0] > norms[mp][1] > 0, (rank, mp, norms[mp])  # 2-norm above max-norm
        if rank == 0:
            for mp in (1, 2):
                torch.testing.assert_close(torch.tensor(norms[mp]), torch.tensor(replica_of_size_4), **FP32)
