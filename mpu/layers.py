"""Model-parallel linear and embedding layers.

Every layer builds its full ("master") weight from the default torch generator, then keeps its
own slice, so that under the same seed the gathered weight is the same for every model-parallel
size. Each layer tags its own parameters:

* ``model_parallel`` -- ``True`` when the tensor is partitioned over the model-parallel group,
  ``False`` when every model-parallel rank holds the same copy;
* ``partition_dim`` / ``partition_stride`` -- how a partitioned tensor was cut, so checkpoint
  tools can reassemble it;
* ``sequence_parallel`` -- ``True`` on a replicated parameter applied to this rank's slice of the
  sequence only (under sequence parallelism), whose gradient ``allreduce_sequence_parallel_gradients``
  must sum over the model-parallel group.

Sequence parallelism (``sequence_parallel=True`` on the linear layers) changes only the communication:
a column-parallel layer takes a slice ``(b, s/p, h)`` and all-gathers the sequence instead of taking
the whole, replicated input; a row-parallel layer reduce-scatters its output along the sequence instead
of all-reducing it. Parameter names, shapes and initialisation stay the same, so checkpoints do not
know whether a run was sequence-parallel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from .initialize import get_model_parallel_rank, get_model_parallel_world_size
from .mappings import (
    _gather_sequence,
    _reduce_scatter_sequence,
    copy_to_model_parallel_region,
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_model_parallel_region,
)
from .utils import VocabUtility, divide, partition_tensor

InitMethod = Callable[[torch.Tensor], object]


def linear(input_: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(input_, weight, bias)``: ``Y = X W^T + b``, for ``X (..., in)`` and ``W (out, in)``.

    With 4 to 48 rows (e.g. decoding a batch one token at a time) on the CPU under ``torch.inference_mode``,
    it multiplies ``W X^T`` instead and returns its transpose (a view: the rows are strided): MKL runs
    that form 1.3x to 1.7x faster there (GPT-2 small's 48 layer weights at 8 rows: 27-31 ms instead of 36-48 ms,
    its output layer 13-15 ms instead of 22-27 ms), while below 4 and above 48 rows ``F.linear`` is
    as fast or faster.
    """
    rows = input_.numel() // input_.shape[-1]
    # Only under torch.inference_mode (decoding): a strided result would change what follows it elsewhere,
    # e.g. the order in which dropout draws its mask in activation checkpointing's no-grad forward.
    if not 4 <= rows <= 48 or input_.device.type != "cpu" or not torch.is_inference_mode_enabled():
        return F.linear(input_, weight, bias)
    output = torch.mm(weight, input_.reshape(rows, -1).t()).t()  # (rows, out), strided: a copy costs more
    if bias is not None:
        output = output + bias  # cheaper than addmm's copy of the broadcast bias into (out, rows)
    return output.view(*input_.shape[:-1], weight.shape[0])


def set_model_parallel_attributes(
    param: torch.Tensor, is_parallel: bool, partition_dim: int = -1, stride: int = 1
) -> None:
    """Tag ``param`` with how it is laid out over the model-parallel group."""
    param.model_parallel = is_parallel
    param.partition_dim = partition_dim
    param.partition_stride = stride


def copy_model_parallel_attributes(destination: torch.Tensor, source: torch.Tensor) -> None:
    """Give ``destination`` (e.g. an fp32 master copy) the layout tags of ``source``."""
    set_model_parallel_attributes(
        destination,
        getattr(source, "model_parallel", False),
        getattr(source, "partition_dim", -1),
        getattr(source, "partition_stride", 1),
    )
    if getattr(source, "pipeline_tied_copy", False):
        destination.pipeline_tied_copy = True


def _initialize_affine_weight(
    weight: torch.Tensor,
    full_shape: tuple[int, int],
    partition_dim: int,
    init_method: InitMethod,
    stride: int = 1,
) -> torch.Tensor:
    """Initialise this rank's slice of a weight from a full weight drawn identically everywhere.

    With ``stride`` > 1 the partition dimension is cut into ``stride * world_size`` blocks and rank
    ``r`` keeps blocks ``r, r + world_size, ...``: a fused projection such as ``[Q; K; V]`` then
    gives every rank its own heads of each of Q, K and V. Returns the full weight.
    """
    master_weight = torch.empty(full_shape, dtype=torch.float32)
    init_method(master_weight)
    own = partition_tensor(
        master_weight, get_model_parallel_world_size(), get_model_parallel_rank(), partition_dim, stride
    )
    with torch.no_grad():
        weight.copy_(own)
    return master_weight


class _SequenceGatheredLinear(torch.autograd.Function):
    """``Y = gather_s(X_r) A^T + b`` that keeps only this rank's slice ``X_r`` for backward.

    Saving the gathered input would keep a whole ``(b, s, h)`` activation per column-parallel layer,
    which is most of what sequence parallelism sets out to split; backward gathers it again (one more
    all-gather) for the weight gradient. The input gradient is reduce-scattered: each rank's
    ``dY_r A_r`` is its own partition's part of the whole input gradient.
    """

    @staticmethod
    def forward(ctx, input_, weight, bias):
        ctx.save_for_backward(input_, weight)
        ctx.has_bias = bias is not None
        return F.linear(_gather_sequence(input_, None), weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        dtype = grad_output.dtype  # under autocast the output may be in another precision than the input
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = _reduce_scatter_sequence(grad_output.matmul(weight.to(dtype)), None).to(input_.dtype)
        grad_flat = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.needs_input_grad[1]:
            total = _gather_sequence(input_, None).to(dtype)
            grad_weight = grad_flat.t().matmul(total.reshape(-1, total.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_flat.sum(0).to(weight.dtype)
        return grad_input, grad_weight, grad_bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split over the model-parallel group.

    Rank ``r`` owns ids ``[r * V/p, (r + 1) * V/p)``; other ids look up zeros there, and the
    partial results are summed over the group: ``Y = sum_r E_r[ids]``.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, init_method: InitMethod = init.xavier_normal_
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        world_size = get_model_parallel_world_size()
        self.vocab_start_index, self.vocab_end_index = VocabUtility.vocab_range_from_global_vocab_size(
            num_embeddings, get_model_parallel_rank(), world_size
        )
        self.num_embeddings_per_partition = self.vocab_end_index - self.vocab_start_index
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim))
        set_model_parallel_attributes(self.weight, True, partition_dim=0)
        _initialize_affine_weight(self.weight, (num_embeddings, embedding_dim), 0, init_method)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if get_model_parallel_world_size() == 1:
            return F.embedding(input_, self.weight)
        out_of_range = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
        local_ids = (input_ - self.vocab_start_index).masked_fill(out_of_range, 0)
        output_parallel = F.embedding(local_ids, self.weight)
        output_parallel = output_parallel.masked_fill(out_of_range.unsqueeze(-1), 0.0)
        return reduce_from_model_parallel_region(output_parallel)


class ParallelEmbedding(nn.Module):
    """Embedding whose columns (the embedding dimension) are split over the model-parallel group.

    ``Y = [E_1[ids], ..., E_p[ids]]``, gathered along the last dimension.
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, init_method: InitMethod = init.xavier_normal_
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.embedding_dim_per_partition = divide(embedding_dim, get_model_parallel_world_size())
        self.weight = nn.Parameter(torch.empty(num_embeddings, self.embedding_dim_per_partition))
        set_model_parallel_attributes(self.weight, True, partition_dim=1)
        _initialize_affine_weight(self.weight, (num_embeddings, embedding_dim), 1, init_method)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        output_parallel = F.embedding(input_, self.weight)
        return gather_from_model_parallel_region(output_parallel)


class ColumnParallelLinear(nn.Module):
    """``Y = XA + b`` with ``A`` split by columns: ``A = [A_1, ..., A_p]``, ``Y_i = X A_i + b_i``.

    The input is replicated on every rank. With ``gather_output`` the ``Y_i`` are gathered into
    ``Y``; without it each rank keeps ``Y_i``, ready for a ``RowParallelLinear`` with
    ``input_is_parallel=True``.

    With ``sequence_parallel`` the input is this rank's slice of the sequence ``(b, s/p, in)``; it is
    all-gathered into ``X`` (whose backward reduce-scatters, replacing the all-reduce of the input
    gradient), and ``Y_i`` covers the whole sequence. It needs ``gather_output=False``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        init_method: InitMethod = init.xavier_normal_,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if sequence_parallel and gather_output:
            raise ValueError("a sequence-parallel ColumnParallelLinear keeps its output partitioned: "
                             "gather_output must be False")
        self.input_size = input_size
        self.output_size = output_size
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.stride = stride
        self.output_size_per_partition = divide(output_size, get_model_parallel_world_size())
        # torch's linear stores the transpose: (out, in), so columns of A are rows here.
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size))
        set_model_parallel_attributes(self.weight, True, partition_dim=0, stride=stride)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition))
            set_model_parallel_attributes(self.bias, True, partition_dim=0, stride=stride)
        else:
            self.register_parameter("bias", None)
        master = _initialize_affine_weight(
            self.weight, (output_size, input_size), 0, init_method, stride
        )
        self.master_weight = master if keep_master_weight_for_test else None

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return _SequenceGatheredLinear.apply(input_, self.weight, self.bias)
        input_parallel = copy_to_model_parallel_region(input_)
        output_parallel = linear(input_parallel, self.weight, self.bias)
        if not self.gather_output:
            return output_parallel
        output = gather_from_model_parallel_region(output_parallel)  # [..., p * stride * block]
        if self.stride > 1:
            # The gather is rank-major (rank r's blocks r, r + p, ...); restore the order of A's columns.
            *lead, _ = output.shape
            world_size = get_model_parallel_world_size()
            output = output.view(*lead, world_size, self.stride, -1).transpose(-3, -2).reshape(*lead, -1)
        return output


class RowParallelLinear(nn.Module):
    """``Y = XA + b`` with ``A`` split by rows and ``X`` by columns::

        A = [A_1; ...; A_p],  X = [X_1, ..., X_p],  Y = sum_i X_i A_i + b

    With ``input_is_parallel`` the input is already this rank's ``X_i`` (the output of a
    ``ColumnParallelLinear`` without gather); otherwise it is scattered here. The bias is
    replicated and added once, after the sum.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        init_method: InitMethod = init.xavier_normal_,
        stride: int = 1,
        keep_master_weight_for_test: bool = False,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("a sequence-parallel RowParallelLinear takes its input partitioned: "
                             "input_is_parallel must be True")
        self.input_size = input_size
        self.output_size = output_size
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.stride = stride
        self.input_size_per_partition = divide(input_size, get_model_parallel_world_size())
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition))
        set_model_parallel_attributes(self.weight, True, partition_dim=1, stride=stride)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size))
            set_model_parallel_attributes(self.bias, False)
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.register_parameter("bias", None)
        master = _initialize_affine_weight(
            self.weight, (output_size, input_size), 1, init_method, stride
        )
        self.master_weight = master if keep_master_weight_for_test else None

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if self.input_is_parallel:
            input_parallel = input_
        else:
            if self.stride > 1:
                # Make rank r's strided blocks r, r + p, ... contiguous so that the scatter cuts them.
                *lead, _ = input_.shape
                world_size = get_model_parallel_world_size()
                input_ = input_.reshape(*lead, self.stride, world_size, -1).transpose(-3, -2).reshape(*lead, -1)
            input_parallel = scatter_to_model_parallel_region(input_)
        output_parallel = linear(input_parallel, self.weight)
        if self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(output_parallel)
        else:
            output = reduce_from_model_parallel_region(output_parallel)
        if self.bias is not None:
            output = output + self.bias
        return output
