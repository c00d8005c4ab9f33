"""The conjugate communication functions of tensor model parallelism, and of sequence parallelism.

Each is an autograd function whose backward is the adjoint of its forward. Along the hidden (last)
dimension, for tensor parallelism:

==========================================  =====================  ======================
function                                    forward                backward
==========================================  =====================  ======================
``copy_to_model_parallel_region``           identity               all-reduce
``reduce_from_model_parallel_region``       all-reduce             identity
``scatter_to_model_parallel_region``        keep own last-dim cut  all-gather last dim
``gather_from_model_parallel_region``       all-gather last dim    keep own last-dim cut
==========================================  =====================  ======================

Along the sequence, for sequence parallelism (``--sequence-parallel``): activations are ``(b, s, ...)``
(batch first, as everywhere in ``model/``), so the sequence is dimension 1 (``SEQUENCE_DIM``) and rank
``r`` of ``p`` owns positions ``[r * s/p, (r + 1) * s/p)``:

================================================  ========================  =================================
function                                          forward                   backward
================================================  ========================  =================================
``scatter_to_sequence_parallel_region``           keep own sequence slice   all-gather along the sequence
``gather_from_sequence_parallel_region``          all-gather the sequence   reduce-scatter (the gathered
                                                                            tensor feeds a tensor-parallel
                                                                            matmul, so each rank's gradient
                                                                            is a partial sum) or keep own
                                                                            slice (every rank's gradient is
                                                                            already the whole one)
``reduce_scatter_to_sequence_parallel_region``    reduce-scatter            all-gather along the sequence
================================================  ========================  =================================

All take ``group=None`` (the model-parallel group) and are no-ops on a group of one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .initialize import get_model_parallel_group, group_rank, group_world_size
from .utils import divide, split_tensor_along_last_dim

SEQUENCE_DIM = 1
"""The sequence dimension of the activations sequence parallelism splits: ``(b, s, h)``."""


def _resolve(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    return get_model_parallel_group() if group is None else group


def _reduce(input_: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum ``input_`` over the group into a new tensor (the input is left untouched)."""
    if group_world_size(group) == 1:
        return input_
    output = input_.contiguous().clone()
    dist.all_reduce(output, group=_resolve(group))
    return output


def _split(input_: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's slice of the last dimension."""
    world_size = group_world_size(group)
    if world_size == 1:
        return input_
    return split_tensor_along_last_dim(input_, world_size)[group_rank(group)].contiguous()


def _gather(input_: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's tensor along the last dimension."""
    world_size = group_world_size(group)
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    tensors = [torch.empty_like(input_) for _ in range(world_size)]
    dist.all_gather(tensors, input_, group=_resolve(group))
    return torch.cat(tensors, dim=-1)


def _split_sequence(input_: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Keep this rank's slice of the sequence (a copy, so that the full tensor can be freed)."""
    world_size = group_world_size(group)
    if world_size == 1:
        return input_
    length = divide(input_.shape[SEQUENCE_DIM], world_size)
    return input_.narrow(SEQUENCE_DIM, group_rank(group) * length, length).contiguous()


def _gather_sequence(input_: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate every rank's slice along the sequence, in rank order."""
    world_size = group_world_size(group)
    if world_size == 1:
        return input_
    input_ = input_.contiguous()
    tensors = [torch.empty_like(input_) for _ in range(world_size)]
    dist.all_gather(tensors, input_, group=_resolve(group))
    return torch.cat(tensors, dim=SEQUENCE_DIM)


def _reduce_scatter_sequence(input_: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over the group and keep this rank's slice of the sequence, in one collective.

    The list form of ``reduce_scatter`` takes the pieces as they are cut along the sequence, which
    for a batch-first tensor are not the contiguous blocks ``reduce_scatter_tensor`` needs (and gloo
    and NCCL both implement the list form).
    """
    world_size = group_world_size(group)
    if world_size == 1:
        return input_
    length = divide(input_.shape[SEQUENCE_DIM], world_size)
    pieces = [piece.contiguous() for piece in torch.split(input_, length, dim=SEQUENCE_DIM)]
    output = torch.empty_like(pieces[0])
    dist.reduce_scatter(output, pieces, group=_resolve(group))
    return output


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return input_

    @staticmethod
    def backward(ctx, grad_output):
        return _reduce(grad_output, ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        return _reduce(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _split(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather(grad_output, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _gather(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _split(grad_output, ctx.group), None


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _split_sequence(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_sequence(grad_output, ctx.group), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, tensor_parallel_output_grad, group):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_sequence(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_sequence(grad_output, ctx.group), None, None
        return _split_sequence(grad_output, ctx.group), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_, group):
        ctx.group = group
        return _reduce_scatter_sequence(input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        return _gather_sequence(grad_output, ctx.group), None


def copy_to_model_parallel_region(
    input_: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient in backward."""
    if group_world_size(group) == 1:
        return input_  # identity both ways: no autograd node (~10 us a call)
    return _CopyToModelParallelRegion.apply(input_, group)


def reduce_from_model_parallel_region(
    input_: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward."""
    if group_world_size(group) == 1:
        return input_  # identity both ways: no autograd node (~10 us a call)
    return _ReduceFromModelParallelRegion.apply(input_, group)


def scatter_to_model_parallel_region(
    input_: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; all-gather of the gradient in backward."""
    return _ScatterToModelParallelRegion.apply(input_, group)


def gather_from_model_parallel_region(
    input_: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """All-gather along the last dimension; the gradient is sliced back in backward."""
    if group_world_size(group) == 1:
        return input_  # identity both ways: no autograd node (~10 us a call)
    return _GatherFromModelParallelRegion.apply(input_, group)


def scatter_to_sequence_parallel_region(
    input_: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Keep this rank's slice of the sequence of a tensor every rank holds whole (e.g. the embeddings);
    the gradient slices are all-gathered in backward."""
    return _ScatterToSequenceParallelRegion.apply(input_, group)


def gather_from_sequence_parallel_region(
    input_: torch.Tensor, tensor_parallel_output_grad: bool = True, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """All-gather the sequence slices into the whole sequence.

    ``tensor_parallel_output_grad``: whether the gathered tensor feeds a tensor-parallel matrix multiply
    (a column-parallel layer, the vocabulary-parallel logits). Each rank's gradient is then only its own
    partition's contribution, and backward reduce-scatters them, taking the place of
    ``copy_to_model_parallel_region``'s all-reduce. ``False`` when every rank computes the same thing from
    the gathered tensor (or reduces its gradient itself): backward keeps this rank's slice.
    """
    return _GatherFromSequenceParallelRegion.apply(input_, tensor_parallel_output_grad, group)


def reduce_scatter_to_sequence_parallel_region(
    input_: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Sum partial results over the group, each rank keeping its slice of the sequence (a row-parallel
    layer's output under sequence parallelism, in place of ``reduce_from_model_parallel_region``'s
    all-reduce); the gradient slices are all-gathered in backward."""
    return _ReduceScatterToSequenceParallelRegion.apply(input_, group)
