"""Point-to-point messages between pipeline stages: activations forward, their gradients backward.

Sends are asynchronous (``isend``; the caller keeps the returned handles and waits for them once the
iteration's schedule is done), receives block until the tensor is there. Each message is preceded by
a small header with its shape and dtype, so stages need not agree on shapes beforehand (evaluation
batches, ``--eval-seq-length`` and sequence parallelism's slices all differ from the training shape).
Activations and gradients travel on two communicators of the pipeline group, so each stream arrives in
the order it was sent whatever the other does. With a pipeline of one stage nothing is sent.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .initialize import (
    get_pipeline_message_groups,
    get_pipeline_model_parallel_next_rank,
    get_pipeline_model_parallel_prev_rank,
)
from .utils import collective_device

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEADER = 6  # dtype code, number of dimensions, up to four sizes


def _header(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() > _HEADER - 2:
        raise ValueError(f"pipeline messages have at most {_HEADER - 2} dimensions, got shape {tuple(tensor.shape)}")
    sizes = list(tensor.shape) + [0] * (_HEADER - 2 - tensor.dim())
    return torch.tensor([_DTYPES.index(tensor.dtype), tensor.dim(), *sizes], dtype=torch.int64)


Pending = list[tuple[dist.Work, torch.Tensor]]
"""Handles of sends in flight, with the buffers they read (kept alive until ``wait_all``)."""


def _send(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup) -> Pending:
    device = collective_device(group)
    header, payload = _header(tensor).to(device), tensor.detach().to(device).contiguous()
    return [(dist.isend(header, dst, group=group), header), (dist.isend(payload, dst, group=group), payload)]


def wait_all(pending: Pending) -> None:
    """Wait until every send in ``pending`` is done, and empty it."""
    for work, _ in pending:
        work.wait()
    pending.clear()


def _recv(src: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    where = collective_device(group)
    header = torch.empty(_HEADER, dtype=torch.int64, device=where)
    dist.recv(header, src, group=group)
    code, ndim, *sizes = header.tolist()
    tensor = torch.empty(sizes[:ndim], dtype=_DTYPES[code], device=where)
    dist.recv(tensor, src, group=group)
    return tensor.to(device)


def send_forward(output: torch.Tensor) -> Pending:
    """Send this stage's output activations to the next stage; the handles to wait for."""
    return _send(output, get_pipeline_model_parallel_next_rank(), get_pipeline_message_groups()[0])


def recv_forward(device: torch.device) -> torch.Tensor:
    """The previous stage's output activations, as a leaf that will collect its gradient."""
    tensor = _recv(get_pipeline_model_parallel_prev_rank(), get_pipeline_message_groups()[0], device)
    return tensor.requires_grad_()


def send_backward(input_grad: torch.Tensor) -> Pending:
    """Send the gradient of this stage's input to the previous stage; the handles to wait for."""
    return _send(input_grad, get_pipeline_model_parallel_prev_rank(), get_pipeline_message_groups()[1])


def recv_backward(device: torch.device) -> torch.Tensor:
    """The gradient of this stage's output, from the next stage."""
    return _recv(get_pipeline_model_parallel_next_rank(), get_pipeline_message_groups()[1], device)
