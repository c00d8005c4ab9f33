"""The four conjugate communication functions of tensor model parallelism.

Each is an autograd function whose backward is the adjoint of its forward:

==========================================  =====================  ======================
function                                    forward                backward
==========================================  =====================  ======================
``copy_to_model_parallel_region``           identity               all-reduce
``reduce_from_model_parallel_region``       all-reduce             identity
``scatter_to_model_parallel_region``        keep own last-dim cut  all-gather last dim
``gather_from_model_parallel_region``       all-gather last dim    keep own last-dim cut
==========================================  =====================  ======================

All take ``group=None`` (the model-parallel group) and are no-ops on a group of one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .initialize import get_model_parallel_group, group_rank, group_world_size
from .utils import split_tensor_along_last_dim


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


def copy_to_model_parallel_region(
    input_: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient in backward."""
    return _CopyToModelParallelRegion.apply(input_, group)


def reduce_from_model_parallel_region(
    input_: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward."""
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
    return _GatherFromModelParallelRegion.apply(input_, group)
