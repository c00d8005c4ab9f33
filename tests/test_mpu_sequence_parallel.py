"""Tests of sequence parallelism's mpu pieces: the three sequence mappings and the sequence-parallel modes of
``ColumnParallelLinear`` and ``RowParallelLinear``, against serial references at model-parallel sizes 1, 2, 4.

Activations are ``(b, s, h)``; the mappings cut dimension 1 (``mpu.SEQUENCE_DIM``), rank ``r`` of ``p`` owning
positions ``[r * s/p, (r + 1) * s/p)``. As in ``test_mpu_mappings``, tensors come from generators seeded by the
global rank, so every rank can rebuild what the others sent; as in ``test_mpu_layers``, weights are drawn whole
from one seed and compared with a serial ``F.linear``.

Tolerances: exact where values are only cut or concatenated; fp32 ``rtol=atol=1e-6`` where a sum over ranks
or a partitioned product is compared with a serial one (another order of addition).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn import init

import mpu
from tests.distributed import run_distributed

SIZES = (1, 2, 4)
WORLD = 4
SEED = 1234
S = 3  # sequence positions of one rank's slice
EXACT = {"rtol": 0, "atol": 0}
FP32 = {"rtol": 1e-6, "atol": 1e-6}


def _draw(global_rank, salt, shape):
    gen = torch.Generator().manual_seed(1000 * salt + global_rank)
    return torch.randn(shape, generator=gen)


def _members(group):
    return dist.get_process_group_ranks(group)


def _own(tensor, index, parts):
    """Slice ``index`` of ``parts`` along the sequence."""
    return tensor.chunk(parts, dim=1)[index]


def _check_scatter(members, rank, index, group):
    p = len(members)
    x = _draw(rank, 1, (2, S * p, 5)).requires_grad_()
    y = mpu.scatter_to_sequence_parallel_region(x, group)
    torch.testing.assert_close(y, _own(_draw(rank, 1, (2, S * p, 5)), index, p), **EXACT)
    y.backward(_draw(rank, 2, (2, S, 5)))
    torch.testing.assert_close(x.grad, torch.cat([_draw(q, 2, (2, S, 5)) for q in members], 1), **EXACT)


def _check_gather(members, rank, index, group, tensor_parallel_output_grad):
    p = len(members)
    x = _draw(rank, 3, (2, S, 5)).requires_grad_()
    y = mpu.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad, group)
    torch.testing.assert_close(y, torch.cat([_draw(q, 3, (2, S, 5)) for q in members], 1), **EXACT)
    y.backward(_draw(rank, 4, (2, S * p, 5)))
    if tensor_parallel_output_grad:  # every rank's gradient is a partial sum: reduce-scatter
        expected = _own(sum(_draw(q, 4, (2, S * p, 5)) for q in members), index, p)
        torch.testing.assert_close(x.grad, expected, **FP32)
    else:  # every rank's gradient is the whole one: keep this rank's slice
        torch.testing.assert_close(x.grad, _own(_draw(rank, 4, (2, S * p, 5)), index, p), **EXACT)


def _check_reduce_scatter(members, rank, index, group):
    p = len(members)
    x = _draw(rank, 5, (2, S * p, 5)).requires_grad_()
    y = mpu.reduce_scatter_to_sequence_parallel_region(x, group)
    torch.testing.assert_close(y, _own(sum(_draw(q, 5, (2, S * p, 5)) for q in members), index, p), **FP32)
    torch.testing.assert_close(x, _draw(rank, 5, (2, S * p, 5)), **EXACT)  # input left untouched
    y.backward(_draw(rank, 6, (2, S, 5)))
    torch.testing.assert_close(x.grad, torch.cat([_draw(q, 6, (2, S, 5)) for q in members], 1), **EXACT)


def _all_sequence_mappings():
    rank = dist.get_rank()
    checked = []
    for mp in SIZES:
        mpu.initialize_model_parallel(mp)
        # The model-parallel group by default, and an explicit group (the data-parallel one) overriding it.
        for group, index in ((None, mpu.get_model_parallel_rank()),
                             (mpu.get_data_parallel_group(), mpu.get_data_parallel_rank())):
            members = _members(group or mpu.get_model_parallel_group())
            _check_scatter(members, rank, index, group)
            _check_gather(members, rank, index, group, True)
            _check_gather(members, rank, index, group, False)
            _check_reduce_scatter(members, rank, index, group)
        mpu.destroy_model_parallel()
        checked.append(mp)
    return checked


def test_sequence_mappings_forward_and_backward_at_sizes_1_2_4():
    assert run_distributed(_all_sequence_mappings, WORLD) == [list(SIZES)] * WORLD


# --- the linear layers ------------------------------------------------------------------------------------------------


def _same_in_group(salt, shape):
    """A tensor the same across a model-parallel group and different across data-parallel replicas."""
    gen = torch.Generator().manual_seed(100 * salt + mpu.get_data_parallel_rank())
    return torch.randn(shape, generator=gen)


def _serial_weight(shape):
    torch.manual_seed(SEED)
    weight = torch.empty(shape)
    init.xavier_normal_(weight)
    return weight.requires_grad_()


def _shard(full, dim, stride=1):
    """This rank's cut of ``full`` along ``dim`` (of each of the ``stride`` parts, the rank-th of p)."""
    mp, rank = mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()
    return torch.cat([part.chunk(mp, dim)[rank] for part in full.chunk(stride, dim)], dim)


def _column_case(stride):
    mp = mpu.get_model_parallel_world_size()
    batch, seq, in_size, out_size = 2, S * mp, 5, 8 * stride
    torch.manual_seed(SEED)
    layer = mpu.ColumnParallelLinear(in_size, out_size, gather_output=False, stride=stride, sequence_parallel=True)
    weight = _serial_weight((out_size, in_size))
    bias = _same_in_group(1, (out_size,)).requires_grad_()
    with torch.no_grad():
        layer.bias.copy_(_shard(bias.detach(), 0, stride))
    x_ref = _same_in_group(2, (batch, seq, in_size)).requires_grad_()
    grad_out = _same_in_group(3, (batch, seq, out_size))
    y_ref = F.linear(x_ref, weight, bias)
    y_ref.backward(grad_out)

    x = _shard(x_ref.detach(), 1).requires_grad_()  # this rank's slice of the sequence
    y = layer(x)  # the whole sequence, this rank's output columns
    torch.testing.assert_close(y, _shard(y_ref.detach(), -1, stride), **FP32)
    y.backward(_shard(grad_out, -1, stride))
    torch.testing.assert_close(x.grad, _shard(x_ref.grad, 1), **FP32)
    torch.testing.assert_close(layer.weight.grad, _shard(weight.grad, 0, stride), **FP32)
    torch.testing.assert_close(layer.bias.grad, _shard(bias.grad, 0, stride), **FP32)
    assert not getattr(layer.bias, "sequence_parallel", False)  # partitioned, whole gradient already


def _row_case(stride):
    mp = mpu.get_model_parallel_world_size()
    batch, seq, in_size, out_size = 2, S * mp, 8 * stride, 5
    torch.manual_seed(SEED)
    layer = mpu.RowParallelLinear(in_size, out_size, input_is_parallel=True, stride=stride, sequence_parallel=True)
    assert layer.bias.sequence_parallel and not layer.bias.model_parallel
    weight = _serial_weight((out_size, in_size))
    bias = _same_in_group(1, (out_size,)).requires_grad_()
    with torch.no_grad():
        layer.bias.copy_(bias)
    x_ref = _same_in_group(2, (batch, seq, in_size)).requires_grad_()
    grad_out = _same_in_group(3, (batch, seq, out_size))
    y_ref = F.linear(x_ref, weight, bias)
    y_ref.backward(grad_out)

    x = _shard(x_ref.detach(), -1, stride).requires_grad_()  # the whole sequence, this rank's input columns
    y = layer(x)  # this rank's slice of the sequence
    torch.testing.assert_close(y, _shard(y_ref.detach(), 1), **FP32)
    y.backward(_shard(grad_out, 1))
    torch.testing.assert_close(x.grad, _shard(x_ref.grad, -1, stride), **FP32)
    torch.testing.assert_close(layer.weight.grad, _shard(weight.grad, 1, stride), **FP32)
    # The bias saw only this rank's positions; the step's reduction over the group makes it whole.
    assert mpu.allreduce_sequence_parallel_gradients(layer) == (1 if mp > 1 else 0)
    torch.testing.assert_close(layer.bias.grad, bias.grad, **FP32)


def _column_then_row():
    """The pair a transformer sublayer is: slice -> column (gather) -> row (reduce-scatter) -> slice."""
    mp = mpu.get_model_parallel_world_size()
    batch, seq, hidden, inner = 2, S * mp, 6, 8
    torch.manual_seed(SEED)
    column = mpu.ColumnParallelLinear(hidden, inner, gather_output=False, sequence_parallel=True)
    torch.manual_seed(SEED)
    row = mpu.RowParallelLinear(inner, hidden, input_is_parallel=True, sequence_parallel=True)
    a = _serial_weight((inner, hidden))
    b = _serial_weight((hidden, inner))
    x_ref = _same_in_group(4, (batch, seq, hidden)).requires_grad_()
    grad_out = _same_in_group(5, (batch, seq, hidden))
    y_ref = F.linear(torch.tanh(F.linear(x_ref, a)), b)
    y_ref.backward(grad_out)

    x = _shard(x_ref.detach(), 1).requires_grad_()
    y = row(torch.tanh(column(x)))
    torch.testing.assert_close(y, _shard(y_ref.detach(), 1), **FP32)
    y.backward(_shard(grad_out, 1))
    torch.testing.assert_close(x.grad, _shard(x_ref.grad, 1), **FP32)
    torch.testing.assert_close(column.weight.grad, _shard(a.grad, 0), **FP32)
    torch.testing.assert_close(row.weight.grad, _shard(b.grad, 1), **FP32)


def _layers_over_sizes():
    done = []
    for mp in SIZES:
        mpu.initialize_model_parallel(mp)
        for stride in (1, 3):  # 3: a fused [Q; K; V] projection and the layer after it
            _column_case(stride)
            _row_case(stride)
        _column_then_row()
        mpu.destroy_model_parallel()
        done.append(mp)
    return done


def test_sequence_parallel_linear_layers_match_serial_at_sizes_1_2_4():
    assert run_distributed(_layers_over_sizes, WORLD) == [list(SIZES)] * WORLD


def _parameters_of(sequence_parallel):
    torch.manual_seed(SEED)
    column = mpu.ColumnParallelLinear(4, 6, gather_output=False, stride=3, sequence_parallel=sequence_parallel)
    row = mpu.RowParallelLinear(6, 4, input_is_parallel=True, sequence_parallel=sequence_parallel)
    return {f"{prefix}.{name}": (tuple(param.shape), param.model_parallel, param.partition_dim, param.detach())
            for prefix, module in (("column", column), ("row", row)) for name, param in module.named_parameters()}


def test_sequence_parallel_changes_no_parameter_name_shape_tag_or_value(single_process_group):
    plain, sequence_parallel = _parameters_of(False), _parameters_of(True)
    assert list(plain) == list(sequence_parallel) == ["column.weight", "column.bias", "row.weight", "row.bias"]
    for name, (shape, model_parallel, dim, value) in plain.items():
        other = sequence_parallel[name]
        assert (shape, model_parallel, dim) == other[:3], name
        torch.testing.assert_close(value, other[3], **EXACT)


def test_sequence_parallel_linear_layers_refuse_a_whole_input_or_output(single_process_group):
    with pytest.raises(ValueError, match="gather_output must be False"):
        mpu.ColumnParallelLinear(4, 8, gather_output=True, sequence_parallel=True)
    with pytest.raises(ValueError, match="input_is_parallel must be True"):
        mpu.RowParallelLinear(8, 4, input_is_parallel=False, sequence_parallel=True)
