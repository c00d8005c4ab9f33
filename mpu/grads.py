"""Gradient clipping over a model whose parameters are spread across the model-parallel group, and the
reduction that sequence parallelism's replicated parameters need."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from .initialize import (
    get_embedding_group,
    get_model_and_pipeline_parallel_group,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_world_size,
    get_pipeline_model_parallel_world_size,
    group_rank,
)
from .utils import collective_device


def allreduce_sequence_parallel_gradients(module: torch.nn.Module) -> int:
    """Sum over the model-parallel group the gradients of the parameters tagged ``sequence_parallel``
    (replicated weights, such as LayerNorm's, that each rank applied to its own slice of the sequence:
    each rank's gradient covers only its slice). One flat all-reduce per dtype; returns how many
    gradients were reduced (0, and no collective, for a model without such parameters)."""
    grads = [p.grad for p in module.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if not grads or get_model_parallel_world_size() == 1:
        return 0
    group = get_model_parallel_group()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same]).to(collective_device(group))
        dist.all_reduce(flat, group=group)
        offset = 0
        for grad in same:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()
    return len(grads)


def allreduce_tied_embedding_gradients(module: torch.nn.Module) -> int:
    """Sum over the embedding group (the first and last pipeline stage) the gradients of the parameters
    tagged ``pipeline_tied`` (the word embeddings, which the first stage reads and the last stage's output
    layer reuses), so that both copies take the same step and stay equal. Returns how many gradients
    were reduced (0, and no collective, without pipeline parallelism)."""
    if get_pipeline_model_parallel_world_size() == 1:
        return 0
    grads = [p.grad for p in module.parameters() if getattr(p, "pipeline_tied", False) and p.grad is not None]
    group = get_embedding_group()
    for grad in grads:
        reduced = grad.to(collective_device(group))
        dist.all_reduce(reduced, group=group)
        if reduced is not grad:
            grad.copy_(reduced)
    return len(grads)


def counts_in_norm(param: torch.Tensor, first_model_rank: bool) -> bool:
    """Whether ``param`` adds its gradient to the whole model's norm on this rank, so that each element
    counts once: partitioned parameters on every model-parallel rank, replicated ones on the first, and
    the last pipeline stage's copy of the tied word embeddings nowhere (the first stage counts them)."""
    if getattr(param, "pipeline_tied_copy", False):
        return False
    return getattr(param, "model_parallel", False) or first_model_rank


def norm_group() -> dist.ProcessGroup:
    """The group over which a whole-model sum runs: every tensor-parallel rank of every pipeline stage."""
    if get_pipeline_model_parallel_world_size() > 1:
        return get_model_and_pipeline_parallel_group()
    return get_model_parallel_group()


def clip_grad_norm(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2,
    group: dist.ProcessGroup | None = None,
) -> float:
    """Scale gradients in place so that the norm of the whole model's gradient is at most ``max_norm``.

    The norm is that of the full (unpartitioned) model: partitioned parameters (tagged
    ``model_parallel=True`` by their layer) contribute from every rank, replicated ones only from
    the group's first rank, so each element counts once (``counts_in_norm``). Without ``group``, the
    sum runs over every stage of a pipeline too. ``norm_type`` may be ``inf``. Returns the total norm
    before clipping, the same on every rank of the group.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    pg = norm_group() if group is None else group
    world_size = dist.get_world_size(pg)
    first_rank = (get_model_parallel_rank() if group is None else group_rank(group)) == 0
    grads = [p.grad.detach() for p in params]
    owned = [p.grad.detach() for p in params if counts_in_norm(p, first_rank)]
    device = grads[0].device if grads else torch.device("cpu")

    if norm_type == math.inf:
        local = torch.stack([g.abs().max().float() for g in grads]).max() if grads else torch.zeros(())
        total = local.to(device=device, dtype=torch.float32)
        if world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=pg)
        total_norm = total.item()
    else:
        if owned:
            norms = torch._foreach_norm([g.float() for g in owned], norm_type)
            local = torch.stack(norms).pow(norm_type).sum()
        else:
            local = torch.zeros((), device=device)
        total = local.to(device=device, dtype=torch.float32)
        if world_size > 1:
            dist.all_reduce(total, group=pg)
        total_norm = total.item() ** (1.0 / norm_type)

    clip_coef = max_norm / (total_norm + 1e-6)
    if clip_coef < 1 and grads:
        torch._foreach_mul_(grads, clip_coef)
    return total_norm
